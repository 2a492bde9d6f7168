"""Prompt lookup in the sync-free loop against greedy decoding without it, token for token, on a
trained model and held-out prompts (benchmarks/prompt_lookup.py writes both), in float32 (where
compiled kernels do not flip near ties) and bfloat16; and against transformers' own prompt lookup
(assisted decoding, dynamic cache, uncompiled).

    PYTHONPATH=. python3 benchmarks/lookup_exact.py --model DIR/model --prompts DIR/prompts.jsonl --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--lookup", type=int, default=10)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from autotune import decode, prompts
    from autotune.worker import _agreement

    ids = prompts.load(args.prompts, args.model).ids
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype), device_map={"": 0}).eval()
        kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        for i, p in enumerate(ids):
            x = torch.tensor([p], device="cuda")
            with torch.inference_mode():
                loop = model.generate(x, cache_implementation="static", custom_generate=decode.generate, **kw)
                ours = model.generate(x, cache_implementation="static", custom_generate=decode.generate, prompt_lookup_num_tokens=args.lookup, **kw)
                forwards = decode.stats.get("last_forwards")
                theirs = model.generate(x, prompt_lookup_num_tokens=args.lookup, **kw)
                eager = model.generate(x, **kw)
            n = x.shape[1]

            def agree(a, b):
                return _agreement(torch, a, b, n)["agree_tokens"]

            row = {"dtype": dtype, "prompt": i, "loop_lookup_vs_loop": agree(ours, loop), "loop_lookup_vs_assisted": agree(ours, theirs),
                   "loop_vs_eager_greedy": agree(loop, eager), "assisted_vs_eager_greedy": agree(theirs, eager), "loop_lookup_forwards": forwards}
            print(json.dumps(row), flush=True)
            rows.append(row)
        decode.release()
        del model
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "lookup": args.lookup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
