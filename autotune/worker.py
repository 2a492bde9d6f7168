"""What runs inside one candidate's process: load, warm up, measure, capture logits.

``run_candidate(spec, out_dir)`` is called in a child forked from a warm parent that has
imported torch and transformers but never touched CUDA (see ``runner.py``). Everything it
learns goes into ``out_dir/result.json`` (and ``logits.pt``); an exception becomes a
``status: "error"`` result, a crash or hang is caught by the parent.

The spec is plain data (JSON-able):
``{"model", "label", "config" (a config dict), "workload": {...}, "reps", "min_reps",
"quality_steps", "seed", "memory_budget": {"0": bytes} | None, "wait_for": path | None,
"wait_limit_s", "warm_file": path | None, "capacity": [{"batch_size", "prompt_len"}, ...] | None,
"prompt_ids": [[int, ...], ...] | None, "fault": None | "crash" | "hang" | "oom" | "corrupt"}``.
``prompt_ids`` (the user's prompts, for a candidate whose speed depends on the text) are what
its timed runs decode, one generate per batch of them; otherwise random rows of the workload's shape.
``fault`` exists for tests: it injects the failure a real candidate can have. ``capacity``
turns the run into a memory check: one generate per listed shape, no timing. ``warm_file`` is
touched when the warm-up is done; the timed runs then wait for ``wait_for`` to exist.

Run as a script (``python -m autotune.worker SPEC.json OUT_DIR``) it serves a fresh
interpreter, and under ``torchrun`` each tensor-parallel rank: rank 0 writes
``result.json`` and the logits, rank r ``result.rank{r}.json`` with its own GPU's peak.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import apply_model_transforms, apply_runtime, compile_kwargs, decode_loop_of, from_pretrained_kwargs, generate_kwargs, model_class_of, reset_runtime


def _sync(torch: Any) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_inputs(torch: Any, vocab: int, workload: dict[str, Any], seed: int, device: Any, *, right: bool = False) -> tuple[Any, Any]:
    """Deterministic prompts; with padding, rows get different lengths (row 0 full, the last about
    half padded), padded on the left as generation wants, or on the ``right`` as an encoder's
    tokenizer pads."""
    g = torch.Generator().manual_seed(seed)
    b, n = workload["batch_size"], workload["prompt_len"]
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if workload.get("padding") and b > 1:
        for row in range(b):
            pad = (row * n) // (2 * b)
            cols = slice(n - pad, n) if right else slice(0, pad)
            ids[row, cols] = 0
            mask[row, cols] = 0
    return ids.to(device), mask.to(device)


class _StepClock:
    """A stopping criterion that only records when each new token is ready (synchronised)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        _sync(self.torch)
        self.times.append(time.perf_counter())
        return self.torch.zeros(input_ids.shape[0], dtype=self.torch.bool, device=input_ids.device)


