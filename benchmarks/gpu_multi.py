"""The two-GPU measurements of docs/PERFORMANCE.md (issue 5), one device call per model shape.

    PYTHONPATH=. python3 benchmarks/gpu_multi.py --shape 1.1b --out DIR   # free memory, then a 10 GiB-per-GPU budget
    PYTHONPATH=. python3 benchmarks/gpu_multi.py --shape 7b --out DIR

Each tune runs as a user would run it (`python -m autotune tune MODEL --json ...`); dtype and
attention are pinned (bf16, sdpa: the single-GPU stages chose them on the H100 for this family),
so the device time goes to the placements. After each tune the pick is re-run three times in
fresh processes (it must load and generate each time: the no-OOM target), and every measured
placement is re-measured with three times the timed runs (the "best placement re-measured
longer" the pick is compared with).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_tune import LLAMA_1_1B, cli, prepare  # noqa: E402

SHAPES = {
    "1.1b": LLAMA_1_1B,
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def remeasure(out: Path, name: str, model: Path, report: dict, *, budget: str | None) -> None:
    """The pick three times (loads and generates, no OOM), then every measured placement with
    three times the timed runs, each in a fresh process under the same budget."""
    from autotune.config import parse_config, parse_max_memory
    from autotune.runner import ForkRunner

    mm = parse_max_memory(budget) if budget else None
    runner = ForkRunner(timeout_s=300, preload_model_type="llama")
    rows: list[dict] = []
    base = {"model": str(model), "workload": report["workload"], "quality_steps": 1, "seed": 0, "memory_budget": mm, "fault": None}
    try:
        pick = next((t for t in report["trials"] if t["label"] == report.get("pick")), None)
        if pick:
            for i in range(3):
                r = runner.run({**base, "label": pick["label"], "config": pick["config"], "reps": 1,
                                "nproc": parse_config(pick["config"]).tp_size or 1})
                rows.append({"kind": "rerun", "label": pick["label"], "status": r.get("status"), "decode_tok_s": r.get("decode_tok_s"),
                             "gpu_peak_gib": r.get("gpu_peak_gib"), "error": r.get("error"), "oom": r.get("oom")})
                print(f"rerun {i + 1}: {rows[-1]}", flush=True)
        for t in report["trials"]:
            ran = any(r.get("status") == "ok" for r in t.get("measurements", []))
            if not ran or t["stage"] not in ("placement", "cache", "attention"):
                continue
            r = runner.run({**base, "label": t["label"], "config": t["config"], "reps": 9, "min_reps": 9,
                            "nproc": parse_config(t["config"]).tp_size or 1})
            rows.append({"kind": "longer", "label": t["label"], "status": r.get("status"), "decode_tok_s": r.get("decode_tok_s"),
                         "ttft_s": r.get("ttft_s"), "gpu_peak_gib": r.get("gpu_peak_gib"), "error": r.get("error"),
                         "tune_decode_tok_s": (t.get("summary") or {}).get("decode_tok_s")})
            print(f"longer {t['label'][:60]:60} {r.get('status')} {r.get('decode_tok_s')} peak {r.get('gpu_peak_gib')}", flush=True)
    finally:
        runner.close()
    longer = [r for r in rows if r["kind"] == "longer" and r["decode_tok_s"]]
    best = max(longer, key=lambda r: r["decode_tok_s"], default=None)
    pick_row = next((r for r in longer if r["label"] == report.get("pick")), None)
    verdict = {"best_longer": best, "pick_longer": pick_row,
               "pick_within_3pct": bool(best and pick_row and pick_row["decode_tok_s"] >= 0.97 * best["decode_tok_s"]),
               "reruns_ok": all(r["status"] == "ok" for r in rows if r["kind"] == "rerun")}
    (out / f"{name}-remeasure.json").write_text(json.dumps({"rows": rows, **verdict}, indent=1))
    print(name, json.dumps(verdict), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", default="0=10GiB,1=10GiB")
    ap.add_argument("--skip-free", action="store_true")
    ap.add_argument("--time-budget", type=float, default=250.0, help="per tune (a user's --time-budget)")
    ap.add_argument("--remeasure", action="store_true", help="re-run the picks 3x and the placements 3x longer")
    ap.add_argument("--remeasure-only", metavar="REPORT", help="no tune: re-measure from a stored report (budget: --budget, or none with --free)")
    ap.add_argument("--free", action="store_true")
    args = ap.parse_args()
    out, model = prepare(args.out, Path(f"/tmp/llama-{args.shape}"), SHAPES[args.shape])
    if args.remeasure_only:
        rep = json.loads(Path(args.remeasure_only).read_text())
        remeasure(out, Path(args.remeasure_only).stem, model, rep, budget=None if args.free else args.budget)
        return
    common = ["--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache", "--dtype", "bfloat16", "--attention", "sdpa",
              "--timeout", "240", "--time-budget", str(args.time_budget)]
    cache = ["--cache", "dynamic"] if args.shape == "7b" else []
    runs = [] if args.skip_free else [(f"x2-{args.shape}-free", None)]
    runs.append((f"x2-{args.shape}-10gib", args.budget))
    for name, budget in runs:
        extra = ["--max-memory", budget, "--cache", "dynamic"] if budget else cache
        rep = cli(out, name, str(model), *common, *extra)
        if args.remeasure and rep.get("trials"):
            remeasure(out, name, model, rep, budget=budget)


if __name__ == "__main__":
    main()
