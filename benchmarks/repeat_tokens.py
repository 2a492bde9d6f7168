"""Does greedy decoding repeat itself? The same prompt generated several times on one model, by
transformers' loop uncompiled, by its compiled static cache, and by the sync-free loop (with and
without cuDNN's SDPA kernel): for each way, whether every call gave the first call's tokens (and
how many leading tokens of each row agree where not), and how each way's first call agrees with
the uncompiled one. Random weights give nearly flat distributions, so any run-to-run difference
in the kernels' sums shows as a flipped token.

    PYTHONPATH=. python3 benchmarks/repeat_tokens.py --shape 1.1b --batch-size 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_tune import SHAPES, error_text, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, path = prepare(args.out, Path(f"/tmp/llama-{args.shape}"), SHAPES[args.shape])
    import torch

    from autotune import decode
    from autotune.config import load
    from autotune.space import candidate_config
    from autotune.worker import _agreement

    cfg = candidate_config(args.dtype, "sdpa")
    cfg["from_pretrained"]["device_map"] = {"": 0}
    cfg["generate"] = {"cache_implementation": "static"}
    model = load(path, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 32000, (args.batch_size, 512), generator=g).cuda()
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=128, min_new_tokens=128)
    res = {"shape": args.shape, "batch_size": args.batch_size, "dtype": args.dtype, "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "ways": []}
    ways = [("transformers, uncompiled", {"disable_compile": True}, None),
            ("transformers, compiled static cache", {}, None),
            ("sync-free loop, own CUDA graph", {"custom_generate": decode.generate, "graph_steps": 1}, None),
            ("sync-free loop, own CUDA graph, cuDNN SDPA off", {"custom_generate": decode.generate, "graph_steps": 1}, "no-cudnn")]
    dest = out / f"repeat-{args.shape}-b{args.batch_size}.json"
    ref = None
    for name, extra, switch in ways:
        if time.perf_counter() - t0 > args.budget_s:
            res["ways"].append({"way": name, "skipped": "budget"})
            continue
        if switch == "no-cudnn":
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch._dynamo.reset()
            decode._compiled.clear()
        t = time.perf_counter()
        try:
            with torch.inference_mode():
                # a compiled way's first call compiles (and captures), as the worker's first warm-up: not counted
                warm = 0 if extra.get("disable_compile") else 1
                seqs = [model.generate(x, **kw, **extra) for _ in range(warm + args.calls)][warm:]
        except Exception as e:
            res["ways"].append({"way": name, "error": error_text(e)})
            continue
        first = seqs[0]
        ref = first if ref is None else ref
        later = [_agreement(torch, s, first, x.shape[1]) for s in seqs[1:]]
        row = {"way": name, "s": round(time.perf_counter() - t, 1),
               "calls_equal_first": [a["tokens_equal"] for a in later],
               "calls_agree_first": [a["agree_tokens"] for a in later],
               "agree_uncompiled": _agreement(torch, first, ref, x.shape[1])["agree_tokens"]}
        print(json.dumps(row), flush=True)
        res["ways"].append(row)
        dest.write_text(json.dumps(res, indent=1))
    res["total_s"] = round(time.perf_counter() - t0, 1)
    dest.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