class _ChunkClock:
    """A streamer that records when each chunk of new tokens reaches the host and how many new
    tokens there are by then (``put`` gets them on the CPU, so the GPU has made them). generate
    puts the prompt first; then each step's tokens: one per step, or with prompt lookup the
    tokens one forward verified."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.counts: list[int] = []
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())
        n = int(value.shape[-1]) if value.dim() > 1 else 1  # (batch, k) verified tokens, or (batch,) one token
        self.counts.append((self.counts[-1] if self.counts else 0) + n)

    def end(self) -> None:
        pass


def prompt_batches(torch: Any, prompt_ids: list[list[int]], workload: dict[str, Any], device: Any) -> list[tuple[Any, Any]]:
    """The user's prompts as batches of ``batch_size`` rows, each left-padded (id 0, masked) to
    the workload's prompt length, so every generate has one shape; prompts are taken in turn,
    from the first again where the last batch would be short."""
    b, n = workload["batch_size"], workload["prompt_len"]
    rows = [list(p)[-n:] for p in prompt_ids]
    out = []
    for g in range(-(-len(rows) // b)):
        group = [rows[(g * b + j) % len(rows)] for j in range(b)]
        ids = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n, dtype=torch.long)
        for j, r in enumerate(group):
            ids[j, n - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[j, n - len(r):] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


class _StopAfter:
    """A stopping criterion that ends generation after ``n`` new tokens."""

    def __init__(self, torch: Any, n: int) -> None:
        self.torch, self.n, self.calls = torch, n, 0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=self.torch.bool, device=input_ids.device)


class _ForceTokens:
    """A logits processor that records the raw logits, then forces a fixed continuation,
    so every candidate is compared on the same token history (padded rows included)."""

    def __init__(self, torch: Any, forced: Any, keep: int) -> None:
        self.torch, self.forced, self.keep, self.step, self.logits = torch, forced, keep, 0, []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = self.step
        self.step += 1
        if step < self.keep:
            self.logits.append(scores.detach().float().cpu())
        out = self.torch.full_like(scores, float("-inf"))
        tok = self.forced[:, step].to(scores.device)
        out.scatter_(1, tok.unsqueeze(1), 0.0)
        return out


def _dynamo_graphs(torch: Any) -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["stats"].values())) + int(sum(counters["recompiles"].values()) if "recompiles" in counters else 0)
    except Exception:  # noqa: BLE001
        return -1


def gpu_state() -> list[dict[str, Any]] | None:
    """Clocks, clock-event (throttle) reasons and other processes per GPU, read through NVML."""
    try:
        import pynvml

        from .machine import PynvmlBackend

        pynvml.nvmlInit()
        try:
            out = []
            reasons = PynvmlBackend()
            reasons._nv = pynvml
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                out.append({
                    "nvml_index": i,
                    "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "clock_event_reasons": reasons._reasons(pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)),
                    "processes": len(procs),
                    "other_processes": sum(1 for p in procs if p.pid != os.getpid()),
                    "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                })
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - logging only; never fails a candidate
        return [{"error": f"{type(e).__name__}: {e}"[:200]}]


def cpu_contention() -> str | None:
    """Why a CPU measurement may be wrong, or None: the 1-minute load average beyond this run's
    own share and every core (another tune, a build, a browser). It lags by up to a minute, so it
    catches sustained contention, the kind that spoils a whole tune."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load - 1 > 1.5 * cores:  # the run's own threads keep it near the core count; half as much again is someone else
        return f"the CPU was busy with other work while it ran (load {load:.1f} on {cores} cores)"
    return None


def _rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) under torchrun; (0, 0, 1) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _peaks(torch: Any, cuda: bool) -> dict[str, Any]:
    """Peak allocated / reserved memory per GPU this process used (a TP rank: its own GPU)."""
    if not cuda:
        return {}
    _, local_rank, world = _rank()
    devices = [local_rank] if world > 1 else [i for i in range(torch.cuda.device_count()) if torch.cuda.max_memory_reserved(i) > 0]
    return {
        "gpu_peak_gib": {str(i): round(torch.cuda.max_memory_allocated(i) / 1024**3, 3) for i in devices},
        "gpu_reserved_gib": {str(i): round(torch.cuda.max_memory_reserved(i) / 1024**3, 3) for i in devices},
    }


def _enforce_budget(torch: Any, budget: dict[str, Any], world: int, local_rank: int) -> None:
    """Each process enforces the budget of the GPUs it may touch (a TP rank: its own)."""
    if not torch.cuda.is_available():
        return
    for dev, limit in budget.items():
        if dev.isdigit() and int(dev) < torch.cuda.device_count() and (world == 1 or int(dev) == local_rank):
            total = torch.cuda.get_device_properties(int(dev)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), int(dev))


def _wait_for(path: str | None, limit_s: float = 300.0) -> None:
    """Hold the timed runs until ``path`` exists: until the fork server has imported, for a
    first candidate run in a fresh interpreter beside it; until the runner releases it, for a
    candidate launched beside others. Never past ``limit_s``: timing while another candidate
    may be busy would be a wrong result, so that is a failure."""
    if not path:
        return
    end = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise RuntimeError(f"not released for its timed runs within {limit_s:.0f} s")
        time.sleep(0.02)


def _hold(spec: dict[str, Any]) -> None:
    """Warmed up: say so (``warm_file``), then wait to be let into the timed runs (``wait_for``)."""
    if spec.get("warm_file"):  # the runner may now let another candidate's timed runs go first
        Path(spec["warm_file"]).touch()
    _wait_for(spec.get("wait_for"), float(spec.get("wait_limit_s") or 300.0))


