"""Running and timing trials: each measurement is one run of the candidate runner (a fresh
process), reused from the result cache where it was taken before, within the time budget."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from typing import Any, Callable, Iterable

from .config import Workload, parse_config
from .memory import CUDA_CONTEXT, GIB
from .trial import STATUS_OK, Trial

# Proxy steps per screened candidate: GPU kernel time of this many decode steps (after one warm-up).
SCREEN_STEPS = 32


def text_dependent(cfg: dict[str, Any]) -> bool:
    """Whether a candidate's speed depends on what the prompts say, not only on their shape:
    prompt-lookup decoding accepts as many tokens per forward as the prompt predicts."""
    return bool((cfg.get("generate") or {}).get("prompt_lookup_num_tokens"))


def mark_not_applicable(t: Trial, result: dict[str, Any]) -> bool:
    """Where ``result`` (a run's, or a screen row's) says the candidate's option changes nothing in
    this model (the worker's :class:`autotune.errors.NotApplicable`: nothing to fuse, no grouped
    heads), mark ``t`` not measured, with the worker's reason: it would be another candidate
    under its name. Returns whether it did."""
    if not result.get("not_applicable"):
        return False
    t.status, t.reason = "not measured", str(result.get("error", "")).split(": ", 1)[-1][:300]
    return True


class OnBench:
    """What a tuner exposes of its :class:`Bench`: the trials, when the tune started, and a
    search run so that Ctrl-C keeps what was measured."""

    bench: "Bench"
    notes: list[str]

    def run_search(self, search: Callable[[], None]) -> bool:
        """Run ``search``; True if it was interrupted. Trials never reached are marked so."""
        interrupted = False
        try:
            search()
        except KeyboardInterrupt:
            interrupted = True
            self.notes.append("interrupted: results so far are kept in the cache; run again to resume")
        for t in self.trials:
            if t.status == "planned":
                t.status, t.reason = "not measured", "interrupted" if interrupted else "not reached"
        return interrupted

    @property
    def trials(self) -> list[Trial]:
        return self.bench.trials

    @property
    def start(self) -> float:
        return self.bench.start

    @start.setter
    def start(self, value: float) -> None:
        self.bench.start = value


class Bench:
    def __init__(self, model_path: str, workload: Workload, *, runner: Any, cache: Any = None, reps: int = 3,
                 faults: dict[str, str] | None = None, progress: Callable[[str, int, int], None] | None = None,
                 candidate_timeout: float | None = None, time_budget: float | None = None,
                 max_memory: dict[str, int] | None = None, prompt_ids: Any = None) -> None:
        """``prompt_ids``: the token ids of the user's prompts (``--prompts``), timed by the
        candidates whose speed depends on the text (:func:`text_dependent`); every other
        candidate decodes random tokens of the same shape, at the same speed."""
        self.path = model_path
        self.prompt_ids = [list(p) for p in prompt_ids] if prompt_ids else None
        self.workload = workload
        self.runner = runner
        self.cache = cache
        self.reps = reps
        self.faults = faults or {}
        self.progress = progress or (lambda label, done, total: None)
        self.candidate_timeout = candidate_timeout
        self.time_budget = time_budget
        self.max_memory = max_memory
        self.trials: list[Trial] = []
        self.calibration: list[float] = []
        self.start = time.perf_counter()
        # every run in order: what it was, when it started and how long it took (where the tune's time went)
        self.timeline: list[dict[str, Any]] = []
        # runs the worker saw disturbed by other work on the machine (not cached; noted)
        self.contended: list[str] = []

    # ---- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget_left(self) -> bool:
        return self.time_budget is None or self.elapsed() < self.time_budget

    # ---- bookkeeping
    def add(self, trials: Iterable[Trial]) -> list[Trial]:
        """Adds trials not seen before (by label); returns the new ones."""
        out = []
        for t in trials:
            if any(x.label == t.label for x in self.trials):
                continue
            self.trials.append(t)
            out.append(t)
        return out

    def counts(self) -> tuple[int, int]:
        """(runs done, runs planned so far): planned grows as stages are opened."""
        done = len(self.timeline)  # every run so far (the screen and capacity checks too), so the count only rises
        waiting = sum(1 for t in self.trials if t.status == "planned" and not t.results)
        return done, done + max(waiting, 1)

    def fault(self, label: str) -> str | None:
        """The failure a test injects into this candidate, if any."""
        return next((v for k, v in self.faults.items() if fnmatch.fnmatchcase(label, k)), None)

    def spec(self, t: Trial) -> dict[str, Any]:
        spec = {
            "model": self.path,
            "label": t.label,
            "config": t.config,
            "workload": dataclasses.asdict(self.workload),
            "reps": self.reps,
            "min_reps": min(2, self.reps),
            "rep_spread": 0.10,
            "nproc": parse_config(t.config).tp_size or 1,
            "quality_steps": 4,
            "seed": 0,
            "memory_budget": self.max_memory,
            "fault": self.fault(t.label),
            "timeout_s": self.candidate_timeout,
        }
        if self.prompt_ids and text_dependent(t.config):
            spec["prompt_ids"] = self.prompt_ids
        return spec

    def run_spec(self, key: str | None, spec: dict[str, Any], shown: str | None = None) -> dict[str, Any]:
        """One run of ``spec`` (or its cached result); ``shown``: what the progress line calls it
        (default: its label)."""
        cached = self.cache.get(key) if key and self.cache else None
        if cached is not None:
            self.timeline.append({"label": spec["label"], "start_s": round(self.elapsed(), 1), "wall_s": 0.0, "cached": True})
            return cached
        self.progress(shown or spec["label"], *self.counts())
        t0 = self.elapsed()
        result = self.runner.run(spec)
        self.timeline.append({"label": spec["label"], "start_s": round(t0, 1), "wall_s": round(self.elapsed() - t0, 1), "cached": False})
        return self._keep(key, spec["label"], result)

    def _keep(self, key: str | None, label: str, result: dict[str, Any]) -> dict[str, Any]:
        """A fresh result into the cache — unless something else loaded the machine meanwhile."""
        if result.get("contention"):
            self.contended.append(f"{label}: {result['contention']}")
        elif key and self.cache:  # a run taken while something else loaded the machine is never reused
            self.cache.put(key, result)
        return result

    # ---- measuring
    def measure(self, t: Trial, launched: Any = None) -> None:
        """One full measurement of ``t`` (load, warm-up, timed runs, logits) in a fresh process;
        ``launched``: its process already started by :meth:`launch` (released here)."""
        if launched is not None:
            self.record(t, self.finish(launched))
            return
        if t.status == "dropped":
            return
        if not self.budget_left():
            if t.status == "planned":
                t.status, t.reason = "not measured", f"time budget of {self.time_budget:.0f} s spent"
            return
        key = self.cache.trial_key(t, len(t.results)) if self.cache else None
        # a finalist measured again says so: the progress log does not list one candidate twice unexplained
        shown = f"{t.label} (again: run {len(t.results) + 1})" if t.results else None
        self.record(t, self.run_spec(key, self.spec(t), shown))

    def record(self, t: Trial, result: dict[str, Any]) -> None:
        over = self.over_host_budget(result)
        if over:
            result = {**result, "status": "error", "oom": True, "error": over}
        t.results.append(result)
        st = result.get("status")
        if st == STATUS_OK:
            t.status = STATUS_OK
            peak = sum((result.get("gpu_peak_gib") or {}).values())
            # calibrate on runs whose estimate is not mostly the fixed CUDA-context allowance
            if peak and t.estimate_gib and t.estimate_gib - CUDA_CONTEXT / GIB >= 0.25:
                self.calibration.append(peak / (t.estimate_gib - CUDA_CONTEXT / GIB))
        elif t.status != STATUS_OK and not mark_not_applicable(t, result):
            t.status = st or "error"
            t.reason = result.get("error", "")
            if result.get("oom"):
                t.reason = "out of memory: " + t.reason

    # ---- warming up beside each other
    def can_launch(self) -> bool:
        return callable(getattr(self.runner, "launch", None))

    def launch(self, trials: Iterable[Trial], *, later: int = 0) -> dict[str, Any]:
        """Start the measurements of ``trials`` now, all at once, each held before its timed runs
        (the runner's :meth:`~autotune.runner.ForkRunner.launch`): their loads and warm-ups —
        for a compiled static cache, the compile — overlap, and :meth:`measure` later times each
        alone. ``later``: these are each trial's measurement that many after the next (its
        result-cache key). Returns {label: launched}; a trial left out (dropped, cached, out of
        budget, a runner that cannot launch, tensor parallel) is measured the plain way."""
        out: dict[str, Any] = {}
        if not self.can_launch() or not self.budget_left():
            return out
        for t in trials:
            if t.status not in ("planned", STATUS_OK):
                continue
            key = self.cache.trial_key(t, len(t.results) + later) if self.cache else None
            spec = self.spec(t)
            if (key and self.cache and self.cache.get(key) is not None) or spec["nproc"] > 1:
                continue
            self.progress(f"{t.label} (warming up beside others)", *self.counts())
            out[t.label] = {"key": key, "run": self.runner.launch(spec), "start_s": self.elapsed(), "label": t.label}
        return out

    def warm(self, launched: dict[str, Any]) -> None:
        """Until every launched process has warmed up (or ended): nothing may be timed before."""
        for item in launched.values():
            item["run"].wait_warm()

    def cancel(self, launched: dict[str, Any], keep: Iterable[str] = ()) -> None:
        """End the launched processes not in ``keep`` (e.g. started ahead of a screen that ruled them out)."""
        keep = set(keep)
        for label in [k for k in launched if k not in keep]:
            item = launched.pop(label)
            if item.get("done"):
                continue
            item["run"].cancel()
            self.timeline.append({"label": f"{label} (ended unmeasured)", "start_s": round(item["start_s"], 1),
                                  "wall_s": round(self.elapsed() - item["start_s"], 1), "cached": False})

    def finish(self, item: dict[str, Any]) -> dict[str, Any]:
        run = item["run"]
        item["done"] = True
        run.wait_warm()
        run.release()
        t0 = self.elapsed()
        result = run.result()
        self.timeline.append({"label": item["label"], "start_s": round(item["start_s"], 1), "wall_s": round(self.elapsed() - item["start_s"], 1),
                              "cached": False, "warm_s": result.get("warm_s"), "released_s": round(t0, 1)})
        return self._keep(item["key"], item["label"], result)

    def over_host_budget(self, result: dict[str, Any]) -> str | None:
        """--max-memory cpu=... on a run that used no GPU: a process cannot be capped in RAM
        without breaking torch (its address space is far larger than what it uses), so the
        budget is held to after the run: a peak resident size beyond it fails the candidate."""
        budget = (self.max_memory or {}).get("cpu")
        peak = result.get("host_peak_gib")
        if budget is None or result.get("status") != STATUS_OK or result.get("gpu_peak_gib") or not isinstance(peak, (int, float)):
            return None
        if peak * GIB > budget:
            return f"used {peak:.2f} GiB of RAM at its peak, beyond --max-memory cpu={budget / GIB:.2f}GiB"
        return None

    def screen(self, trials: list[Trial]) -> bool:
        """The cheap proxy for the compiled regime, for every trial in one process: the GPU
        kernel time of a decode step with a static cache, uncompiled (host work and launch gaps,
        which CUDA graphs remove, do not count). Fills ``t.screen``; False if no proxy was taken."""
        todo = [t for t in trials if t.status != "dropped"]
        if not todo or not self.budget_left():
            return False
        spec = {**self.spec(todo[0]), "label": f"screen: {len(todo)} candidates by GPU time per decode step", "fault": None,
                "screen": [{"label": t.label, "config": t.config, "fault": self.fault(t.label)} for t in todo], "screen_steps": SCREEN_STEPS}
        key = self.cache.key_of("screen", [t.config for t in todo], SCREEN_STEPS) if self.cache else None
        result = self.run_spec(key, spec)
        rows = {r.get("label"): r for r in result.get("screen") or []}
        for t in todo:
            r = rows.get(t.label)
            if r and r.get("status") == STATUS_OK and not isinstance(r.get("step_ms"), (int, float)):
                r = {**r, "status": "error", "error": "the screen reported no step time"}
            t.screen = dict(r) if r else {"status": "error", "error": result.get("error") or "the screen returned no row for it"}
        return any(t.screen.get("status") == STATUS_OK for t in todo)
