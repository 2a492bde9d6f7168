"""tune(): measure the options that can run on this machine and return the fastest that works.

The search runs in stages, each carrying only the best option forward:

1. attention (at the preferred dtype: bf16 on Ampere+, fp16 below, fp32 on the CPU);
   SDPA backends as separate options when the prompt is long enough for them to matter;
2. dtype (with the best attention);
3. KV cache and compilation (dynamic; static, compiled by transformers on CUDA; static
   with ``disable_compile``);
4. quantization (bitsandbytes 8-bit, 4-bit NF4/FP4) for the memory objective, when asked,
   or when the model does not fit otherwise;
placement (``{"": 0}``, else ``device_map="auto"`` with ``max_memory``) follows the memory fit.

Rules and the memory estimate drop what cannot run before anything is loaded. The finalists
are re-measured head to head in fresh processes before the pick.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__
from .config import Candidate, Workload, launch_command, parse_config, parse_max_memory
from .engine import run as run_rules
from .errors import UserError
from .facts import UNKNOWN, Facts
from .memory import CUDA_CONTEXT, GIB, estimate, gpu_budget
from .model import ModelSpec, read_model
from .quality import HALF_REFERENCE_FLOOR, compare, verdict

OBJECTIVES = ("throughput", "latency", "memory")
# A stage carries forward the simplest option within this fraction of the stage's fastest:
# the dynamic-cache candidates a stage compares move by +-20 % between fresh processes on an
# H100 (docs/PERFORMANCE.md), so a few per cent there is noise, and the choice decides what is
# compiled next. The final pick uses the confidence interval alone.
STAGE_MARGIN = 0.10
STATUS_OK = "ok"


@dataclass
class Trial:
    label: str
    stage: str
    config: dict[str, Any]
    simplicity: int = 0  # lower is simpler: no quantization, no extra package, no compile
    status: str = "planned"  # planned / dropped / ok / wrong / error / crashed / timeout / not measured
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    estimate_gib: Any = None
    results: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)

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
    ci = t.ci("decode_tok_s")
    return {
        "decode_tok_s": _r(t.median("decode_tok_s")),
        "decode_tok_s_ci95": [_r(ci[0]), _r(ci[1])] if ci else None,
        "ttft_ms": _r((t.median("ttft_s") or 0) * 1000),
        "total_s": _r(t.median("total_s"), 3),
        "itl_p50_ms": _r((t.metric("itl_p50_s") or 0) * 1000),
        "itl_p99_ms": _r((t.metric("itl_p99_s") or 0) * 1000),
        "load_s": _r(t.metric("load_s"), 2),
        "compile_s": _r(t.metric("compile_s"), 1),
        "gpu_peak_gib": t.gpu_peak_gib(),
        "host_peak_gib": t.metric("host_peak_gib"),
        "runs": len(t.values("decode_tok_s")),
    }


def _r(x: Any, nd: int = 1) -> Any:
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------------------- candidates
def _config(dtype: str, attn: str, *, backend: str | None = None, cache: str | None = None, compile_: bool = True,
            quant: str | None = None, compute: str | None = None, device_map: Any = None, max_memory: Any = None) -> dict[str, Any]:
    fp: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if device_map is not None:
        fp["device_map"] = device_map
    if max_memory:
        fp["max_memory"] = max_memory
    if quant:
        q: dict[str, Any] = {"quant_method": "bitsandbytes"}
        if quant == "bnb-8bit":
            q["load_in_8bit"] = True
        else:
            q.update(load_in_4bit=True, bnb_4bit_quant_type=quant.split("-")[-1], bnb_4bit_compute_dtype=compute or dtype)
        fp["quantization_config"] = q
    gen: dict[str, Any] = {}
    if cache:
        gen["cache_implementation"] = cache
        gen["disable_compile"] = not compile_
    return {"from_pretrained": fp, "generate": gen, "runtime": {"sdpa_backend": backend}}


def label_of(cfg: dict[str, Any]) -> str:
    return parse_config(cfg).label()


def _simplicity(attn: str, quant: str | None, cache: str | None, compile_: bool, backend: str | None) -> int:
    s = 0
    s += {"sdpa": 0, "eager": 1, "flex_attention": 2}.get(attn, 3)  # flash_attention_* need an extra package
    s += 10 if quant else 0
    s += 2 if backend else 0
    s += (1 if compile_ else 3) if cache else 0
    return s


def pinned_axes(fixed: dict[str, str] | None) -> dict[str, str]:
    """Validate the axes a caller pins instead of searching ({"dtype", "attention", "cache"});
    the dtype in its canonical spelling. Raises UserError / ConfigError with one line."""
    from .config import parse_dtype

    out = dict(fixed or {})
    bad = set(out) - {"dtype", "attention", "cache"}
    if bad:
        raise UserError(f"cannot fix {sorted(bad)[0]!r}; fixable axes are dtype, attention, cache")
    if "dtype" in out:
        out["dtype"] = parse_dtype(out["dtype"], "dtype")
    if "attention" in out:
        parse_config({"attn_implementation": out["attention"]})
    if out.get("cache") not in (None, "dynamic", "static"):
        raise UserError("cache must be dynamic or static")
    return out


def _placement_cost(c: Any) -> int:
    """Placement's share of simplicity: one GPU < a device_map split < tensor parallel (torchrun) < CPU offload."""
    if c.tensor_parallel:
        return 4
    if isinstance(c.max_memory, dict) and "cpu" in c.max_memory:
        return 8
    if c.device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return 2
    return 0


def preferred(facts: Facts) -> tuple[str, str]:
    """(device, preferred dtype) for this machine."""
    gpus = facts.gpus if facts.gpus is not UNKNOWN else ()
    cuda = bool(gpus) and facts.torch_cuda not in (None, UNKNOWN)
    if not cuda:
        flags = (facts.host or {}).get("cpu_flags", []) if isinstance(facts.host, dict) else []
        return "cpu", "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"
    ampere = all(g.capability is not None and g.capability.at_least(8) for g in gpus)
    return "cuda", "bfloat16" if ampere else "float16"