@contextmanager
def _timed_section(pin_cpus: list[int] | None = None) -> Iterator[list[float]]:
    """GC off (and the thread pinned where asked) while timing; yields the section's wall-clock
    bounds [start, end], comparable across processes."""
    window = [time.time()]
    gc_was = gc.isenabled()
    gc.disable()
    pinned = _pin(pin_cpus)
    try:
        yield window
    finally:
        window.append(time.time())
        if gc_was:
            gc.enable()
        if pinned is not None:
            os.sched_setaffinity(0, pinned)


def _p50_p99(values: list[float]) -> tuple[float, float]:
    srt = sorted(values)
    return srt[len(srt) // 2], srt[min(len(srt) - 1, int(len(srt) * 0.99))]


def _capacity_check(torch: Any, model: Any, vocab: int, base: dict[str, Any], w: dict[str, Any], spec: dict[str, Any], device: Any) -> dict[str, Any]:
    """One generate per shape in ``spec["capacity"]``: does it fit, and its peak.
    A static cache runs uncompiled here and stops after two tokens: the cache is allocated for
    the whole length at the prefill, where the peak is reached, and a compile per shape (or 128
    decode steps at a batch of thousands) would cost far more than the check. A dynamic cache
    grows with every token, so it runs the whole length."""
    cuda = torch.cuda.is_available()
    checks = []
    for shape in spec["capacity"]:
        wl = {**w, **shape}
        ids, mask = make_inputs(torch, vocab, wl, spec.get("seed", 0), device)
        kw = {**base, "attention_mask": mask}
        static = kw.get("cache_implementation") in ("static", "offloaded_static")
        want = wl["new_tokens"]
        if static:
            kw["disable_compile"] = True
            want = min(2, wl["new_tokens"])
            kw["stopping_criteria"] = [_StopAfter(torch, want)]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        entry: dict[str, Any] = dict(shape)
        try:
            with torch.inference_mode():
                seq = model.generate(ids, **kw)
            entry["fits"] = seq.shape[1] - ids.shape[1] == want
            if static:
                entry["tokens"] = want
        except torch.OutOfMemoryError as e:
            entry["fits"], entry["error"] = False, str(e).splitlines()[0][:200]
        finally:
            ids = mask = seq = None  # noqa: F841 - free before the next shape
        entry.update(_peaks(torch, cuda))
        checks.append(entry)
    return {"capacity_checks": checks}


def _pin(cpus: list[int] | None) -> set[int] | None:
    """Pin this thread (the one that drives the GPU) to ``cpus`` for the timed runs only (the
    compile's workers, started earlier, keep every core); returns the mask to restore."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, [int(c) for c in cpus])
    except (OSError, ValueError):
        return None
    return before


def _load(torch: Any, model_path: str, cfg: dict[str, Any]) -> tuple[Any, Any, int]:
    """``from_pretrained`` with the config's parts and process-wide runtime settings applied;
    returns (model, its device, the vocabulary size)."""
    apply_runtime(cfg)
    kwargs = from_pretrained_kwargs(cfg)
    fp = cfg["from_pretrained"]
    if not torch.cuda.is_available() and "device_map" not in fp and "distributed_config" not in fp:
        kwargs["device_map"] = "cpu"
    model = model_class_of(cfg).from_pretrained(model_path, **kwargs)  # AutoModelForCausalLM unless runtime.model_class says
    model.eval()
    apply_model_transforms(model, cfg, strict=True)  # a fused or GQA candidate with nothing to change fails here
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    return model, next(model.parameters()).device, vocab


def _failure(e: BaseException, limit: int) -> dict[str, Any]:
    """An exception as a result's fields: its first line, whether it was out of memory, and
    whether the candidate's option changes nothing in this model (:class:`autotune.errors.NotApplicable`:
    nothing to fuse, no grouped heads)."""
    from .errors import NotApplicable

    text = f"{type(e).__name__}: {e}".strip().splitlines()
    error = text[0][:limit] if text else type(e).__name__
    out = {"error": error, "oom": "out of memory" in error.lower() or type(e).__name__ == "OutOfMemoryError"}
    if isinstance(e, NotApplicable):
        out["not_applicable"] = True
    return out


def _finite(torch: Any, logits: Any) -> bool:
    """-inf is legitimate (min_new_tokens masks EOS); NaN or +inf is not."""
    return not bool(torch.isnan(logits).any() or torch.isposinf(logits).any())


def _forced_logits(torch: Any, model: Any, ids: Any, base: dict[str, Any], vocab: int, steps: int, n_new: int, seed: int,
                   *, keep_length: bool, loop: Any = None) -> Any:
    """Raw logits of the first ``steps`` steps over a forced, fixed continuation: every
    candidate is compared on the same token history (padded rows included). With a decode
    ``loop`` (autotune's sync-free one) the loop itself feeds the forced tokens, so the logits
    come from the graph that was timed (a logits processor would send the call to transformers'
    loop, which on CUDA compiles the forward a second time)."""
    from transformers import LogitsProcessorList

    g = torch.Generator().manual_seed(seed + 1)
    forced = torch.randint(3, vocab, (ids.shape[0], n_new), generator=g)
    length = {} if keep_length else {"max_new_tokens": steps, "min_new_tokens": steps}
    if loop is not None:
        out: list[Any] = []
        with torch.inference_mode():
            model.generate(ids, **{**base, **length}, custom_generate=loop, forced_tokens=forced[:, :steps], logits_out=out)
        if len(out) != steps:
            raise RuntimeError(f"the decode loop gave {len(out)} of {steps} forced-token logits (it fell back to transformers' loop)")
        return torch.stack(out, dim=1)
    proc = _ForceTokens(torch, forced, keep=steps)
    with torch.inference_mode():
        model.generate(ids, **{**base, **length, "logits_processor": LogitsProcessorList([proc])})
    return torch.stack(proc.logits, dim=1)  # (batch, steps, vocab)


def _save_logits(torch: Any, logits: Any, path: Path) -> None:
    torch.save(logits.half() if logits.abs().max() < 6e4 else logits, path)


def device_time_us(torch: Any, fn: Any) -> float:
    """GPU time of what ``fn`` runs: the sum of its kernels' (and copies') durations, read with
    the profiler (launch gaps and host work do not count: what a CUDA graph leaves of it). On
    the CPU, the wall time."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    try:
        events = prof.profiler.kineto_results.events()
        total = sum(e.end_ns() - e.start_ns() for e in events if e.device_type() == DeviceType.CUDA) / 1000
    except AttributeError:
        total = 0.0
    if not total:
        total = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return float(total)


