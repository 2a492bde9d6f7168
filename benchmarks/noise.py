"""Where the process-to-process spread of a compiled candidate's speed comes from: the same
configuration measured in fresh processes, alternating how the thread that drives the GPU is
placed for the timed runs: free (the scheduler's choice), pinned to the GPU's local CPUs (NVML's
CPU affinity), pinned to one of them.

    PYTHONPATH=. python3 benchmarks/noise.py --procs 4 --out DIR

Writes DIR/noise-<shape>.json: per process, the median decode tok/s, the median inter-token
latency, and every timed run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_tune import LLAMA_1_1B, prepare  # noqa: E402


def local_cpus(index: int = 0) -> list[int]:
    """The CPUs NVML says are closest to GPU ``index`` (all CPUs when it cannot say)."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        n = os.cpu_count() or 1
        words = pynvml.nvmlDeviceGetCpuAffinity(h, (n + 63) // 64)
        cpus = [w * 64 + b for w, m in enumerate(words) for b in range(64) if int(m) >> b & 1]
        return [c for c in cpus if c in os.sched_getaffinity(0)] or sorted(os.sched_getaffinity(0))
    except Exception as e:  # noqa: BLE001 - a benchmark: say why and fall back
        print(f"NVML CPU affinity unavailable ({e}); using every CPU", flush=True)
        return sorted(os.sched_getaffinity(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4, help="processes per placement")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out, model = prepare(args.out, Path("/tmp/llama-1.1b"), LLAMA_1_1B)
    from autotune.runner import ForkRunner

    local = local_cpus()
    one = local[len(local) // 2]
    placements = {"free": None, "local": local, "one": [one]}
    print(f"GPU-local CPUs: {local}; single: {one}", flush=True)
    cfg = {"from_pretrained": {"dtype": args.dtype, "attn_implementation": args.attention, "device_map": {"": 0}},
           "generate": {"cache_implementation": "static", "disable_compile": False}}
    wl = {"batch_size": 1, "prompt_len": 512, "new_tokens": 128, "padding": "none"}
    runner = ForkRunner(timeout_s=600)
    rows: list[dict] = []

    def run(name: str, cpus: list[int] | None) -> dict:
        t0 = time.perf_counter()
        r = runner.run({"model": str(model), "label": f"{args.dtype} {args.attention} compiled ({name})", "config": cfg, "workload": wl,
                        "reps": args.reps, "min_reps": args.reps, "quality_steps": 1, "seed": 0, "nproc": 1, "pin_cpus": cpus})
        row = {"placement": name, "status": r.get("status"), "error": r.get("error"), "decode_tok_s": r.get("decode_tok_s"),
               "itl_p50_ms": round(1000 * r["itl_p50_s"], 3) if r.get("itl_p50_s") else None,
               "itl_p99_ms": round(1000 * r["itl_p99_s"], 3) if r.get("itl_p99_s") else None,
               "runs": [round(x["decode_tok_s"], 1) for x in r.get("runs", [])], "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        return row

    try:
        run("warm-up of the compile cache", None)
        for _ in range(args.procs):
            for name, cpus in placements.items():
                rows.append(run(name, cpus))
                (out / "noise-1.1b.json").write_text(json.dumps({"local_cpus": local, "rows": rows}, indent=1))
    finally:
        runner.close()
    for name in placements:
        meds = [r["decode_tok_s"] for r in rows if r["placement"] == name and r["decode_tok_s"]]
        itl = [r["itl_p50_ms"] for r in rows if r["placement"] == name and r["itl_p50_ms"]]
        if meds:
            print(f"{name:6} process medians {[round(m) for m in meds]} spread {(max(meds) - min(meds)) / statistics.median(meds):.1%} "
                  f"itl p50 ms {itl}", flush=True)


if __name__ == "__main__":
    main()
