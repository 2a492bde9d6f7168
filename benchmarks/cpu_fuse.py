"""Fused projections on the CPU: the built-in default model (a 22 M random Llama, float32, dynamic
cache), 64 greedy tokens after a 512-token prompt, as loaded and fused, twice each alternately.

    python benchmarks/cpu_fuse.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from autotune.config import load
    from autotune.tuner import default_model

    path = default_model()
    for fuse in (False, True, False, True):
        m = load(path, {"from_pretrained": {"dtype": "float32", "device_map": "cpu"}, "generate": {}, "runtime": {"fuse_projections": fuse}})
        ids = torch.randint(3, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
        with torch.inference_mode():
            m.generate(ids, **kw)  # warm-up
            times = []
            for _ in range(3):
                t = time.perf_counter()
                m.generate(ids, **kw)
                times.append(time.perf_counter() - t)
        print(f"{'fused' if fuse else 'as loaded'}: {64 / statistics.median(times):.1f} tok/s (prefill included)", flush=True)


if __name__ == "__main__":
    main()
