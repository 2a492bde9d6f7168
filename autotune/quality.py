"""Is a candidate's output sane? Compare its logits with a reference's, on the same tokens.

Each candidate saves the raw logits of several generation steps over a forced, fixed token
history (``worker._ForceTokens``), padded rows included. Two measures work on random
weights, where text quality means nothing: the mean KL divergence KL(reference || candidate)
per position, and top-1 agreement. The tolerance is set against a noise floor: the KL
between the reference (float32) and a known-good lower precision of the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Unquantized candidates must agree with the reference within FLOOR_FACTOR x the noise floor.
# Quantized ones are lossy by design; on random weights, whose output distributions are nearly
# flat, 4-bit flips the top-1 token while still working (H100, 1.1 B Llama shape: KL to fp32 of
# bf16 3e-4, fp16 5e-6, int8 0.0056, NF4 0.21, FP4 0.31 nats). For them the bound is absolute,
# QUANTIZED_MAX_KL, a sanity check against broken kernels: garbage logits score tens of nats.
# docs/PERFORMANCE.md lists the measured values.
FLOOR_FACTOR = 50.0
# When the most precise candidate that ran is itself bf16/fp16 (a pinned dtype, or fp32 does not
# fit), no floor can be measured against it: the floor is then the KL measured between bf16 and
# fp32 on the H100 (1.1 B Llama shape, docs/PERFORMANCE.md). Two bf16 runs that differ only in
# summation order (tensor parallel's all-reduce, a device_map split) differ by about that much
# (7 B shape on 2x H200: KL 2.5e-3 between bf16 tensor parallel and bf16 on one GPU).
HALF_REFERENCE_FLOOR = 3.1e-4
MIN_TOLERANCE = 1e-3
QUANTIZED_MAX_KL = 1.0
MIN_TOP1 = 0.5
# torchao weight-only quantization is a *throughput* option: it may be picked only when its output
# stays this close to the unquantized reference (mean KL per position, nats; ``--quality-tolerance``).
# 0.05 nats is where the top-1 token starts to change in a few per cent of positions on a trained
# model; random weights, whose distributions are nearly flat, do not say what a real model loses
# (docs/PERFORMANCE.md, issue 12: the speed x quality table on a model trained here).
QUALITY_TOLERANCE = 0.05


def load_logits(directory: str | Path) -> Any:
    import torch

    path = Path(directory) / "logits.pt"
    return torch.load(path, map_location="cpu").float() if path.is_file() else None


def compare(reference: Any, candidate: Any) -> dict[str, float]:
    """Mean KL(ref || cand) per position (nats) and top-1 agreement, ignoring tokens both mask (-inf)."""
    import torch

    if reference.shape != candidate.shape:
        return {"kl": float("inf"), "top1": 0.0}
    both_masked = torch.isinf(reference) & torch.isinf(candidate) & (reference < 0) & (candidate < 0)
    ref = reference.masked_fill(both_masked, -1e4)
    cand = candidate.masked_fill(both_masked, -1e4)
    if torch.isnan(cand).any() or torch.isposinf(cand).any():
        return {"kl": float("inf"), "top1": 0.0, "nan": True}
    lp = torch.log_softmax(ref, dim=-1)
    lq = torch.log_softmax(cand, dim=-1)
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)  # 0 * log 0 = 0
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return {"kl": max(0.0, float(kl.mean())), "top1": float(top1)}  # rounding can make a tiny KL negative


def tolerance(floor: float, quantized: bool) -> float:
    return max(QUANTIZED_MAX_KL if quantized else floor * FLOOR_FACTOR, MIN_TOLERANCE)


def verdict(measure: dict[str, float], floor: float, quantized: bool) -> tuple[bool, str]:
    tol = tolerance(floor, quantized)
    if measure.get("nan"):
        return False, "logits contain NaN/inf"
    if measure["kl"] > tol:
        return False, f"logits disagree with the reference: KL {measure['kl']:.3g} > tolerance {tol:.3g} (noise floor {floor:.3g})"
    if not quantized and measure["top1"] < MIN_TOP1:
        return False, f"top-1 agreement {measure['top1']:.0%} with the reference is below {MIN_TOP1:.0%}"
    return True, ""