# ---------------------------------------------------------------------------- the tuner
@dataclass
class TuneResult:
    config: dict[str, Any]
    trials: list[Trial]
    pick: Trial | None
    baseline: Trial | None
    facts: Facts
    model: ModelSpec
    workload: Workload
    objective: str
    wall_s: float
    measured: bool
    notes: list[str] = field(default_factory=list)
    capacity: dict[str, Any] = field(default_factory=dict)
    quality_floor: Any = None
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "config": self.config,
            "pick": self.pick.label if self.pick else None,
            "baseline": self.baseline.label if self.baseline else None,
            "measured": self.measured,
            "objective": self.objective,
            "workload": dataclasses.asdict(self.workload),
            "wall_s": round(self.wall_s, 1),
            "interrupted": self.interrupted,
            "quality_floor_kl": self.quality_floor,
            "capacity": self.capacity,
            "notes": self.notes,
            "trials": [t.to_dict() for t in self.trials],
        }


class Tuner:
    def __init__(
        self,
        model_path: str | Path,
        *,
        facts: Facts,
        workload: Workload,
        objective: str = "throughput",
        time_budget: float | None = None,
        quantization: str = "auto",
        max_memory: dict[str, int] | None = None,
        min_throughput: float = 0.0,
        reps: int = 3,
        finalist_rounds: int = 2,
        runner: Any = None,
        cache: "ResultCache | None" = None,
        faults: dict[str, str] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        candidate_timeout: float | None = None,
        headroom_gib: float = 1.0,
        fixed: dict[str, str] | None = None,
        check_capacity: bool = True,
        model: ModelSpec | None = None,
    ) -> None:
        """``model``: the already-read :class:`ModelSpec` of ``model_path`` (else it is read here).
        ``faults`` (tests only) maps a glob over candidate labels to crash / hang / oom / corrupt.
        ``fixed`` pins axes the caller has decided: {"dtype": ..., "attention": ..., "cache": "dynamic" | "static"}.
        ``headroom_gib``: per GPU, kept free beyond the estimate when max_memory is derived for a device_map split."""
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
        if quantization not in ("auto", "always", "never"):
            raise UserError("quantization must be auto, always or never")
        self.path = str(model_path)
        self.model = model if model is not None else read_model(model_path)
        self.facts = facts
        self.workload = workload
        self.objective = objective
        self.time_budget = time_budget
        self.quantization = quantization
        self.max_memory = max_memory
        self.min_throughput = min_throughput
        self.reps = reps
        self.finalist_rounds = finalist_rounds
        self.runner = runner
        self.cache = cache
        self.faults = faults or {}
        self.progress = progress or (lambda label, done, total: None)
        self.candidate_timeout = candidate_timeout
        if headroom_gib < 0:
            raise UserError("headroom must be >= 0 GiB")
        self.headroom = int(headroom_gib * GIB)
        self.fixed = pinned_axes(fixed)
        self.check_capacity = check_capacity
        self.trials: list[Trial] = []
        self.notes: list[str] = []
        self.start = time.perf_counter()
        self.device, self.half = preferred(facts)
        # the rules and the estimate judge against the user's budget where it is below what is free
        self.judge_facts = facts
        if max_memory and facts.gpus not in (UNKNOWN, ()):
            self.judge_facts = facts.replace(gpus=tuple(
                dataclasses.replace(g, memory_free_gib=min(max_memory[str(g.index)] / GIB, g.memory_free_gib if isinstance(g.memory_free_gib, (int, float)) else float("inf")))
                if str(g.index) in max_memory else g for g in facts.gpus))
        self.calibration: list[float] = []

    # ---- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget_left(self) -> bool:
        return self.time_budget is None or self.elapsed() < self.time_budget

    def gpu_indexes(self) -> list[int]:
        return [g.index for g in self.facts.gpus] if self.device == "cuda" else []

    def budget(self, index: int) -> int | None:
        """Bytes GPU ``index`` may hold: the user's --max-memory, else its free memory."""
        if self.max_memory and str(index) in self.max_memory:
            return self.max_memory[str(index)]
        b = gpu_budget(self.facts, index, Candidate())
        return None if b is UNKNOWN else b

    def fits_one(self, est: Any) -> bool | None:
        """Does GPU 0 hold it (None: the estimate or the budget is unknown)?"""
        budget = self.budget(0)
        return None if est is UNKNOWN or budget is None else est.total <= budget

    def fits_gpus(self, est: Any) -> bool:
        """Do the visible GPUs together hold it, each keeping its context and the headroom? (unknown: yes)"""
        if est is UNKNOWN:
            return True
        usable = sum(max((self.budget(i) or 0) - est.overhead - self.headroom, 0) for i in self.gpu_indexes())
        return est.total - est.overhead <= usable

    def placement(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """{"": 0} when GPU 0 holds it (by the estimate), else device_map="auto" with max_memory."""
        if self.device == "cpu":
            return {"device_map": "cpu"}
        est = estimate(parse_config(cfg, workload=self.workload), self.model, self.facts)
        if self.fits_one(est) is not False:
            return {"device_map": {"": 0}}
        return {"device_map": "auto", "max_memory": self.split_memory(est, self.gpu_indexes(), offload=not self.fits_gpus(est))}

    def split_memory(self, est: Any, gpus: list[int], *, offload: bool = False) -> dict[str, str]:
        """max_memory for a device_map split. accelerate places *weights* up to these numbers, so
        each GPU keeps back the CUDA context, its share of the KV cache and activations, and the
        user's headroom; the CPU is named only for offload (the last resort)."""
        out = {}
        share = (est.kv_cache + est.activations) / max(len(gpus), 1) if est is not UNKNOWN else 0
        overhead = est.overhead if est is not UNKNOWN else 0
        for i in gpus:
            b = self.budget(i) or 0
            out[str(i)] = f"{max(b - overhead - share - self.headroom, 0.25 * GIB) / GIB:.2f}GiB"
        if offload:
            host = self.facts.host if isinstance(self.facts.host, dict) else {}
            ram = host.get("ram_available_gib") or host.get("ram_gib")
            if self.max_memory and "cpu" in self.max_memory:
                out["cpu"] = f"{self.max_memory['cpu'] / GIB:.2f}GiB"
            elif ram:
                out["cpu"] = f"{ram * 0.8:.1f}GiB"
        return out

    def make(self, stage: str, dtype: str, attn: str, *, backend: str | None = None, cache: str | None = None,
             compile_: bool = True, quant: str | None = None) -> Trial:
        base = _config(dtype, attn, backend=backend, cache=cache, compile_=compile_, quant=quant, compute=self.half if quant else None)
        place = self.placement(base)
        base["from_pretrained"].update(place)
        return self.trial(stage, base)

    def trial(self, stage: str, cfg: dict[str, Any], label: str | None = None) -> Trial:
        c = parse_config(cfg, workload=self.workload)
        simple = _simplicity(c.attn_implementation or "sdpa", None if c.quantization == "none" else c.quantization,
                             c.cache_implementation, c.compile, c.sdpa_backend) + _placement_cost(c)
        t = Trial(label=label or label_of(cfg), stage=stage, config=cfg, simplicity=simple)
        self.judge(t)
        return t

    def judge(self, t: Trial) -> None:
        """Rules and the memory estimate, before anything is loaded."""
        cand = parse_config(t.config, workload=self.workload)
        res = run_rules(self.judge_facts, cand, self.model)
        errors = [f for f in res.findings if f.severity == "error"]
        t.warnings = [f"{f.rule}: {f.message}" for f in res.findings if f.severity == "warning"]
        est = estimate(cand, self.model, self.facts, on_gpu=self.device == "cuda")
        if est is not UNKNOWN:
            t.estimate_gib = round(est.total / GIB, 3)
        if errors:
            t.status = "dropped"
            t.reason = "; ".join(f"{f.rule}: {f.message}" for f in errors)

    def add(self, trials: Iterable[Trial]) -> list[Trial]:
        out = []
        for t in trials:
            if any(x.label == t.label for x in self.trials):
                continue
            self.trials.append(t)
            out.append(t)
        return out

    # ---- measuring
    def spec(self, t: Trial) -> dict[str, Any]:
        return {
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
            "fault": next((v for k, v in self.faults.items() if fnmatch.fnmatchcase(t.label, k)), None),
            "timeout_s": self.candidate_timeout,
        }

    def measure(self, t: Trial) -> None:
        if t.status == "dropped":
            return
        if not self.budget_left():
            if t.status == "planned":
                t.status, t.reason = "not measured", f"time budget of {self.time_budget:.0f} s spent"
            return
        key = self.cache.trial_key(t, len(t.results)) if self.cache else None
        cached = self.cache.get(key) if key else None
        if cached is not None:
            result = cached
        else:
            self.progress(t.label, *self._counts())
            result = self.runner.run(self.spec(t))
            if key:
                self.cache.put(key, result)
        t.results.append(result)
        st = result.get("status")
        if st == STATUS_OK:
            t.status = STATUS_OK
            peak = sum((result.get("gpu_peak_gib") or {}).values())
            # calibrate on runs whose estimate is not mostly the fixed CUDA-context allowance
            if peak and t.estimate_gib and t.estimate_gib - CUDA_CONTEXT / GIB >= 0.25:
                self.calibration.append(peak / (t.estimate_gib - CUDA_CONTEXT / GIB))
        elif t.status != STATUS_OK:
            t.status = st or "error"
            t.reason = result.get("error", "")
            if result.get("oom"):
                t.reason = "out of memory: " + t.reason

    def _counts(self) -> tuple[int, int]:
        """(runs done, runs planned so far): planned grows as stages are opened."""
        done = sum(len(t.results) for t in self.trials if t.stage != "baseline" or not t.reason)
        waiting = sum(1 for t in self.trials if t.status == "planned" and not t.results)
        return done, done + max(waiting, 1)

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
        lo = min((top.ci("decode_tok_s") or (0, 0))[0], (1 - margin) * (top.median("decode_tok_s") or 0))
        close = [t for t in ok if (t.median("decode_tok_s") or 0) >= lo]  # its median inside the top's interval
        return min(close, key=lambda t: (t.simplicity, -self.score(t)))

    def score(self, t: Trial) -> float:
        if self.objective == "latency":
            return -(t.median("total_s") or float("inf"))
        if self.objective == "memory":
            peak = t.gpu_peak_gib() or t.metric("host_peak_gib") or float("inf")
            ok_speed = (t.median("decode_tok_s") or 0) >= self.min_throughput
            return (1e6 if ok_speed else 0) - peak
        return t.median("decode_tok_s") or 0.0

    # ---- the search
    def run(self) -> TuneResult:
        interrupted = False
        try:
            self._search()
        except KeyboardInterrupt:
            interrupted = True
            self.notes.append("interrupted: results so far are kept in the cache; run again to resume")
        for t in self.trials:
            if t.status == "planned":
                t.status, t.reason = "not measured", "interrupted" if interrupted else "not reached"
        floor = self._check_quality()
        self._compile_breakeven()
        pick = self._choose()
        capacity: dict[str, Any] = {}
        if pick:
            try:
                capacity = self._capacity(pick, check=self.check_capacity and not interrupted)
            except KeyboardInterrupt:
                interrupted = True
                self.notes.append("interrupted during the capacity check: capacity is from the memory model only")
                capacity = self._capacity(pick, check=False)
        config = self._config_dict(pick) if pick else {}
        baseline = next((t for t in self.trials if t.stage == "baseline"), None)
        return TuneResult(
            config=config, trials=self.trials, pick=pick, baseline=baseline, facts=self.facts, model=self.model, workload=self.workload,
            objective=self.objective, wall_s=self.elapsed(), measured=True, notes=self.notes, capacity=capacity,
            quality_floor=floor, interrupted=interrupted,
        )

    def _search(self) -> None:
        first = self.half
        # baseline: transformers' defaults, as a user loads it (dtype as the checkpoint, sdpa, dynamic cache)
        base_cfg = {"from_pretrained": {"device_map": "cuda" if self.device == "cuda" else "cpu"}, "generate": {}, "runtime": {}}
        baseline = Trial(label="baseline: from_pretrained(device_map) defaults", stage="baseline", config=base_cfg, simplicity=0)
        self.judge(baseline)
        # the reference for correctness: float32, eager (the most precise path that fits)
        first = self.fixed.get("dtype", first)
        attentions = [self.fixed["attention"]] if "attention" in self.fixed else self._attentions()
        stage1 = [self.make("attention", first, a) for a in attentions]
        if self.device == "cuda" and self.workload.prompt_len >= 1024 and self.fixed.get("attention", "sdpa") == "sdpa":
            stage1 += [self.make("attention", first, "sdpa", backend=b) for b in ("flash", "efficient", "cudnn")]
        self.add([baseline])
        for t in self.add(stage1):
            self.measure(t)
        twin = self._baseline_twin(baseline, stage1)
        if twin is not None:
            baseline.results, baseline.status = twin.results, twin.status
            baseline.reason = f"same configuration as '{twin.label}' on transformers {self.facts.package('transformers')}: measured once"
        else:
            self.measure(baseline)
        best_attn = self.best(stage1, margin=STAGE_MARGIN)
        if best_attn is None:
            self.notes.append("no attention implementation ran at the preferred dtype; trying float32")
        attn = best_attn.config["from_pretrained"]["attn_implementation"] if best_attn else "sdpa"
        backend = best_attn.config["runtime"].get("sdpa_backend") if best_attn else None

        dtypes = [] if "dtype" in self.fixed else ("bfloat16", "float16", "float32")
        stage2 = [self.make("dtype", d, attn, backend=backend) for d in dtypes if d != first]
        for t in self.add(stage2):
            self.measure(t)
        best_dtype = self.best(stage1 + stage2, margin=STAGE_MARGIN)
        dtype = best_dtype.config["from_pretrained"]["dtype"] if best_dtype else first
        if best_dtype:
            attn = best_dtype.config["from_pretrained"]["attn_implementation"]

        # transformers compiles the static cache on CUDA only; on the CPU it runs uncompiled.
        # On CUDA the uncompiled static cache is dominated by the dynamic one (docs/MEASURED.md:
        # 39.4 vs 44.7 tok/s), so it is measured only when the compiled one fails.
        if self.fixed.get("cache") == "dynamic":
            self.notes.append("static cache not measured: --cache dynamic")
        elif self.device == "cuda":
            compiled = self.make("cache", dtype, attn, backend=backend, cache="static", compile_=True)
            for t in self.add([compiled]):
                self.measure(t)
            plain = self.make("cache", dtype, attn, backend=backend, cache="static", compile_=False)
            self.add([plain])
            if compiled.status == STATUS_OK:
                plain.status, plain.reason = "not measured", "dominated: uncompiled static cache is slower than the dynamic cache (docs/MEASURED.md); measured only if compiling fails"
            else:
                self.measure(plain)
        else:
            for t in self.add([self.make("cache", dtype, attn, backend=backend, cache="static", compile_=False)]):
                self.measure(t)

        best_fp = self.best(self.trials)
        want_quant = self.quantization == "always" or (self.quantization == "auto" and (self.objective == "memory" or best_fp is None))
        if want_quant:
            stage4 = [self.make("quantization", dtype if dtype != "float32" else self.half, attn, quant=q) for q in ("bnb-4bit-nf4", "bnb-4bit-fp4", "bnb-8bit")]
            for t in self.add(stage4):
                self.measure(t)
        else:
            self.notes.append("quantization not measured: the model fits unquantized and the objective is not memory (use --quantization always)")

        self._placements()

        # the finalists, head to head in fresh processes, interleaved
        ranked = sorted((t for t in self.trials if t.status == STATUS_OK and t.stage != "baseline"), key=self.score, reverse=True)
        finalists = ranked[:2]
        if len(finalists) == 2:
            a, b = finalists
            if self.objective == "throughput" and self._decisive(a, b):
                self.notes.append(f"finalists not re-measured: {a.label} leads {b.label} by more than 3x the spread of either")
            else:
                for _ in range(self.finalist_rounds):
                    for t in finalists:  # interleaved, in fresh processes
                        self.measure(t)

    def _placements(self) -> None:
        """On several GPUs: the best configuration so far, placed every way that can apply —
        one GPU, device_map splits (auto; sequential when it differs), tensor parallel over
        2, 4, ... GPUs (torchrun), CPU offload only when nothing else holds the model."""
        gpus = self.gpu_indexes()
        if len(gpus) < 2:
            return
        top = self.best([t for t in self.trials if t.stage not in ("baseline", "placement")])
        if top is None:
            self.notes.append("placements not measured: no configuration ran")
            return
        fp = {k: v for k, v in top.config["from_pretrained"].items() if k not in ("device_map", "max_memory")}
        gen, rt = dict(top.config["generate"]), dict(top.config["runtime"])
        est = estimate(parse_config({"from_pretrained": fp, "generate": gen}, workload=self.workload), self.model, self.facts)
        fits_one = self.fits_one(est) is True

        def cfg(extra: dict[str, Any], launch: str | None = None, generate: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"from_pretrained": {**fp, **extra}, "generate": dict(gen if generate is None else generate),
                    "runtime": {**rt, "launch": launch} if launch else dict(rt)}

        split = self.split_memory(est, gpus)
        plans: list[Trial] = [self.trial("placement", cfg({"device_map": {"": 0}}))]
        plans.append(self.trial("placement", cfg({"device_map": "auto", "max_memory": split})))
        balanced = self.trial("placement", cfg({"device_map": "balanced", "max_memory": split}))
        balanced.status, balanced.reason = "not measured", ("same placement as device_map=\"auto\": transformers hands every strategy but "
                                                            "\"sequential\" to accelerate's get_balanced_memory (integrations/accelerate.py, 5.17)")
        plans.append(balanced)
        seq = self.trial("placement", cfg({"device_map": "sequential", "max_memory": split}))
        if fits_one and seq.status != "dropped":
            seq.status, seq.reason = "not measured", "same placement as one GPU: sequential fills GPU 0 first and the model fits there"
        plans.append(seq)
        heads, kv = self.model.num_heads, self.model.num_kv_heads
        k = 2
        while k <= len(gpus):
            tp = self.trial("placement", cfg({"distributed_config": {"tp_plan": "auto", "tp_size": k}}, launch=launch_command(k)))
            plans.append(tp)
            k *= 2
        if not self.fits_gpus(est):
            plans.append(self.trial("placement", cfg({"device_map": "auto", "max_memory": self.split_memory(est, gpus, offload=True)})))
        else:
            self.notes.append("CPU offload not measured: the model fits on the GPUs (offload is the last resort)")
        if heads is UNKNOWN or kv is UNKNOWN:
            self.notes.append("tensor parallel: head counts unknown, the rules could not check that they divide")
        for t in self.add(plans):
            if t.status == "planned":
                self.measure(t)
            # transformers' compiled static cache may not run on a split or sharded model: measure
            # the same placement with the dynamic cache rather than lose the placement
            if t.status not in (STATUS_OK, "dropped", "not measured") and gen.get("cache_implementation") and "out of memory" not in t.reason:
                plain = self.trial("placement", cfg(t.config["from_pretrained"], launch=t.config["runtime"].get("launch"), generate={}))
                for p in self.add([plain]):
                    self.measure(p)

    def _compile_breakeven(self) -> None:
        """For each compiled candidate: after how many generated tokens its compile time pays off."""
        for t in self.trials:
            if t.status != STATUS_OK or not t.config["generate"].get("cache_implementation") or t.config["generate"].get("disable_compile"):
                continue
            fp = t.config["from_pretrained"]
            twin = next((x for x in self.trials if x.status == STATUS_OK and not x.config["generate"] and x.stage != "baseline"
                         and x.config["from_pretrained"] == fp and x.config["runtime"] == t.config["runtime"]), None)
            comp, fast, slow = t.metric("compile_s"), t.median("decode_tok_s"), twin.median("decode_tok_s") if twin else None
            if comp and fast and slow and fast > slow:
                tokens = comp / (1 / slow - 1 / fast)
                t.quality["compile_breakeven_tokens"] = int(tokens)
                self.notes.append(f"{t.label}: compiling took {comp:.0f} s and pays off after about {tokens:,.0f} generated tokens "
                                  f"({tokens / self.workload.new_tokens:,.0f} requests of this workload) against {twin.label}")

    def _decisive(self, a: Trial, b: Trial) -> bool:
        ca, cb = a.ci("decode_tok_s"), b.ci("decode_tok_s")
        if not ca or not cb:
            return False
        spread = max(ca[1] - ca[0], cb[1] - cb[0], 1e-9)
        return (ca[0] - cb[1]) > 3 * spread and a.median("decode_tok_s") > 1.25 * b.median("decode_tok_s")

    def _baseline_twin(self, baseline: Trial, trials: list[Trial]) -> Trial | None:
        """transformers 5.x defaults (checkpoint dtype, sdpa, dynamic cache) may equal a candidate."""
        tv = self.facts.package("transformers")
        if not isinstance(tv, str) or int(tv.split(".")[0]) < 5:
            return None
        for t in trials:
            fp = t.config["from_pretrained"]
            if (fp.get("dtype") == self.model.checkpoint_dtype and fp.get("attn_implementation") == "sdpa" and not t.config["runtime"].get("sdpa_backend")
                    and not t.config["generate"] and fp.get("device_map") in ({"": 0}, "cpu") and t.status == STATUS_OK):
                return t
        return None

    def _attentions(self) -> list[str]:
        out = ["sdpa", "eager"]
        if self.device == "cuda":
            out += ["flash_attention_2", "flash_attention_3", "flash_attention_4"]
            if self.workload.prompt_len >= 2048:
                out.append("flex_attention")
            else:
                self.notes.append("flex_attention not measured: it compiles its kernels and only pays off on long prompts (>= 2048)")
        else:
            self.notes.append("flash attention and flex attention not measured on the CPU (CUDA only, or compile-bound there)")
        return out

    def _check_quality(self) -> Any:
        ok = [t for t in self.trials if t.status == STATUS_OK and t.results]
        if not ok:
            return None
        # reference: the most precise candidate that ran (float32, unquantized, eager preferred)
        def precision(t: Trial) -> tuple[int, int]:
            fp = t.config["from_pretrained"]
            dt = {"float32": 0, "bfloat16": 2, "float16": 1}.get(t.metric("dtype") or fp.get("dtype"), 3)
            return (dt + (10 if "quantization_config" in fp else 0), 0 if fp.get("attn_implementation") == "eager" else 1)

        ref = min(ok, key=precision)
        ref_logits = _logits(ref)
        if ref_logits is None:
            return None
        # noise floor: the same attention at a known-good half precision vs the reference
        halves = [t for t in ok if t is not ref and "quantization_config" not in t.config["from_pretrained"]
                  and t.config["from_pretrained"].get("dtype") in ("bfloat16", "float16")]
        kls = [compare(ref_logits, lg)["kl"] for lg in (_logits(t) for t in halves) if lg is not None]
        kls = [k for k in kls if k != float("inf")]
        floor = min(kls) if kls else 0.0  # the best-agreeing known-good half precision
        ref_dtype = ref.metric("dtype") or ref.config["from_pretrained"].get("dtype")
        if ref_dtype in ("bfloat16", "float16"):
            floor = max(floor, HALF_REFERENCE_FLOOR)
            self.notes.append(f"quality: the reference ({ref.label}) is {ref_dtype}, so no noise floor could be measured against float32; "
                              f"the floor measured between bf16 and fp32 on an H100 ({HALF_REFERENCE_FLOOR:g}) is used")
        for t in ok:
            lg = _logits(t)
            if lg is None:
                continue
            if t is ref:
                t.quality = {"reference": True, "kl": 0.0, "top1": 1.0}
                if not all(r.get("logits_finite", True) for r in t.results if r.get("status") == STATUS_OK):
                    t.status, t.reason = "wrong", "the reference's logits contain NaN/inf"
                continue
            m = compare(ref_logits, lg)
            quantized = "quantization_config" in t.config["from_pretrained"]
            good, why = verdict(m, floor, quantized)
            t.quality = {"kl": m["kl"], "top1": m["top1"], "reference": ref.label}
            if not good:
                t.status, t.reason = "wrong", why
        return floor

    def _choose(self) -> Trial | None:
        ok = [t for t in self.trials if t.status == STATUS_OK and t.stage != "baseline"]
        pick = self.best(ok)
        if pick is not None and pick is not max(ok, key=self.score):
            self.notes.append(f"picked {pick.label}: within the noise of the fastest ({max(ok, key=self.score).label}) and simpler")
        return pick

    def _capacity(self, pick: Trial, check: bool) -> dict[str, Any]:
        """Largest batch and prompt that fit, from the memory model calibrated on the measured
        peaks, then checked once: the pick generates at both shapes in one fresh process."""
        cand = parse_config(pick.config, workload=self.workload)
        factor = statistics.median(self.calibration) if self.calibration else 1.0
        if self.device == "cuda":
            from .engine import gpus_used

            used = gpus_used(cand, self.facts)
            used = used if isinstance(used, list) and used else [0]
            budgets = [self.budget(i) for i in used]
            if any(b is None for b in budgets):
                return {}
            free = sum(budgets)  # type: ignore[arg-type]
        else:
            used = []
            host = self.facts.host if isinstance(self.facts.host, dict) else {}
            free = int(host.get("ram_available_gib", host.get("ram_gib", 0)) * GIB)
        if not free:
            return {}

        def fits(batch: int, prompt: int) -> bool:
            w = Workload(batch_size=batch, prompt_len=prompt, new_tokens=self.workload.new_tokens, padding=self.workload.padding)
            est = estimate(dataclasses.replace(cand, workload=w), self.model, self.facts, on_gpu=self.device == "cuda")
            return est is not UNKNOWN and (est.total - est.overhead) * factor + est.overhead * max(len(used), 1) <= free

        def largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
            if not ok(lo):
                return 0
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
            return lo

        max_ctx = self.model.max_positions if isinstance(self.model.max_positions, int) else 131072
        out = {
            "max_batch_size": largest(1, 4096, lambda b: fits(b, self.workload.prompt_len)),
            "max_prompt_len": largest(1, max(1, max_ctx - self.workload.new_tokens), lambda p: fits(self.workload.batch_size, p)),
            "model_max_positions": self.model.max_positions if isinstance(self.model.max_positions, int) else None,
            "calibration": round(factor, 3),
            "budget_gib": round(free / GIB, 2),
            "checked": False,
        }
        if self.device != "cuda":
            # the largest batch is compute-bound on a CPU: a run there takes minutes to hours
            out["checked"] = "not on the CPU: a run at the largest batch would take far longer than the tune"
        elif check and self.runner is not None and out["max_batch_size"] and out["max_prompt_len"]:
            out.update(self._check_capacity(pick, out))
        return out

    def _check_capacity(self, pick: Trial, cap: dict[str, Any]) -> dict[str, Any]:
        """One run of the pick at the largest batch and at the longest prompt; a shape that
        does not fit is retried once at 90 %, and the figure reported is what ran."""
        shapes = {"max_batch_size": {"batch_size": cap["max_batch_size"], "prompt_len": self.workload.prompt_len},
                  "max_prompt_len": {"batch_size": self.workload.batch_size, "prompt_len": cap["max_prompt_len"]}}
        out: dict[str, Any] = {}
        ran: dict[str, bool] = {}
        for attempt in range(2):
            if not shapes or not self.budget_left():
                break
            spec = {**self.spec(pick), "capacity": list(shapes.values()), "fault": None, "label": pick.label + " (capacity check)"}
            key = self.cache.trial_key(pick, -1 - attempt) + json.dumps(spec["capacity"]) if self.cache else None
            r = self.cache.get(key) if key else None
            if r is None:
                self.progress(spec["label"], *self._counts())
                r = self.runner.run(spec)
                if key:
                    self.cache.put(key, r)
            checks = r.get("capacity_checks") or []
            out.setdefault("checks", []).extend(checks or [{"error": r.get("error", r.get("status"))}])
            if r.get("status") != STATUS_OK or len(checks) != len(shapes):
                out["checked"] = "failed: " + str(r.get("error", r.get("status")))[:200]
                return out
            again = {}
            for (key, shape), check in zip(shapes.items(), checks):
                ran[key] = bool(check.get("fits"))
                if check.get("fits"):
                    out[key] = shape["batch_size"] if key == "max_batch_size" else shape["prompt_len"]
                elif attempt == 0:
                    smaller = dict(shape)
                    dim = "batch_size" if key == "max_batch_size" else "prompt_len"
                    smaller[dim] = max(1, int(shape[dim] * 0.9))
                    again[key] = smaller
                else:
                    out[key] = None
            shapes = again
        out["checked"] = bool(ran) and all(ran.values())
        return out

    def _config_dict(self, pick: Trial) -> dict[str, Any]:
        return finish_config(pick.config, self.facts, self.workload, self.objective, measured=True)


def first_gpu_name(facts: Facts) -> Any:
    """The name of GPU 0, the one results are recorded under (None without a GPU)."""
    return facts.gpus[0].name if facts.gpus not in (UNKNOWN, ()) and facts.gpus else None


def finish_config(cfg: dict[str, Any], facts: Facts, workload: Workload, objective: str, *, measured: bool, reasons: list[str] | None = None) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    out.setdefault("generate", {})
    rt = out.setdefault("runtime", {})
    rt.setdefault("sdpa_backend", None)
    rt["padding_side"] = "left"
    rt.setdefault("launch", None)
    gpu = first_gpu_name(facts)
    out["autotune"] = {
        "schema": 1,
        "version": __version__,
        "objective": objective,
        "measured": measured,
        "workload": dataclasses.asdict(workload),
        "tuned_on": {"facts": facts.fingerprint(), "gpu": gpu, "torch": facts.package("torch") or None, "transformers": facts.package("transformers") or None},
    }
    if reasons:
        out["autotune"]["reasons"] = reasons
    return out


def _logits(t: Trial) -> Any:
    from .quality import load_logits

    for r in reversed(t.results):
        if r.get("status") == STATUS_OK and r.get("dir"):
            lg = load_logits(r["dir"])
            if lg is not None:
                return lg
    return None


# ---------------------------------------------------------------------------- the cache
class ResultCache:
    """Measurements keyed by facts fingerprint, model, workload, objective and autotune version.

    One JSON file per tune key; each trial's result is written as it finishes (atomic
    replace), so Ctrl-C or a spent time budget keeps what was measured and a rerun resumes.
    """

    def __init__(self, root: str | Path, facts: Facts, model: ModelSpec, workload: Workload, extra: str = "") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"facts": facts.fingerprint(), "model": model_fingerprint(model), "workload": dataclasses.asdict(workload),
                           "version": __version__, "extra": extra}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.path = self.root / f"{self.key}.json"
        self.meta = {"gpu": first_gpu_name(facts),
                     "torch": facts.package("torch"), "transformers": facts.package("transformers"),
                     "model": model_fingerprint(model), "workload": dataclasses.asdict(workload)}
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.data = {}
        self.data.setdefault("results", {})
        self.data["meta"] = self.meta
        self.hits = 0

    def trial_key(self, t: Trial, n: int) -> str:
        return hashlib.sha256(json.dumps([t.config, n], sort_keys=True).encode()).hexdigest()[:16]

    def get(self, key: str) -> dict[str, Any] | None:
        r = self.data["results"].get(key)
        if r is not None and r.get("status") in (STATUS_OK,) and (not r.get("dir") or Path(r["dir"]).exists()):
            self.hits += 1
            return r
        return None

    def put(self, key: str, result: dict[str, Any]) -> None:
        self.data["results"][key] = result
        self._write()

    def save_pick(self, result: TuneResult) -> None:
        self.data["pick"] = result.config
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one