def _screen(torch: Any, spec: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """For each candidate in ``spec["screen"]``, in this one process: load it, warm up, and take
    the GPU time per decode step with a static cache, uncompiled — the difference between the
    device time of ``1 + steps`` generated tokens and of 1 (the prefill), over ``steps`` — and
    the forced-token logits of its first steps (a quality reference that costs no extra run)."""
    from .gqa import compiled_branches

    with compiled_branches():  # the attention branches of the compiled runs the screen ranks
        return _screen_rows(torch, spec, out)


def _screen_rows(torch: Any, spec: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    w = spec["workload"]
    steps = int(spec.get("screen_steps", 32))
    rows = []
    for i, item in enumerate(spec["screen"]):
        row: dict[str, Any] = {"label": item["label"]}
        model = None
        t0 = time.perf_counter()
        try:
            if item.get("fault") == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            cfg = item["config"]
            reset_runtime()
            model, device, vocab = _load(torch, spec["model"], cfg)
            row["load_s"] = round(time.perf_counter() - t0, 2)
            ids, mask = make_inputs(torch, vocab, w, spec.get("seed", 0), device)
            gen = {**(cfg.get("generate") or {}), "cache_implementation": "static", "disable_compile": True}
            base = dict(attention_mask=mask, do_sample=False, pad_token_id=0, **gen)

            def run(n: int) -> None:
                with torch.inference_mode():
                    model.generate(ids, **base, max_new_tokens=n, min_new_tokens=n)

            run(1 + steps)  # warm-up: allocator, cuBLAS handles, kernels' first launches
            row["warmup_s"] = round(time.perf_counter() - t0 - row["load_s"], 2)
            prefill = device_time_us(torch, lambda: run(1))
            whole = device_time_us(torch, lambda: run(1 + steps))
            row["profile_s"] = round(time.perf_counter() - t0 - row["load_s"] - row["warmup_s"], 2)
            row["step_ms"] = max(whole - prefill, 0.0) / steps / 1000
            row["prefill_ms"] = prefill / 1000
            n_q = min(int(spec.get("quality_steps", 4)), w["new_tokens"])
            logits = _forced_logits(torch, model, ids, base, vocab, n_q, w["new_tokens"], spec.get("seed", 0), keep_length=False)
            if item.get("fault") == "corrupt":
                logits = torch.randn_like(logits) * 10
            path = out / f"screen-{i:02d}.pt"
            _save_logits(torch, logits, path)
            row["logits"] = str(path)
            row["logits_finite"] = _finite(torch, logits)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one candidate's failure is its row, not the screen's
            row.update(status="error", **_failure(e, 300))
        finally:
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run_candidate(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    out = Path(out_dir)
    rank, _, world = _rank()
    result: dict[str, Any] = {"label": spec["label"], "status": "error"}
    try:
        result.update(_measure(spec, out))
        result["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - every failure is a result, never a crash of the tune
        result.update(_failure(e, 500))
    finally:
        result["host_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    name = "result.json" if rank == 0 else f"result.rank{rank}.json"
    tmp = out / (name + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, out / name)
    return result


def _measure(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    fault = spec.get("fault")
    if fault == "crash":
        os.abort()  # what a segfault in a kernel looks like from outside
    if fault == "hang":
        time.sleep(10_000)
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    cfg, w = spec["config"], spec["workload"]
    cuda = torch.cuda.is_available()
    rank, local_rank, world = _rank()
    budget = spec.get("memory_budget") or {}
    _enforce_budget(torch, budget, world, local_rank)
    if spec.get("screen"):
        return {"screen": _screen(torch, spec, out)}
    if w.get("task") == "encode":
        return _measure_encode(torch, spec, out)
    torch.manual_seed(spec.get("seed", 0))
    t0 = time.perf_counter()
    model, device, vocab = _load(torch, spec["model"], cfg)
    _sync(torch)
    load_s = time.perf_counter() - t0
    ids, mask = make_inputs(torch, vocab, w, spec.get("seed", 0), device)
    # what the timed runs decode: the random rows, or the user's prompts for a candidate whose
    # speed depends on the text (one generate per batch of them, each timed run)
    batches = prompt_batches(torch, spec["prompt_ids"], w, device) if spec.get("prompt_ids") else [(ids, mask)]
    gen = generate_kwargs(cfg)  # a compile_config becomes transformers' CompileConfig
    n_new = w["new_tokens"]
    base = dict(attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0, **gen)
    loop = decode_loop_of(cfg)
    lookup = gen.get("prompt_lookup_num_tokens")
    plain = {k: v for k, v in base.items() if k != "prompt_lookup_num_tokens"}  # the same without prompt lookup

    def generate(rows: Any = None, **extra: Any) -> tuple[Any, list[float], int, float]:
        """One timed generate of ``rows`` (ids, mask; default the first batch): (sequences, when
        new tokens reached the host, how many there were at the first of those times, start).
        Each token is clocked, except with the sync-free loop (only the first token and the end:
        a clock on every token would put back the host sync the loop removes) and with prompt
        lookup (each verified chunk: one forward yields one to N+1 tokens)."""
        x, m = rows if rows is not None else batches[0]
        kw = {**base, "attention_mask": m, **extra}
        times: list[float] = []
        first_count = 1
        clock: Any = None
        if loop is not None:
            def first() -> None:
                _sync(torch)
                times.append(time.perf_counter())
            kw.update(custom_generate=loop, first_token_hook=first)
        elif lookup:
            clock = kw["streamer"] = _ChunkClock()
            times = clock.times
        else:
            step_clock = _StepClock(torch)
            kw["stopping_criteria"] = kw.get("stopping_criteria", []) + [step_clock]
            times = step_clock.times
        _sync(torch)
        start = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(x, **kw)
        _sync(torch)
        if loop is not None:
            times.append(time.perf_counter())
        if clock is not None:
            first_count = clock.counts[0] if clock.counts else n_new
        return seq, times, first_count, start

    if spec.get("capacity"):
        return _capacity_check(torch, model, vocab, base, w, spec, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Warm-up on exactly the measured shapes and length. (A shorter warm-up was tried: with a
    # dynamic cache the first full-length timed run then came out up to 10x slower on an H100,
    # the allocator still growing the cache's blocks, which spoils the medians.) For a
    # compiled static cache this call compiles and a second one settles the decode graph.
    fixed_shapes = gen.get("cache_implementation") in ("static", "offloaded_static")
    compiled = cuda and fixed_shapes and not gen.get("disable_compile")
    from . import decode

    fell = decode.stats["fallbacks"]
    t1 = time.perf_counter()
    warm_seq = generate()[0]
    first_s = time.perf_counter() - t1
    if compiled:
        warm_seq = generate()[0]
    loop_check = None
    if loop is not None:
        if decode.stats["fallbacks"] > fell:
            raise RuntimeError(f"the sync-free decode loop fell back to transformers' own loop: {decode.stats.get('last_fallback')}")
        # its tokens against transformers' own loop, uncompiled: checked here, beside the other
        # candidates' warm-ups, not after the timed runs, where the next candidate's timed runs
        # would wait out an eager generate (128 tokens of a 1.1 B model: about 3 s on an H200)
        # (with prompt lookup, against greedy decoding without it: transformers runs lookup on a dynamic cache only)
        loop_check = _loop_check(torch, model, batches[0][0], {**plain, "attention_mask": batches[0][1]}, warm_seq,
                                 against="transformers' generate without prompt lookup, uncompiled, same weights" if lookup else None)
    _hold(spec)
    graphs_before = _dynamo_graphs(torch)

    # Timed runs: at least ``min_reps``; up to ``reps`` while they disagree by more than
    # ``rep_spread`` of their median (the finalists are re-measured in fresh processes anyway).
    runs: list[dict[str, Any]] = []
    forwards: list[int] = []  # with prompt lookup: the model's forwards per generate of the last timed run
    max_reps = spec.get("reps", 3)
    min_reps = min(spec.get("min_reps", max_reps), max_reps)
    with _timed_section(spec.get("pin_cpus")) as window:
        while len(runs) < max_reps:
            if len(runs) >= min_reps:
                speeds = [r["decode_tok_s"] for r in runs]
                if (max(speeds) - min(speeds)) <= spec.get("rep_spread", 0.10) * statistics.median(speeds):
                    break
            # one generate per batch; decode tok/s over all of them (the tokens after each call's
            # first, over the time after it), TTFT and end-to-end per call
            decoded, span, ttfts, totals, itl = 0, 0.0, [], [], []
            forwards = []  # one clocked chunk per forward
            for rows in batches:
                seq, times, first_count, start = generate(rows)
                produced = seq.shape[1] - rows[0].shape[1]
                if produced != n_new:
                    raise RuntimeError(f"generated {produced} tokens, expected {n_new} (min_new_tokens not honoured)")
                ttfts.append(times[0] - start)
                totals.append(times[-1] - start)
                decoded += rows[0].shape[0] * (n_new - first_count)
                span += times[-1] - times[0]
                if lookup:  # the loop counts its forwards itself: it clocks only the first token and the end
                    forwards.append(decode.stats.get("last_forwards", 0) if loop is not None else len(times))
                elif loop is None:  # per token only where each is clocked
                    itl += [b - a for a, b in zip(times, times[1:])]
            tok_s = decoded / span if decoded > 0 and span > 0 else float("nan")
            runs.append({"ttft_s": statistics.fmean(ttfts), "total_s": statistics.fmean(totals), "decode_tok_s": tok_s, "itl_s": itl})
    recompiled = _dynamo_graphs(torch) - graphs_before
    if graphs_before >= 0 and recompiled > 0:
        raise RuntimeError(f"torch.compile recompiled {recompiled} time(s) during the timed runs: timings rejected")

    res: dict[str, Any] = {
        "load_s": load_s,
        "first_call_s": first_s,
        "runs": [{k: v for k, v in r.items() if k != "itl_s"} for r in runs],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "total_s": statistics.median(r["total_s"] for r in runs),
        "timed_window": window,
    }
    itl = [x for r in runs for x in r["itl_s"]]
    if itl:
        res["itl_p50_s"], res["itl_p99_s"] = _p50_p99(itl)
    res["compile_s"] = max(0.0, first_s - res["total_s"]) if compiled else 0.0
    res.update(_peaks(torch, cuda))
    res["gpu_state"] = gpu_state() if cuda and rank == 0 else None
    if not cuda:
        res["contention"] = cpu_contention()
    if loop_check is not None:
        # whether the timed runs decoded what the checked warm-up did. Not a verdict: on a GPU greedy
        # decoding need not repeat itself call to call (on an H200, random bf16 weights, transformers'
        # own uncompiled generate agreed on 115 and 67 of 128 tokens with its first call:
        # benchmarks/repeat_tokens.py, docs/gpu/h200-s12-repeat-1.1b-b1.json)
        same = bool(torch.equal(seq, warm_seq)) if len(batches) == 1 else None
        res["decode_loop"] = {**loop_check, "runs": decode.stats["runs"], "timed_equal_warmup": same}
    if lookup:
        res["prompt_lookup"] = _lookup_check(torch, model, batches[-1], plain, seq, lookup, forwards, n_new, bool(spec.get("prompt_ids")),
                                             agreement=loop_check)
    res["world_size"] = world
    res["device"] = str(device)
    res["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

    # quality: raw logits over several steps on a fixed token history (not timed). A static
    # cache keeps the measured length (another length would make a compiled one recompile).
    # Prompt lookup changes which tokens share a forward, not the weights or kernels: its logits
    # are taken one token at a time (assisted decoding calls a logits processor once per
    # proposed token, so forced tokens cannot be fed through it); its tokens were checked above.
    steps = min(spec.get("quality_steps", 4), n_new)
    graphs_q = _dynamo_graphs(torch)
    # (the sync-free loop with prompt lookup takes plain steps for forced tokens, uncompiled: a
    # second compiled graph for four steps would cost more than it tells)
    logits = _forced_logits(torch, model, ids, base if loop is not None and lookup else plain, vocab, steps, n_new, spec.get("seed", 0),
                            keep_length=fixed_shapes, loop=loop)
    if compiled and graphs_q >= 0:  # a compiled candidate's quality pass should reuse its graph (0), not compile anew
        res["quality_pass_graphs"] = _dynamo_graphs(torch) - graphs_q
    if spec.get("fault") == "corrupt":
        logits = torch.randn_like(logits) * 10
    if rank == 0:  # tensor-parallel ranks compute the same (replicated) logits
        _save_logits(torch, logits, out / "logits.pt")
    res["logits_finite"] = _finite(torch, logits)
    return res


def _lookup_check(torch: Any, model: Any, rows: tuple[Any, Any], plain: dict[str, Any], seq: Any, lookup: int, forwards: list[int],
                  n_new: int, real: bool, agreement: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prompt lookup's greedy tokens (the last timed generate) against plain greedy decoding of
    the same rows (``plain``: the generate kwargs without prompt lookup; not timed), and how many
    tokens one forward yielded (the gain). With the sync-free loop the loop's own token check
    (``agreement``: its warm-up against transformers' uncompiled greedy decoding) is that check."""
    x, m = rows
    if agreement is None:
        with torch.inference_mode():
            ref = model.generate(x, **{**plain, "attention_mask": m})
        agreement = {**_agreement(torch, seq, ref, x.shape[1]), "against": "greedy decoding without prompt lookup, same weights"}
    else:
        agreement = {k: agreement[k] for k in ("tokens_equal", "agree_tokens", "of", "against")}
    return {"num_tokens": lookup, "tokens_per_forward": round(x.shape[0] * n_new * len(forwards) / max(sum(forwards), 1), 3),
            "forwards": list(forwards), "prompts": "real" if real else "random tokens", **agreement}


def _agreement(torch: Any, seq: Any, ref: Any, n: int) -> dict[str, Any]:
    """Two generations' new tokens (after the ``n`` prompt columns): equal, or how many leading
    tokens agree in every row."""
    a, b = seq[:, n:].cpu(), ref[:, n:].cpu()
    width = min(a.shape[1], b.shape[1])
    diff = (a[:, :width] != b[:, :width]).any(dim=0).nonzero()
    return {"tokens_equal": bool(a.shape == b.shape and torch.equal(a, b)), "agree_tokens": int(diff[0]) if len(diff) else width,
            "of": int(max(a.shape[1], b.shape[1]))}


def _loop_check(torch: Any, model: Any, ids: Any, base: dict[str, Any], seq: Any, against: str | None = None) -> dict[str, Any]:
    """The sync-free loop's greedy tokens (``seq``: its last warm-up call) against transformers' own
    loop on the same model, uncompiled (not timed): equal, or how many leading tokens agree in every row."""
    from . import decode

    with torch.inference_mode():
        ref = model.generate(ids, **{**base, "disable_compile": True}, custom_generate=None)
    return {"name": decode.NAME, **_agreement(torch, seq, ref, ids.shape[1]),
            "against": against or "transformers' generate, uncompiled, same weights"}


def encoder_inputs(torch: Any, vocab: int, workload: dict[str, Any], seed: int, device: Any) -> dict[str, Any]:
    """A batch as a tokenizer gives it to an encoder (right-padded rows with padding)."""
    ids, mask = make_inputs(torch, vocab, workload, seed, device, right=True)
    return {"input_ids": ids, "attention_mask": mask}


def _measure_encode(torch: Any, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """An encoder candidate: load it with its Auto class, compile it if asked, warm up, then time
    single forwards of the batch (sequences/s and the latency of each); its quality evidence is
    the mean-pooled last hidden state over the attention mask (what embedding models serve)."""
    cfg, w = spec["config"], spec["workload"]
    cuda = torch.cuda.is_available()
    torch.manual_seed(spec.get("seed", 0))
    t0 = time.perf_counter()
    model, device, vocab = _load(torch, spec["model"], cfg)
    _sync(torch)
    load_s = time.perf_counter() - t0
    comp = compile_kwargs(cfg)
    if comp is not None:
        model.compile(**comp)
    inputs = encoder_inputs(torch, vocab, w, spec.get("seed", 0), device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def forward() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    t1 = time.perf_counter()
    forward()
    _sync(torch)
    first_s = time.perf_counter() - t1
    for _ in range(3):  # a compiled model settles (CUDA graphs record on a later call)
        forward()
    _sync(torch)
    _hold(spec)
    # Timed: one forward each, until both ``min_iters`` and ``min_time_s`` are reached (capped)
    lat: list[float] = []
    start = time.perf_counter()
    with _timed_section() as window:
        while len(lat) < int(spec.get("max_iters", 200)) and (len(lat) < int(spec.get("min_iters", 10)) or time.perf_counter() - start < float(spec.get("min_time_s", 1.0))):
            a = time.perf_counter()
            forward()
            _sync(torch)
            lat.append(time.perf_counter() - a)
    b = w["batch_size"]
    p50, p99 = _p50_p99(lat)
    res: dict[str, Any] = {
        "load_s": load_s,
        "first_call_s": first_s,
        "compile_s": max(0.0, first_s - statistics.median(lat)) if comp is not None else 0.0,
        "runs": [{"seq_s": b / x, "latency_s": x} for x in lat],
        "seq_s": b / statistics.median(lat),
        "latency_p50_s": p50,
        "latency_p99_s": p99,
        "timed_window": window,
    }
    res.update(_peaks(torch, cuda))
    res["gpu_state"] = gpu_state() if cuda else None
    if not cuda:
        res["contention"] = cpu_contention()
    res["device"] = str(device)
    res["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    # quality: mean-pooled embeddings over the mask, in float32 (batch, hidden)
    hidden = forward()[0].float()
    m = inputs["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if spec.get("fault") == "corrupt":
        emb = torch.randn_like(emb) * 10
    torch.save(emb.cpu(), out / "logits.pt")  # float32: cosines are compared to 1e-6
    res["logits_finite"] = _finite(torch, emb)
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m autotune.worker SPEC.json OUT_DIR``: one candidate in this process."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    if argv is None:
        from ._proc import die_with_parent

        # a fresh interpreter ends with the tune that started it (and exits at once if that one
        # was killed while this one started); a torchrun rank with its launcher
        die_with_parent(spec.get("parent_pid"))
    result = run_candidate(spec, args[1])
    _, _, world = _rank()
    # under torchrun a failed rank must exit non-zero, so the launcher stops the others
    # instead of leaving them waiting in a collective until the timeout
    return 1 if world > 1 and result.get("status") != "ok" else 0


if __name__ == "__main__":
    raise SystemExit(main())
