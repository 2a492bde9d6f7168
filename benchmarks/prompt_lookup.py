"""Prompt-lookup decoding measured by the tune itself, on a model trained here and prompts from
text it never saw (held-out stdlib files), as a user runs it: ``autotune tune MODEL --prompts FILE``.

    python benchmarks/prompt_lookup.py --out DIR                        # CPU: train the default model's shape 240 s, tune
    python benchmarks/prompt_lookup.py --model DIR/model --out DIR      # reuse a model train wrote
    PYTHONPATH=. python3 benchmarks/prompt_lookup.py --shape 1.1b --seconds 240 --out DIR   # a GPU: the 1.1 B shape
    PYTHONPATH=/tmp/site:. python3 benchmarks/prompt_lookup.py --shape 1.1b --seconds 140 --quantization always --out DIR   # and torchao
    ... --tune-arg=--cache --tune-arg=static --tune-arg=--dtype --tune-arg=bfloat16   # the compiled regime only

Writes DIR/model (with autotune-train.json), DIR/prompts.jsonl, DIR/tune.json (the tune's whole
report) and prints each candidate's decode rate, TTFT and, for prompt lookup, tokens per
forward and whether its greedy tokens equal plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # the built-in default's shape (autotune.tuner.default_model), with a 4,096-token BPE
    "small": dict(shape=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
                  vocab_size=4096, seq_len=128, batch_size=16, lr=2e-3, limit_files=3000),
    "1.1b": dict(shape="LLAMA_1_1B", vocab_size=32000, seq_len=512, batch_size=16, lr=6e-4, site_packages=True, max_tokens=40_000_000,
                 tokenizer_files=3000),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", type=Path, help="a folder textmodel.train wrote (skips training)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seconds", type=float, default=240.0, help="training time")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantization", choices=["auto", "always", "never"], default="auto", help="the tune's --quantization")
    ap.add_argument("--tune-timeout", type=float, help="interrupt the tune after this many seconds and keep what it measured")
    ap.add_argument("--tune-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the tune, e.g. --tune-arg=--cache --tune-arg=static (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from autotune import textmodel

    model = args.model or args.out / "model"
    if args.model is None:
        kw = dict(SHAPES[args.shape])
        if isinstance(kw["shape"], str):
            kw["shape"] = getattr(textmodel, kw["shape"])
        stats = textmodel.train(model, seconds=args.seconds, log=lambda m: print(m, flush=True), **kw)
        print(json.dumps(stats), flush=True)
    prompts = args.out / "prompts.jsonl"
    textmodel.heldout_prompts(model, prompts, count=args.prompts, tokens=args.prompt_tokens)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "autotune", "tune", str(model), "--prompts", str(prompts), "--new-tokens", str(args.new_tokens),
           "--quantization", args.quantization, "--no-cache", "--json", *args.tune_arg]
    # the source tree first, then what the caller's PYTHONPATH holds (wheels installed with --target)
    path = os.pathsep.join(part for part in (str(ROOT), os.environ.get("PYTHONPATH")) if part)
    # the tune's progress (stderr) goes to this script's stderr as it comes, so a run cut short
    # still shows how far it got; past --tune-timeout it is interrupted (SIGINT) and its report
    # of what it measured by then (marked "interrupted") is kept
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    try:
        out, _ = p.communicate(timeout=args.tune_timeout)
    except subprocess.TimeoutExpired:
        print(f"the tune ran past --tune-timeout {args.tune_timeout:g} s: interrupting it", file=sys.stderr, flush=True)
        p.send_signal(signal.SIGINT)
        try:
            out, _ = p.communicate(timeout=120)  # it ends its candidates' processes and prints its report
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
    if not out.strip():  # no report: the tune's own error went to stderr
        return p.returncode or 1
    report = json.loads(out)
    (args.out / "tune.json").write_text(json.dumps(report, indent=1))
    print(f"$ {' '.join(cmd[1:])}   ({time.perf_counter() - t0:.1f} s)")
    print(f"pick: {report['pick']}" + ("  (interrupted)" if report.get("interrupted") else ""))
    for t in report["trials"]:
        s = t.get("summary") or {}
        pl = next((m.get("prompt_lookup") for m in reversed(t["measurements"]) if m.get("prompt_lookup")), None)
        extra = ""
        if pl:
            same = "equal" if pl["tokens_equal"] else f"{pl['agree_tokens']} of {pl['of']} equal"
            extra = f"  {pl['tokens_per_forward']} tokens/forward, greedy tokens {same}"
        print(f"{t['label']:52} {t['status']:12} {s.get('decode_tok_s') or '':>8} tok/s  TTFT {s.get('ttft_ms') or '':>6} ms{extra}")
    return 0 if p.returncode in (0, 128 + signal.SIGINT) else p.returncode  # interrupted at --tune-timeout: what it measured is kept


if __name__ == "__main__":
    raise SystemExit(main())
