"""Wall time of `autotune doctor` next to `python -m torch.utils.collect_env`, each in a fresh process.

    python benchmarks/doctor_vs_collect_env.py [--runs 5] [--deep]

Prints each run and the medians. Run from the repository root (or with autotune installed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode
    return time.perf_counter() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--deep", action="store_true", help="also time `autotune doctor --deep`")
    args = ap.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmds = {"autotune doctor": [sys.executable, "-m", "autotune", "doctor"], "torch.utils.collect_env": [sys.executable, "-m", "torch.utils.collect_env"]}
    if args.deep:
        cmds["autotune doctor --deep"] = [sys.executable, "-m", "autotune", "doctor", "--deep"]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(args.runs):
        for name, cmd in cmds.items():  # interleaved, so drift hits both alike
            t, rc = wall(cmd, env)
            times[name].append(t)
            print(f"run {i + 1}: {name}: {t:.3f} s (exit {rc})", flush=True)
    for name, ts in times.items():
        print(f"median {name}: {statistics.median(ts):.3f} s over {len(ts)} runs (min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
