"""The memory model against the peaks a tune measured: for each measured candidate of a tune's
report (``autotune tune --json``), the estimate the current code makes for it, the measured
allocated peak and their ratio (what the capacity calibration takes the median of), then the
largest batch the calibrated estimate gives the pick or ``--for`` candidate. Runs on the CPU:
the model is rebuilt on the meta device from a shape, so no weights are needed.

    python benchmarks/memory_estimate.py docs/gpu/h200-s15-tune-7b-quant.json --shape 7b --for torchao-int8wo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_tune import SHAPES, llama_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--for", dest="which", help="a substring of the label of the candidate whose capacity to estimate (default: the pick)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from autotune.capacity import FILL, largest
    from autotune.config import Workload, parse_config
    from autotune.memory import CUDA_CONTEXT, GIB, estimate
    from autotune.model import Tensor, _replace, read_model
    from autotune.profiles import load_target

    report = json.loads(args.report.read_text())
    w = report.get("workload") or {}
    wl = Workload(batch_size=w.get("batch_size", 1), prompt_len=w.get("prompt_len", 512), new_tokens=w.get("new_tokens", 128))
    folder = Path(tempfile.mkdtemp())
    cfg = llama_config(SHAPES[args.shape])
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    spec = _replace(read_model(folder), tensors=tuple(Tensor(n, tuple(p.shape), "BF16") for n, p in model.named_parameters()))
    facts = load_target("h200")
    ratios, by_label = [], {}
    print(f"{'candidate':90s} {'estimate':>9s} {'in report':>9s} {'peak':>7s} {'ratio':>6s}")
    for t in report["trials"]:
        runs = [m for m in t.get("measurements") or [] if m.get("status") == "ok" and m.get("gpu_peak_gib")]
        if not runs:
            continue
        cand = parse_config(t["config"], workload=wl)
        est = estimate(cand, spec, facts)
        peak = max(sum(m["gpu_peak_gib"].values()) for m in runs)
        ratio = peak / ((est.total - CUDA_CONTEXT) / GIB)
        ratios.append(ratio)
        by_label[t["label"]] = cand
        print(f"{t['label'][:90]:90s} {est.total / GIB:9.2f} {t.get('estimate_gib') or 0:9.2f} {peak:7.2f} {ratio:6.3f}")
    factor = statistics.median(ratios)
    label = next((k for k in by_label if args.which and args.which in k), report.get("pick") if not args.which else None)
    cand = by_label.get(label)
    budget = (report.get("capacity") or {}).get("budget_gib")
    if cand is None or not budget:
        print(f"calibration {factor:.3f}; no candidate {args.which or 'picked'} or no budget in the report")
        return 1

    def fits(b: int) -> bool:
        e = estimate(dataclasses.replace(cand, workload=dataclasses.replace(wl, batch_size=b)), spec, facts)
        return (e.total - e.overhead) * factor + e.overhead <= budget * GIB * FILL

    batch = "1 (prompt lookup takes one row)" if cand.prompt_lookup else largest(1, 4096, fits)
    print(f"calibration {factor:.3f}; {label}: largest estimated batch {batch} in {budget} GiB "
          f"(the report's: {(report.get('capacity') or {}).get('estimated')}, calibration {(report.get('capacity') or {}).get('calibration')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
