"""Capacity of the pick: the largest batch and the longest prompt that fit, from the memory
model calibrated on the measured peaks, then checked by runs on a GPU. When the estimate's
shape does not fit, a bounded search with real runs narrows down to the largest that ran, and
the memory model's calibration is reported from it: on a GPU the figure is always one that ran."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

from .config import Workload, parse_config
from .facts import UNKNOWN
from .memory import GIB, estimate
from .trial import STATUS_OK, Trial

# Runs after the first check, each testing every still-open shape once (bisection).
MAX_SEARCH_RUNS = 4
# The share of the budget the estimate may fill. The allocator's blocks come on top of what the
# calibration sees (allocated bytes): on an H100, 1.1 B with a static cache at batch 1,659 (the
# estimate at the whole budget) ran out of memory, 1,616 ran (docs/gpu/h100-v4-tune-1.1b-b1.json);
# at 97 % the first check lands below that and one run settles it instead of four.
FILL = 0.97
# Stop narrowing when the bracket is within this fraction of what fits.
RESOLUTION = 0.03


def largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with ok(n), for a monotone ok; 0 if not even lo."""
    if not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


class Capacity:
    def __init__(self, space: Any, bench: Any) -> None:
        self.space, self.bench = space, bench

    def free_bytes(self, cand: Any) -> tuple[int, list[int]]:
        """(bytes the pick may use, GPUs it uses); 0 when unknown."""
        if self.space.device == "cuda":
            from .engine import gpus_used

            used = gpus_used(cand, self.space.facts)
            used = used if isinstance(used, list) and used else [0]
            budgets = [self.space.budget(i) for i in used]
            return (0 if any(b is None for b in budgets) else sum(budgets)), used  # type: ignore[arg-type]
        host = self.space.facts.host if isinstance(self.space.facts.host, dict) else {}
        return int(host.get("ram_available_gib", host.get("ram_gib", 0)) * GIB), []

    def run(self, pick: Trial, check: bool) -> dict[str, Any]:
        space, w = self.space, self.space.workload
        cand = parse_config(pick.config, workload=w)
        factor = statistics.median(self.bench.calibration) if self.bench.calibration else 1.0
        free, used = self.free_bytes(cand)
        if not free:
            return {}

        def est(batch: int, prompt: int) -> Any:
            wl = Workload(batch_size=batch, prompt_len=prompt, new_tokens=w.new_tokens, padding=w.padding)
            return estimate(dataclasses.replace(cand, workload=wl), space.model, space.facts, on_gpu=space.device == "cuda")

        def fits(batch: int, prompt: int) -> bool:
            e = est(batch, prompt)
            return e is not UNKNOWN and (e.total - e.overhead) * factor + e.overhead * max(len(used), 1) <= free * FILL

        max_ctx = space.model.max_positions if isinstance(space.model.max_positions, int) else 131072
        out: dict[str, Any] = {
            # prompt lookup (transformers' assisted decoding) takes one row per call (PROMPT-LOOKUP-BATCH)
            "max_batch_size": 1 if cand.prompt_lookup else largest(1, 4096, lambda b: fits(b, w.prompt_len)),
            "max_prompt_len": largest(1, max(1, max_ctx - w.new_tokens), lambda p: fits(w.batch_size, p)),
            "model_max_positions": space.model.max_positions if isinstance(space.model.max_positions, int) else None,
            "calibration": round(factor, 3),
            "budget_gib": round(free / GIB, 2),
            "checked": False,
        }
        out["estimated"] = {"max_batch_size": out["max_batch_size"], "max_prompt_len": out["max_prompt_len"]}
        if space.device != "cuda":
            # the largest batch is compute-bound on a CPU: a run there takes minutes to hours
            out["checked"] = "not on the CPU: a run at the largest batch would take far longer than the tune"
        elif check and self.bench.runner is not None and out["max_batch_size"] and out["max_prompt_len"]:
            out.update(self.check(pick, out, free))
            fit = out.get("max_batch_size")
            if out.get("checked") is True and fit and fit != out["estimated"]["max_batch_size"]:
                e = est(fit, w.prompt_len)
                if e is not UNKNOWN and e.total > e.overhead:
                    # the factor that makes the estimate put its limit where the runs did
                    out["calibration_from_check"] = round((free - e.overhead * max(len(used), 1)) / (e.total - e.overhead), 3)
        return out

    def check(self, pick: Trial, cap: dict[str, Any], free: int) -> dict[str, Any]:
        """Run the pick at the estimated largest batch and longest prompt (one process for
        both); for a shape that does not fit, search down with real runs for at most
        ``MAX_SEARCH_RUNS`` more: 90 % of it first (the estimate is usually close), then the
        point where the peaks measured so far (``held_gib``), extrapolated linearly, reach the
        budget, else the geometric middle of what ran and what failed. The figure reported is the largest that ran."""
        w = self.space.workload
        dims = {"max_batch_size": "batch_size", "max_prompt_len": "prompt_len"}
        budget_gib = free / GIB
        peak0 = max((held_gib(r) for r in pick.results if r.get("status") == STATUS_OK), default=0.0)
        # (size, GiB held) of shapes that ran: the measurement itself, then each check that fitted
        points: dict[str, list[tuple[int, float]]] = {k: ([(getattr(w, d), peak0)] if peak0 else []) for k, d in dims.items()}
        lo = {k: getattr(w, d) for k, d in dims.items()}  # ran in the measurement itself
        hi: dict[str, int | None] = {k: None for k in dims}  # smallest that failed
        trying = {k: cap[k] for k in dims}
        out: dict[str, Any] = {"checks": []}
        runs = 0
        for attempt in range(1 + MAX_SEARCH_RUNS):
            if not trying or not self.bench.budget_left():
                break
            shapes = [{"batch_size": w.batch_size, "prompt_len": w.prompt_len, dims[k]: v} for k, v in trying.items()]
            spec = {**self.bench.spec(pick), "capacity": shapes, "fault": None, "label": pick.label + " (capacity check)"}
            key = self.bench.cache.key_of(pick.config, "capacity", shapes) if self.bench.cache else None
            r = self.bench.run_spec(key, spec)
            runs += 1
            checks = r.get("capacity_checks") or []
            out["checks"].extend(checks or [{"error": r.get("error", r.get("status"))}])
            if r.get("status") != STATUS_OK or len(checks) != len(shapes):
                out["checked"] = "failed: " + str(r.get("error", r.get("status")))[:200]
                break
            for (k, v), c in zip(list(trying.items()), checks):
                if c.get("fits"):
                    lo[k] = max(lo[k], v)
                    peak = held_gib(c)
                    if peak:
                        points[k].append((v, peak))
                else:
                    hi[k] = v if hi[k] is None else min(hi[k], v)
            trying = {}
            for k in dims:
                nxt = next_try(lo[k], hi[k], points[k], budget_gib, first=attempt == 0)
                if nxt is not None:
                    trying[k] = nxt
        for k in dims:
            out[k] = lo[k]
        out["checked"] = out.get("checked", any("fits" in c for c in out["checks"]))
        out["runs"] = runs
        return out


