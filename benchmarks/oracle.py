"""Exhaustive oracle: a tune as a user runs it, then every candidate of the full space
(dtype x attention [x SDPA backend at long prompts] x cache/compile) measured five times longer,
each in a fresh process, and the pick's oracle speed over the oracle's best.

    PYTHONPATH=. python3 benchmarks/oracle.py --shape 1.1b --batch-size 1 --prompt-len 512 --out DIR
    PYTHONPATH=. python3 benchmarks/oracle.py --shape 7b --batch-size 1 --prompt-len 512 --out DIR --part compiled
    PYTHONPATH=. python3 benchmarks/oracle.py --shape 7b ... --out DIR --part eager --skip-tune   # the rest, another call
    PYTHONPATH=. python3 benchmarks/oracle.py --shape 7b --skip-tune --only '*sdpa static-cache+compile' --procs 3 --out DIR

Candidates are measured in rounds (one process of each per round), so a drift of the machine
reaches all of them alike. ``--part compiled`` measures the compiled candidates (and the screen), ``--part eager`` the
dynamic-cache and uncompiled static ones, ``all`` both; rows are written to
``DIR/oracle-<workload>.json`` as they come, so a run cut short keeps what it measured.
The tune's own report is ``DIR/tune-<workload>.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_tune import LLAMA_1_1B, cli, prepare  # noqa: E402
from gpu_tune import SHAPES as BUILT  # noqa: E402  (the shapes gpu_tune.build makes)

SHAPES = {**BUILT, "1.1b-8k": {**LLAMA_1_1B, "max_position_embeddings": 8192}}  # 8k: a 4,096-token prompt + new tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--part", choices=["all", "compiled", "eager", "none"], default="all", help="none: only the verdict from files already in --out")
    ap.add_argument("--procs", type=int, default=3, help="fresh processes per candidate (compiled ones move ~10 %% between processes)")
    ap.add_argument("--only", action="append", default=[], metavar="GLOB", help="measure only candidates whose label matches (repeatable)")
    ap.add_argument("--skip-tune", action="store_true", help="the tune's report is already in --out")
    ap.add_argument("--no-screen", action="store_true", help="do not screen the compiled rows afterwards")
    ap.add_argument("--quant", action="store_true", help="also torchao int8 / int4 / float8 of bf16 sdpa compiled (torchao importable)")
    ap.add_argument("--model", help="a model folder to use instead of the random one of --shape (e.g. one trained by benchmarks/train_text.py)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    name = f"{args.shape}{'-' + Path(args.model).name if args.model else ''}-b{args.batch_size}-p{args.prompt_len}"
    model_dir = Path(args.model or f"/tmp/llama-{args.shape}")
    if args.part == "none":
        out, model = Path(args.out), model_dir
    else:
        out, model = prepare(args.out, model_dir, SHAPES[args.shape])
    wl = ["--batch-size", str(args.batch_size), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    tune_path = out / f"tune-{name}.json"
    if not args.skip_tune:
        cli(out, f"tune-{name}", str(model), *wl, "--no-cache")
    report = json.loads(tune_path.read_text()) if tune_path.is_file() else {}

    from autotune import oracle
    from autotune.config import Workload
    from autotune.machine import probe
    from autotune.runner import ForkRunner
    from autotune.space import regime

    facts = probe() if args.part != "none" else None
    workload = Workload(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    path = out / f"oracle-{name}.json"
    done = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    have = {r["label"] for r in done["rows"] if r.get("status") not in (None, "planned")}

    def keep(t) -> bool:
        if args.part == "none" or (args.only and not any(fnmatch.fnmatchcase(t.label, g) for g in args.only)):
            return False
        compiled = regime(t.config, "cuda") == "compiled"  # the tune's own test of the regime
        return t.label not in have and (args.part == "all" or (args.part == "compiled") == compiled)

    runner = ForkRunner(timeout_s=600, preload_model_type="llama")
    todo = [t for t in oracle.candidates(str(model), facts, workload, quant=args.quant) if keep(t)] if facts else []
    t0 = time.perf_counter()
    try:
        def on_row(row: dict) -> None:
            done["rows"].append(row)
            done.get("partial", {}).pop(row["label"], None)
            path.write_text(json.dumps(done, indent=1))
            loop = [(p.get("decode_loop") or {}).get("tokens_equal") for p in row.get("processes", []) if p.get("decode_loop")]
            print(f"oracle {row['label'][:72]:72} {row['status']:10} {row.get('decode_tok_s')} {row.get('process_medians')} "
                  f"compile {[p.get('compile_s') and round(p['compile_s'], 1) for p in row.get('processes', [])]} peak "
                  f"{[p.get('gpu_peak_gib') for p in row.get('processes', [])]}{' loop tokens equal ' + str(loop) if loop else ''} "
                  f"{(row.get('error') or '')[:160]} ({time.perf_counter() - t0:.0f} s)", flush=True)

        def on_progress(row: dict) -> None:  # a run cut short continues from here (same --out)
            done.setdefault("partial", {})[row["label"]] = row["processes"]
            path.write_text(json.dumps(done, indent=1))

        oracle.measure_all(str(model), todo, workload, runner, procs=args.procs, on_row=on_row, on_progress=on_progress,
                           resume=done.get("partial"))
        if args.part in ("all", "compiled") and not args.no_screen and not any("screen_step_ms" in r for r in done["rows"]):
            oracle.screen_rows(str(model), workload, runner, done["rows"])
        # transformers' default, five times longer too
        if not any(r["label"].startswith("baseline") for r in done["rows"]) and args.part in ("all", "eager"):
            from autotune.trial import Trial

            base = Trial(label="baseline: from_pretrained(device_map) defaults", stage="baseline",
                         config={"from_pretrained": {"device_map": "cuda"}, "generate": {}, "runtime": {}})
            done["rows"].append(oracle.measure_one(str(model), base, workload, runner, procs=args.procs))
    finally:
        runner.close()
    done["verdict"] = oracle.ratio(report.get("config") or None, [r for r in done["rows"] if not r["label"].startswith("baseline")])
    done["screen_vs_runs"] = oracle.rank_agreement(done["rows"])
    done["tune"] = {"pick": report.get("pick"), "wall_s": report.get("cli_wall_s"), "workload": report.get("workload")}
    path.write_text(json.dumps(done, indent=1))
    print(json.dumps({"verdict": done["verdict"], "screen_vs_runs": done["screen_vs_runs"], "tune": done["tune"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
