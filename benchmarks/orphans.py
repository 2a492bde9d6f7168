"""Does anything outlive a killed tune? Starts `autotune tune` on a tiny random Llama, SIGKILLs
it (no handler can run) when its third process appears (a child possibly still starting) or
DELAY seconds later, and lists every process still carrying the run's environment marker 3 s on.

    python benchmarks/orphans.py --runs 12            # killed the moment the third process appears
    python benchmarks/orphans.py --runs 6 --delay 5   # killed while a forked candidate runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def marked(marker: str) -> list[int]:
    from autotune._proc import carrying

    return carrying(marker)


def describe(pid: int) -> str:
    try:
        return f"{pid} " + (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100]).decode()
    except OSError:
        return f"{pid} (gone)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    from tests.conftest import save_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="orphans-"))
    model = save_tiny_llama(tmp / "llama")
    left_over = 0
    for i in range(args.runs):
        marker = f"ORPHANS{os.getpid()}x{i}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), AUTOTUNE_CACHE_DIR=str(tmp / f"cache{i}"), AUTOTUNE_TEST_MARKER=marker)
        p = subprocess.Popen([sys.executable, "-m", "autotune", "tune", str(model), "--prompt-len", "16", "--new-tokens", "256", "--no-cache"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and len(marked(marker)) < 3:
            time.sleep(0.2)
        time.sleep(args.delay)
        at_kill = [describe(x) for x in marked(marker)]
        p.kill()
        p.wait()
        time.sleep(3)
        left = [describe(x) for x in marked(marker)]
        left_over += bool(left)
        print(f"run {i}: {len(at_kill)} processes at the kill; left 3 s later: {left or 'none'}", flush=True)
    print(f"{left_over} of {args.runs} runs left a process behind")
    return 1 if left_over else 0


if __name__ == "__main__":
    raise SystemExit(main())