def model_fingerprint(model: ModelSpec) -> str:
    blob = json.dumps({"type": model.model_type, "arch": model.architectures, "tensors": [(t.name, t.shape, t.dtype) for t in model.tensors],
                       "shape": [model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads, model.vocab_size]}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("AUTOTUNE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "autotune")
    return Path(base)


# ---------------------------------------------------------------------------- predictions (no GPU here)
def predict(model_path: str | Path, facts: Facts, workload: Workload, objective: str = "throughput", *, cache_root: Path | None = None) -> TuneResult:
    """The config the rules, the memory model and a documented preference order predict to be
    fastest on a machine autotune cannot measure (``--target`` / ``--facts``).

    Preference order (from docs/MEASURED.md and the rules): on CUDA, FlashAttention-3 on
    Hopper if installed, FlashAttention-2 on Ampere+ if installed, else SDPA; bf16 on Ampere+,
    else fp16; at batch 1 the compiled static cache (5.7x the default on an H100) when triton
    is there; no quantization unless the model does not fit; one GPU when it fits, else
    device_map="auto". On the CPU: SDPA, bf16 with AMX/AVX512-BF16 else fp32, dynamic cache.
    Earlier measurements of the same GPU model, stack, model and workload in the cache win.
    """
    model = read_model(model_path)
    reasons: list[str] = []
    root = cache_root or cache_dir() / "results"
    if root.is_dir():
        gpu = first_gpu_name(facts)
        for f in sorted(root.glob("*.json")):
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            m = d.get("meta", {})
            if d.get("pick") and m.get("gpu") == gpu and m.get("torch") == facts.package("torch") and m.get("transformers") == facts.package("transformers") \
                    and m.get("model") == model_fingerprint(model) and m.get("workload") == dataclasses.asdict(workload):
                cfg = dict(d["pick"])
                cfg["autotune"] = {**cfg.get("autotune", {}), "measured": False, "reasons": [f"measured earlier on a {gpu} with the same stack (cache {f.name})"]}
                return TuneResult(config=cfg, trials=[], pick=None, baseline=None, facts=facts, model=model, workload=workload,
                                  objective=objective, wall_s=0.0, measured=False, notes=cfg["autotune"]["reasons"])
    tuner_like = Tuner(model_path, facts=facts, workload=workload, objective=objective, model=model)  # judges only: no runner, nothing is run
    device, half = tuner_like.device, tuner_like.half
    options: list[tuple[str, str, dict[str, Any]]] = []
    if device == "cuda":
        for attn in ("flash_attention_3", "flash_attention_2", "sdpa", "eager"):
            options.append((half, attn, {}))
    else:
        options += [(half, "sdpa", {}), ("float32", "sdpa", {})]
    chosen = None
    for dtype, attn, _ in options:
        t = tuner_like.make("predict", dtype, attn)
        if t.status != "dropped":
            chosen = t
            reasons.append(f"attention: {attn} (the first of flash_attention_3 > flash_attention_2 > sdpa > eager that the rules allow here)")
            reasons.append(f"dtype: {dtype} ({'bf16 needs compute capability 8.0' if device == 'cuda' else 'CPU'})")
            break
        reasons.append(f"not {attn} in {dtype}: {t.reason[:160]}")
    if chosen is None:
        raise UserError("no configuration passes the rules on these facts; run `autotune doctor` with them")
    cfg = chosen.config
    if device == "cuda" and workload.batch_size <= 8 and facts.package("triton"):
        trial = tuner_like.make("predict", cfg["from_pretrained"]["dtype"], cfg["from_pretrained"]["attn_implementation"], cache="static", compile_=True)
        if trial.status != "dropped":
            cfg = trial.config
            reasons.append("cache: static, compiled by transformers (5.7x / 3.2x the dynamic cache at batch 1 on an H100, docs/MEASURED.md)")
    dm = cfg["from_pretrained"].get("device_map")
    if dm == "auto":
        tp = _predict_tp(tuner_like, cfg)
        if tp is not None:
            cfg = tp.config
            reasons.append(f"placement: tensor parallel over {parse_config(cfg).tp_size} NVLink-connected GPUs (the model does not fit one GPU; "
                           "every GPU works on every token, where a device_map split leaves all but one idle)")
        else:
            reasons.append("placement: device_map=auto, the model does not fit one GPU by the memory estimate "
                           "(tensor parallel not predicted: it needs NVLink between the GPUs in the facts and head counts that divide)")
    if chosen.estimate_gib is not None:
        reasons.append(f"memory estimate: {chosen.estimate_gib} GiB")
    config = finish_config(cfg, facts, workload, objective, measured=False, reasons=reasons)
    return TuneResult(config=config, trials=[chosen], pick=chosen, baseline=None, facts=facts, model=model, workload=workload,
                      objective=objective, wall_s=0.0, measured=False, notes=reasons)


def _predict_tp(judge: Tuner, cfg: dict[str, Any]) -> Trial | None:
    """The smallest tensor-parallel group that the rules allow, whose GPUs all have NVLink."""
    from .engine import Context

    fp = {k: v for k, v in cfg["from_pretrained"].items() if k not in ("device_map", "max_memory")}
    k = 2
    while k <= len(judge.gpu_indexes()):
        t = judge.trial("predict", {"from_pretrained": {**fp, "distributed_config": {"tp_plan": "auto", "tp_size": k}},
                                    "generate": dict(cfg["generate"]), "runtime": {**cfg["runtime"], "launch": launch_command(k)}})
        ctx = Context(judge.facts, judge.model, parse_config(t.config, workload=judge.workload))
        if t.status != "dropped" and ctx.derived().get("tp_nvlink") is True and ctx.mem().get("fits") is True:
            return t
        k *= 2
    return None


# ---------------------------------------------------------------------------- the public call
def default_model(root: Path | None = None) -> Path:
    """A small random Llama, built locally (no network) and kept in the cache."""
    folder = (root or cache_dir() / "models") / "random-llama-22m"
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    if folder.exists():  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def _from_hub(name: str) -> Path:
    """A hub id (``org/name``) when a hub is reachable: config, weights and tokenizer only."""
    import re

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise UserError(f"model folder not found: {name}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model folder not found: {name} (and HF_HUB_OFFLINE is set, so it is not looked up on the hub)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        raise UserError(f"model folder not found: {name}, and the hub did not provide it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def tune(
    model: str | Path | None = None,
    *,
    batch_size: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 128,
    padding: bool = False,
    objective: str = "throughput",
    time_budget: float | None = None,
    facts: Facts | None = None,
    max_memory: str | dict[str, Any] | None = None,
    quantization: str = "auto",
    min_throughput: float = 0.0,
    use_cache: bool = True,
    reps: int = 3,
    candidate_timeout: float | None = None,
    runner: Any = None,
    faults: dict[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    report: bool = False,
    headroom_gib: float = 1.0,
    dtype: str | None = None,
    attention: str | None = None,
    cache: str | None = None,
    check_capacity: bool = True,
) -> Any:
    """Tune ``model`` (a local folder; None builds a small random Llama) on this machine.

    Returns the config dict; with ``report=True`` the :class:`TuneResult` with every
    candidate's measurements. With ``facts`` describing another machine (a target profile or
    a facts file), nothing can be measured: the result is a prediction, ``measured: false``.
    ``dtype`` / ``attention`` / ``cache`` pin an axis instead of searching it; ``headroom_gib``
    is kept free on each GPU when a device_map split is derived.
    """
    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens), ("reps", reps)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be a whole number >= 1, found {v!r}")
    if time_budget is not None and time_budget <= 0:
        raise UserError("time_budget must be positive (seconds)")
    workload = Workload(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, padding=padding)
    path = Path(model) if model is not None else default_model()
    if not path.exists():
        path = _from_hub(str(model))
    budget = parse_max_memory(max_memory) if max_memory else None
    if facts is not None and facts.source != "probe":
        result = predict(path, facts, workload, objective)
        return result if report else result.config
    # checked before anything starts: an unknown name is one line
    fixed = pinned_axes({k: v for k, v in (("dtype", dtype), ("attention", attention), ("cache", cache)) if v is not None})
    from .machine import probe

    spec = read_model(path)
    t0 = time.perf_counter()
    own_runner = runner is None
    if own_runner:
        # started first: the server imports torch and transformers while this process probes
        from .runner import ForkRunner

        runner = ForkRunner(timeout_s=candidate_timeout or 900.0, preload_model_type=spec.model_type if isinstance(spec.model_type, str) else None)
        runner.start()
    try:
        here = facts or probe()
        if own_runner and not candidate_timeout and not (here.gpus not in (UNKNOWN, ()) and here.gpus):
            runner.timeout_s = 300.0
        cache = ResultCache(cache_dir() / "results", here, spec, workload, extra=f"{objective}|{quantization}|{budget}|{headroom_gib}|{sorted(fixed.items())}") if use_cache else None
        if own_runner and cache is not None:
            runner.workdir = cache.root / cache.key  # runs (and their logits) stay beside the cached results
        tuner = Tuner(path, facts=here, workload=workload, objective=objective, time_budget=time_budget, quantization=quantization,
                      max_memory=budget, min_throughput=min_throughput, reps=reps, runner=runner, cache=cache, faults=faults,
                      progress=progress, candidate_timeout=candidate_timeout, headroom_gib=headroom_gib, fixed=fixed,
                      check_capacity=check_capacity, model=spec)
        tuner.start = t0
        result = tuner.run()
        start_s = getattr(runner, "server_start_s", None)
        if isinstance(start_s, (int, float)):
            result.notes.append(f"fork server ready after {start_s:.1f} s (imports of torch and transformers, overlapped with probing and the first candidate)")
    finally:
        if own_runner:
            runner.close()
    if cache is not None and result.pick is not None:
        cache.save_pick(result)
    if cache is not None and cache.hits:
        result.notes.append(f"{cache.hits} measurement(s) reused from the cache ({cache.path}); --no-cache to measure afresh")
    if result.pick is None:
        result.notes.append("no candidate worked: see each trial's reason")
    return result if report else result.config