def held_gib(r: dict[str, Any]) -> float:
    """What a run held on its GPUs at its peak: the caching allocator's reserved bytes where the
    worker reports them (what runs out: on an H200 a 7 B int8 check at batch 1,035 failed with
    116 GiB allocated and 136 GiB reserved, and the reserved peaks of the batches that ran grew
    17 % faster than the allocated ones), else the allocated peak."""
    held = r.get("gpu_reserved_gib") or r.get("gpu_peak_gib") or {}
    return float(sum(held.values())) if isinstance(held, dict) else 0.0


def next_try(lo: int, hi: int | None, points: list[tuple[int, float]], budget_gib: float, *, first: bool) -> int | None:
    """The next size to run between ``lo`` (ran) and ``hi`` (failed), or None when the bracket
    is narrow enough (``RESOLUTION``) or the measured peaks say ``lo`` is at the budget."""
    if hi is None or hi - lo <= max(1, int(RESOLUTION * lo)):
        return None
    if first:
        guess = int(hi * 0.9)
    else:
        guess = 0
        pts = sorted(set(points))
        if len(pts) >= 2 and pts[-1][0] > pts[-2][0]:
            (b1, p1), (b2, p2) = pts[-2], pts[-1]
            slope = (p2 - p1) / (b2 - b1)
            if slope > 0:
                guess = int(b2 + (budget_gib * 0.97 - p2) / slope)  # where the line reaches 97 % of the budget
                if guess <= lo * (1 + RESOLUTION):
                    return None  # the peaks say what ran is already at the limit
        if not lo < guess < hi:
            guess = int(round((lo * hi) ** 0.5))  # geometric: the estimate may be off by a factor
    guess = min(max(guess, lo + 1), hi - 1)
    return guess if lo < guess < hi else None
