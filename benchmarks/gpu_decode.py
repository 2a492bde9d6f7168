"""Issue 12's GPU measurements: a Llama of the 1.1 B shape trained here on Python source (the
machine's stdlib and site-packages), then each decode-time option measured on it.

    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_decode.py --phase train --out DIR     # train (--seconds), quality table
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_decode.py --phase exact --out DIR     # sync-free loop vs generate, token for token
    PYTHONPATH=/tmp/site:. python3 benchmarks/oracle.py --shape 1.1b --model /tmp/trained-1.1b --quant --skip-tune --part compiled \\
        --procs 1 --only 'bfloat16 sdpa static-cache+compile*' --only 'bfloat16 sdpa torchao-* sync-free-loop' --out DIR   # speed

torchao travels as a wheel (the device README's Notes): ``--target /tmp/site``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINED = Path("/tmp/trained-1.1b")  # --model changes it


def configs() -> dict:
    from autotune.space import TORCHAO_KINDS, candidate_config

    out = {"bfloat16": candidate_config("bfloat16", "sdpa"), "float16": candidate_config("float16", "sdpa")}
    out.update({q: candidate_config("bfloat16", "sdpa", quant=q) for q in TORCHAO_KINDS})
    import torch

    for c in out.values():
        c["from_pretrained"]["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
    return out


def train(out: Path, seconds: float) -> None:
    from autotune import textmodel

    t0 = time.perf_counter()
    stats = textmodel.train(TRAINED, shape=textmodel.LLAMA_1_1B, vocab_size=32000, seq_len=512, batch_size=16, seconds=seconds, lr=6e-4,
                            site_packages=True, max_tokens=40_000_000, tokenizer_files=3000, log=lambda m: print(m, flush=True))
    print(json.dumps(stats), flush=True)
    (out / "train-1.1b.json").write_text(json.dumps(stats, indent=1))
    quality = textmodel.compare_configs(TRAINED, configs(), reference="bfloat16", length=512, count=64)
    for name, q in quality.items():
        print(f"quality {name:20} ppl {q['ppl']:.3f} KL {q['kl']:.5f} top-1 {q['top1']:.4f}", flush=True)
    (out / "quality-1.1b.json").write_text(json.dumps({"reference": "bfloat16", "windows": "64 x 512 held-out tokens",
                                                       "rows": quality, "total_s": round(time.perf_counter() - t0, 1)}, indent=1))


def exact(out: Path) -> None:
    """Greedy tokens of the sync-free loop against transformers' generate, both compiled (the same
    CompileConfig), on held-out text prompts of the trained model, batch 1 and batch 4 (padded)."""
    import torch

    from autotune import decode, textmodel
    from autotune.config import load

    cfg = configs()["bfloat16"]
    cfg["generate"] = {"cache_implementation": "static"}
    model = load(TRAINED, cfg)
    ids = textmodel.heldout_windows(TRAINED, 256, 8)
    rows = []
    for b in (1, 4):
        x = ids[:b].to(model.device)
        mask = torch.ones_like(x)
        if b > 1:  # rows of different lengths, left-padded
            for r in range(b):
                mask[r, : r * 32] = 0
        kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=128, min_new_tokens=128, pad_token_id=model.generation_config.pad_token_id)
        t = time.perf_counter()
        for _ in range(2):  # compile, settle
            plain = model.generate(x, **kw)
        plain_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(2):
            fast = model.generate(x, **kw, custom_generate=decode.generate)
        fast_s = time.perf_counter() - t
        n = x.shape[1]
        diff = (plain[:, n:] != fast[:, n:]).any(0).nonzero()
        row = {"batch": b, "tokens_equal": bool(torch.equal(plain, fast)), "first_difference": int(diff[0]) if len(diff) else None,
               "new_tokens": int(plain.shape[1] - n), "warmup_s": {"generate": round(plain_s, 1), "sync_free": round(fast_s, 1)}}
        # and greedy with an EOS that the text produces (early stop): the loop's length must match
        eos = int(plain[0, n + 20])
        p2 = model.generate(x, **{**kw, "min_new_tokens": 0}, eos_token_id=eos)
        f2 = model.generate(x, **{**kw, "min_new_tokens": 0}, eos_token_id=eos, custom_generate=decode.generate)
        row["eos_stop"] = {"eos": eos, "tokens_equal": bool(p2.shape == f2.shape and torch.equal(p2, f2)), "lengths": [int(p2.shape[1] - n), int(f2.shape[1] - n)]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "exact-1.1b.json").write_text(json.dumps({"rows": rows, "decode_stats": decode.stats}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["train", "exact"], required=True)
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="the trained model's folder (default /tmp/trained-1.1b)")
    args = ap.parse_args()
    global TRAINED
    TRAINED = Path(args.model) if args.model else TRAINED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train(out, args.seconds) if args.phase == "train" else exact(out)


if __name__ == "__main__":
    main()
