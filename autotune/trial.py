"""One candidate of a tune and what was measured of it: :class:`Trial`, its summary, intervals."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any

STATUS_OK = "ok"


@dataclass
class Trial:
    label: str
    stage: str
    config: dict[str, Any]
    simplicity: int = 0  # lower is simpler: no quantization, no extra package, no compile
    status: str = "planned"  # planned / dropped / ok / wrong / lossy / error / crashed / timeout / not measured
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the rules' errors that dropped it, the most fundamental first
    estimate_gib: Any = None
    results: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    screen: dict[str, Any] = field(default_factory=dict)  # the cheap proxy measurement, where one was taken

    # ---- aggregated measurements
    def values(self, key: str) -> list[float]:
        out = []
        for r in self.results:
            if r.get("status") == STATUS_OK:
                out += [run[key] for run in r.get("runs", []) if key in run]
        return out

    def median(self, key: str) -> float | None:
        v = self.values(key)
        return statistics.median(v) if v else None

    def ci(self, key: str) -> tuple[float, float] | None:
        return bootstrap_ci(self.values(key))

    def metric(self, key: str) -> Any:
        vals = [r[key] for r in self.results if r.get("status") == STATUS_OK and key in r]
        return vals[-1] if vals else None

    def gpu_peak_gib(self) -> float | None:
        peaks = [sum(r["gpu_peak_gib"].values()) for r in self.results if r.get("status") == STATUS_OK and r.get("gpu_peak_gib")]
        return max(peaks) if peaks else None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "label": self.label,
            "stage": self.stage,
            "status": self.status,
            "reason": self.reason,
            "warnings": self.warnings,
            "config": self.config,
            "estimate_gib": self.estimate_gib,
            "quality": self.quality,
            "measurements": self.results,
        }
        if self.screen:
            d["screen"] = self.screen
        if self.status == STATUS_OK:
            d["summary"] = summary(self)
        return d


def bootstrap_ci(values: list[float], n: int = 500, seed: int = 0) -> tuple[float, float] | None:
    """95 % bootstrap interval of the median (deterministic)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def summary(t: Trial) -> dict[str, Any]:
    """The headline figures: the rate with its interval, what the task adds (an encoder's forward
    latency; a generation's TTFT, total and inter-token latency), load, compile, peaks, runs."""
    speed = "seq_s" if t.values("seq_s") else "decode_tok_s"
    ci = t.ci(speed)
    out: dict[str, Any] = {speed: _r(t.median(speed)), f"{speed}_ci95": [_r(ci[0]), _r(ci[1])] if ci else None}
    if speed == "seq_s":
        out.update(latency_p50_ms=_r((t.metric("latency_p50_s") or 0) * 1000, 2), latency_p99_ms=_r((t.metric("latency_p99_s") or 0) * 1000, 2))
    else:
        out.update(ttft_ms=_r((t.median("ttft_s") or 0) * 1000), total_s=_r(t.median("total_s"), 3),
                   itl_p50_ms=_r((t.metric("itl_p50_s") or 0) * 1000), itl_p99_ms=_r((t.metric("itl_p99_s") or 0) * 1000))
    out.update(load_s=_r(t.metric("load_s"), 2), compile_s=_r(t.metric("compile_s"), 1), gpu_peak_gib=t.gpu_peak_gib(),
               host_peak_gib=t.metric("host_peak_gib"), runs=len(t.values(speed)))
    return out


def _r(x: Any, nd: int = 1) -> Any:
    return None if x is None else round(x, nd)
