"""Judging trials: is each one's output sane (logits against a reference, per-dtype noise
floors), which is best for the objective, and when compiling pays off."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .quality import HALF_REFERENCE_FLOOR, QUALITY_TOLERANCE, compare, verdict
from .trial import STATUS_OK, Trial

OBJECTIVES = ("throughput", "latency", "memory")
HALF = ("bfloat16", "float16")


# the reference for quality is the most precise candidate: float32 first, then fp16 (3 more mantissa bits than bf16)
PRECISION = {"float32": 0, "float16": 1, "bfloat16": 2}


def precision_of(t: Trial) -> int:
    return PRECISION.get(dtype_of(t), len(PRECISION))


def quickest_compile(t: Trial) -> dict[str, Any] | None:
    """The good measurement with the shortest compile (a later process finds the compiler's caches warm)."""
    return min((r for r in t.results if r.get("status") == STATUS_OK and r.get("compile_s")), key=lambda r: r["compile_s"], default=None)


def mark_reference(t: Trial, perfect: dict[str, Any], what: str) -> None:
    """``t`` is what the others are compared with: its quality is ``perfect``; NaN/inf in its
    output (``what``) makes it wrong, and so no reference."""
    t.quality = {"reference": True, **perfect}
    if not all(r.get("logits_finite", True) for r in t.results if r.get("status") == STATUS_OK):
        t.status, t.reason = "wrong", f"the reference's {what} contain NaN/inf"


def dtype_of(t: Trial) -> Any:
    return t.metric("dtype") or t.config["from_pretrained"].get("dtype")


def quantized(t: Trial) -> bool:
    return "quantization_config" in t.config["from_pretrained"]


def lossy_option(t: Trial) -> bool:
    """A quantization chosen for speed (torchao), held to the quality tolerance, not only to sanity."""
    q = t.config["from_pretrained"].get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "torchao"


def logits_of(t: Trial) -> Any:
    """The candidate's own logits (its last good run), else those its screen recorded."""
    from .quality import load_logits

    for r in reversed(t.results):
        if r.get("status") == STATUS_OK and r.get("dir"):
            lg = load_logits(r["dir"])
            if lg is not None:
                return lg
    path = t.screen.get("logits") if t.screen.get("status") == STATUS_OK else None
    if path and Path(path).is_file():
        import torch

        return torch.load(path, map_location="cpu").float()
    return None


class Judge:
    def __init__(self, objective: str = "throughput", min_throughput: float = 0.0, notes: list[str] | None = None, *,
                 speed: str = "decode_tok_s", quality_tolerance: float = QUALITY_TOLERANCE) -> None:
        """``speed``: the measured rate the objective reads (an encoder's ``seq_s``).
        ``quality_tolerance``: the mean KL (nats) to the unquantized reference a speed-chosen
        quantization (torchao) may have and still be picked."""
        from .errors import UserError

        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
        if not quality_tolerance >= 0:
            raise UserError(f"quality tolerance must be a KL divergence >= 0 nats, found {quality_tolerance}")
        self.quality_tolerance = quality_tolerance
        self.objective = objective
        self.speed = speed
        self.min_throughput = min_throughput
        self.notes = notes if notes is not None else []

    # ---- the objective
    def score(self, t: Trial) -> float:
        if self.objective == "latency":
            return -(t.median("total_s") or float("inf"))
        if self.objective == "memory":
            peak = t.gpu_peak_gib() or t.metric("host_peak_gib") or float("inf")
            ok_speed = (t.median(self.speed) or 0) >= self.min_throughput
            return (1e6 if ok_speed else 0) - peak
        return t.median(self.speed) or 0.0

    def best(self, trials: Iterable[Trial], margin: float = 0.0) -> Trial | None:
        """The best by the objective; for throughput, the simplest of those whose median lies
        within the fastest one's 95 % interval (no quantization, fewer packages, no compile).
        ``margin``: also count as a tie what is within this fraction of the fastest median."""
        ok = [t for t in trials if t.status == STATUS_OK and t.stage != "baseline"]
        if not ok:
            return None
        top = max(ok, key=self.score)
        if self.objective != "throughput":
            return top
        lo = min((top.ci(self.speed) or (0, 0))[0], (1 - margin) * (top.median(self.speed) or 0))
        close = [t for t in ok if (t.median(self.speed) or 0) >= lo]  # its median inside the top's interval
        return min(close, key=lambda t: (t.simplicity, -self.score(t)))

    def choose(self, trials: list[Trial]) -> Trial | None:
        ok = [t for t in trials if t.status == STATUS_OK and t.stage != "baseline"]
        pick = self.best(ok)
        if pick is not None and pick is not max(ok, key=self.score):
            self.notes.append(f"picked {pick.label}: within the noise of the fastest ({max(ok, key=self.score).label}) and simpler")
        return pick

    # ---- correctness
    def check_quality(self, trials: list[Trial]) -> Any:
        """Each measured candidate's logits against the most precise candidate's (fp32, eager
        preferred; a screened-only candidate can serve), with a noise floor *per dtype*: the
        best agreement any candidate of that dtype reached. bf16 keeps 3 fewer mantissa bits
        than fp16, so one floor for both either passes broken fp16 or fails working bf16 (7 B on
        the H100: bf16 eager KL 0.010 against a floor set by fp16's 1.3e-4). Returns the lowest floor."""
        have = [(t, lg) for t in trials if (t.status == STATUS_OK or t.screen.get("status") == STATUS_OK)
                for lg in [logits_of(t)] if lg is not None]
        try:
            return self._check_quality(have) if have else None
        finally:  # a lossy option is picked only on evidence
            for t in trials:
                if lossy_option(t) and t.status == STATUS_OK and "kl" not in t.quality:
                    t.status, t.reason = "lossy", "its quality could not be compared with an unquantized reference (no logits)"

    def _check_quality(self, have: list[tuple[Trial, Any]]) -> Any:

        def precision(item: tuple[Trial, Any]) -> tuple[int, int, int]:
            t = item[0]
            dt = precision_of(t)
            return (dt + (10 if quantized(t) else 0), 0 if t.config["from_pretrained"].get("attn_implementation") == "eager" else 1,
                    0 if t.status == STATUS_OK else 1)

        ref, ref_logits = min(have, key=precision)
        ref_dtype = dtype_of(ref)
        measures = {id(t): compare(ref_logits, lg) for t, lg in have if t is not ref}
        floors: dict[str, float] = {}
        for t, _ in have:
            if t is ref or quantized(t) or dtype_of(t) not in HALF:
                continue
            kl = measures[id(t)]["kl"]
            if kl != float("inf"):
                floors[dtype_of(t)] = min(floors.get(dtype_of(t), kl), kl)
        if ref_dtype in HALF:
            floors = {d: max(f, HALF_REFERENCE_FLOOR) for d, f in floors.items()}
            self.notes.append(f"quality: the reference ({ref.label}) is {ref_dtype}, so no noise floor could be measured against float32; "
                              f"the floor measured between bf16 and fp32 on an H100 ({HALF_REFERENCE_FLOOR:g}) is used")
        lowest = min(floors.values()) if floors else (HALF_REFERENCE_FLOOR if ref_dtype in HALF else 0.0)
        for t, _ in have:
            if t is ref:
                mark_reference(t, {"kl": 0.0, "top1": 1.0}, "logits")
                continue
            m = measures[id(t)]
            floor = floors.get(dtype_of(t), lowest)
            good, why = verdict(m, floor, quantized(t))
            t.quality = {"kl": m["kl"], "top1": m["top1"], "reference": ref.label, "floor": floor}
            if not good and t.status == STATUS_OK:
                t.status, t.reason = "wrong", why
            elif lossy_option(t) and t.status == STATUS_OK:
                t.quality["tolerance"] = self.quality_tolerance
                if quantized(ref):
                    t.status, t.reason = "lossy", "no unquantized reference ran to hold its quality to"
                elif m["kl"] > self.quality_tolerance:
                    t.status, t.reason = "lossy", (f"quality: KL {m['kl']:.3g} nats to {ref.label} (top-1 agreement {m['top1']:.0%}) is above the "
                                                   f"tolerance {self.quality_tolerance:g} (--quality-tolerance)")
        return lowest

    # ---- compile
    def compile_breakeven(self, trials: list[Trial], new_tokens: int) -> None:
        """For each compiled candidate: after how many generated tokens its compile time pays off
        against the fastest measured candidate that does not compile."""
        plain = [x for x in trials if x.status == STATUS_OK and not x.config["generate"].get("cache_implementation")]
        for t in trials:
            if t.status != STATUS_OK or not t.config["generate"].get("cache_implementation") or t.config["generate"].get("disable_compile"):
                continue
            fp = t.config["from_pretrained"]
            twins = [x for x in plain if x.stage != "baseline" and x.config["from_pretrained"] == fp and x.config["runtime"] == t.config["runtime"]]
            twin = twins[0] if twins else max(plain, key=lambda x: x.median("decode_tok_s") or 0, default=None)
            # one taken while other candidates warmed up beside it is an upper bound
            first = quickest_compile(t)
            comp, fast, slow = first["compile_s"] if first else None, t.median("decode_tok_s"), twin.median("decode_tok_s") if twin else None
            if comp and fast and slow and fast > slow:
                tokens = comp / (1 / slow - 1 / fast)
                t.quality["compile_breakeven_tokens"] = int(tokens)
                beside = " (beside other candidates' warm-ups: at most)" if "beside" in str(first.get("process", "")) else ""
                self.notes.append(f"{t.label}: compiling took {comp:.0f} s{beside} and pays off after about {tokens:,.0f} generated tokens "
                                  f"({tokens / new_tokens:,.0f} requests of this workload) against {twin.label}")
