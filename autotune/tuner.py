"""tune(): measure the options that can run on this machine and return the fastest that works.

The parts, one job each:

* ``space.py`` — the candidate space: configs, rules and memory estimate before loading, placement;
* ``search.py`` — the strategy: which candidates are measured, in which regime, in what order;
* ``measure.py`` — running and timing trials in fresh processes, the cheap screen, the cache;
* ``judge.py`` — correctness (logits against a reference, per-dtype noise floors) and the choice;
* ``capacity.py`` — the largest batch and prompt, estimated and checked by runs;
* ``cache.py`` — the result cache; ``predict.py`` — configs for machines that cannot be measured here.

:class:`Tuner` wires them together; :func:`tune` is the public call.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cache import usable_cache_dir, ResultCache, cache_dir, model_fingerprint
from .capacity import Capacity
from .config import Workload, parse_max_memory
from .errors import UserError
from .lock import MeasureLock
from .facts import UNKNOWN, Facts
from .judge import OBJECTIVES, Judge
from .measure import Bench, OnBench
from .model import ModelSpec, load_problems, read_model, require_loadable
from .predict import predict
from .quality import QUALITY_TOLERANCE
from .search import STAGE_MARGIN, Search
from .space import Space, finish_config, first_gpu_name, pinned_axes, preferred
from .trial import STATUS_OK, Trial, bootstrap_ci, summary

__all__ = ["Tuner", "TuneResult", "tune", "predict", "default_model", "ResultCache", "cache_dir", "model_fingerprint", "Trial",
           "bootstrap_ci", "summary", "finish_config", "first_gpu_name", "pinned_axes", "preferred", "STAGE_MARGIN", "OBJECTIVES", "STATUS_OK"]


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
    timeline: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: the search, judging, the capacity check

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
            "timeline": self.timeline,
            "phases": self.phases,
            "trials": [t.to_dict() for t in self.trials],
        }


class Tuner(OnBench):
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
        cache: ResultCache | None = None,
        faults: dict[str, str] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        candidate_timeout: float | None = None,
        headroom_gib: float = 1.0,
        fixed: dict[str, str] | None = None,
        trust_remote_code: bool = False,
        check_capacity: bool = True,
        model: ModelSpec | None = None,
        decode_loop: str = "auto",
        compile_modes: tuple[str, ...] = ("reduce-overhead",),
        quality_tolerance: float = QUALITY_TOLERANCE,
        prompts: Any = None,
        fuse_projections: str = "auto",
        sdpa_gqa: str = "auto",
    ) -> None:
        """``model``: the already-read :class:`ModelSpec` of ``model_path`` (else it is read here).
        ``prompts``: the user's :class:`~autotune.prompts.Prompts`, on which text-dependent
        options (prompt-lookup decoding) are measured.
        ``faults`` (tests only) maps a glob over candidate labels to crash / hang / oom / corrupt.
        ``fixed`` pins axes the caller has decided: {"dtype": ..., "attention": ..., "cache": "dynamic" | "static"}.
        ``headroom_gib``: per GPU, kept free beyond the estimate when max_memory is derived for a device_map split."""
        self.notes: list[str] = []
        self.judge = Judge(objective, min_throughput, self.notes, quality_tolerance=quality_tolerance)
        self.path = str(model_path)
        self.model = model if model is not None else read_model(model_path)
        self.facts, self.workload, self.objective = facts, workload, objective
        self.space = Space(self.model, facts, workload, max_memory=max_memory, headroom_gib=headroom_gib, fixed=fixed)
        self.space.trust_remote_code = trust_remote_code
        self.bench = Bench(self.path, workload, runner=runner, cache=cache, reps=reps, faults=faults, progress=progress,
                           candidate_timeout=candidate_timeout, time_budget=time_budget, max_memory=max_memory,
                           prompt_ids=prompts.ids if prompts is not None else None)
        if prompts is not None:
            self.notes += prompts.notes()
        self.search = Search(self.space, self.bench, self.judge, quantization=quantization, finalist_rounds=finalist_rounds, notes=self.notes,
                             decode_loop=decode_loop, compile_modes=compile_modes, fuse_projections=fuse_projections,
                             sdpa_gqa=sdpa_gqa)
        self.check_capacity = check_capacity

    def run(self) -> TuneResult:
        import_in_background("torch")  # the judge reads the candidates' logits with it once the search ends
        interrupted = self.run_search(self.search.run)
        phases = {"search_s": self.bench.elapsed()}
        floor = self.judge.check_quality(self.trials)
        self.judge.compile_breakeven(self.trials, self.workload.new_tokens)
        pick = self.judge.choose(self.trials)
        phases["judge_s"] = self.bench.elapsed() - phases["search_s"]
        capacity: dict[str, Any] = {}
        if pick:
            cap = Capacity(self.space, self.bench)
            try:
                capacity = cap.run(pick, check=self.check_capacity and not interrupted)
            except KeyboardInterrupt:
                interrupted = True
                self.notes.append("interrupted during the capacity check: capacity is from the memory model only")
                capacity = cap.run(pick, check=False)
        if self.bench.contended:
            self.notes.append(f"{len(self.bench.contended)} run(s) shared the machine with other work and are not cached "
                              f"(their figures may be low): {self.bench.contended[0]}")
        config = finish_config(pick.config, self.facts, self.workload, self.objective, measured=True) if pick else {}
        phases["capacity_s"] = self.bench.elapsed() - phases["search_s"] - phases["judge_s"]
        return TuneResult(
            config=config, trials=self.trials, pick=pick, baseline=self.search.baseline, facts=self.facts, model=self.model,
            workload=self.workload, objective=self.objective, wall_s=self.bench.elapsed(), measured=True, notes=self.notes,
            capacity=capacity, quality_floor=floor, interrupted=interrupted, timeline=self.bench.timeline,
            phases={k: round(v, 1) for k, v in phases.items()},
        )


def import_in_background(name: str) -> None:
    """Import ``name`` on a daemon thread unless it is imported already: the search spends its time
    waiting on child processes, and the judge, after it, needs torch in this process (an import of
    seconds on a busy host). A failed import is left for the caller's own import to report."""
    if name in sys.modules:
        return

    def run() -> None:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported where it is imported for use
            pass

    threading.Thread(target=run, name=f"import {name}", daemon=True).start()


# ---------------------------------------------------------------------------- the public call
def default_model(root: Path | None = None) -> Path:
    """A small random Llama, built locally (no network) and kept in the cache."""
    folder = (root or usable_cache_dir() / "models") / "random-llama-22m"
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
    try:
        model.save_pretrained(tmp)
        if folder.exists():  # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as e:  # a full disk, a read-only folder: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot save the default model in {folder.parent} ({e.strerror or e}); free some space or point AUTOTUNE_CACHE_DIR elsewhere") from None
    return folder


def _kind_of(path: Path) -> str:
    from .model import model_kind

    try:
        return model_kind(path)
    except (OSError, ValueError):  # an unreadable config.json: require_loadable says what is wrong
        return "causal-lm"


def _from_hub(name: str) -> Path:
    """A hub id (``org/name``) when a hub is reachable: config, weights and tokenizer only."""
    from .config import hub_id

    hub_id(name, org_required=True)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        raise UserError(f"model folder not found: {name}, and the hub did not provide it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def tune(
    model: str | Path | None = None,
    *,
    batch_size: int = 1,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
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
    trust_remote_code: bool = False,
    wait: float | None = 900.0,
    say: Callable[[str], None] | None = None,
    seq_len: int | None = None,
    decode_loop: str = "auto",
    compile_modes: str | tuple[str, ...] = ("reduce-overhead",),
    quality_tolerance: float = QUALITY_TOLERANCE,
    prompts: str | Path | None = None,
    fuse_projections: str = "auto",
    sdpa_gqa: str = "auto",
) -> Any:
    """Tune ``model`` (a local folder; None builds a small random Llama) on this machine.

    Returns the config dict; with ``report=True`` the :class:`TuneResult` with every
    candidate's measurements. With ``facts`` describing another machine (a target profile or
    a facts file), nothing can be measured: the result is a prediction, ``measured: false``.
    ``dtype`` / ``attention`` / ``cache`` pin an axis instead of searching it; ``headroom_gib``
    is kept free on each GPU when a device_map split is derived. Measuring holds a lock per
    machine: another tune measuring here is waited for, at most ``wait`` seconds (None: no
    limit; 0: refuse at once), ``say`` told why.

    An encoder (BERT-class; ``config.json`` says so) is tuned for its forward instead: batches of
    ``batch_size`` sequences of ``seq_len`` tokens (default 128; ``prompt_len`` and
    ``new_tokens`` do not apply and are refused), see :mod:`autotune.encoder`. ``prompt_len`` and
    ``new_tokens`` default to 512 and 128.

    On a GPU the compiled candidates decode with autotune's sync-free loop (``decode_loop``:
    "auto" / "sync-free"; "transformers" keeps transformers' own loop), ``compile_modes`` (a
    tuple, or a comma-separated string) adds torch.compile modes beyond transformers' default
    reduce-overhead, and torchao weight-only quantization may be picked only within
    ``quality_tolerance`` (mean KL to the unquantized reference, nats). ``fuse_projections``
    "auto" screens each compiled candidate also with its q/k/v and gate/up projections fused
    into one matmul each (``runtime.fuse_projections``, :mod:`autotune.fuse`); "never" leaves the
    model as transformers loads it. ``sdpa_gqa`` "auto" screens each compiled SDPA candidate of a
    model with grouped-query attention also with SDPA's own grouped heads instead of transformers'
    key/value copies (``runtime.sdpa_gqa``, :mod:`autotune.gqa`); "never" keeps transformers' attention.

    ``prompts``: a file of the user's own prompts (see :mod:`autotune.prompts`), tokenized with the
    model's tokenizer; then the prompt length is theirs (the longest, each cut to its last
    ``prompt_len`` tokens where that is given), and prompt-lookup decoding, whose speed depends on
    the text, is measured on them (batch size 1).
    """
    import math

    gen_lengths = [f"{flag}" for flag, v in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens)) if v is not None]
    prompt_len = 512 if prompt_len is None else prompt_len
    new_tokens = 128 if new_tokens is None else new_tokens
    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens), ("reps", reps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{name} must be a whole number >= 1, found {v!r}")
    for name, flag, v, least in (("time_budget", "--time-budget", time_budget, 0), ("candidate_timeout", "--timeout", candidate_timeout, 0),
                                 ("min_throughput", "--min-throughput", min_throughput, None), ("headroom_gib", "--headroom", headroom_gib, None)):
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (v <= 0 if least == 0 else v < 0):
            raise UserError(f"{name} ({flag}) must be a finite number {'> 0' if least == 0 else '>= 0'}, found {v!r}")
    if wait is not None and not (isinstance(wait, (int, float)) and wait >= 0):  # NaN too; inf waits for ever
        raise UserError(f"wait (--wait) must be a number of seconds >= 0, found {wait!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1):
        raise UserError(f"seq_len must be a whole number >= 1, found {seq_len!r}")
    if isinstance(compile_modes, str):
        compile_modes = tuple(m.strip() for m in compile_modes.split(",") if m.strip())
    if not isinstance(quality_tolerance, (int, float)) or isinstance(quality_tolerance, bool) or not math.isfinite(quality_tolerance) or quality_tolerance < 0:
        raise UserError(f"quality_tolerance (--quality-tolerance) must be a KL divergence >= 0 nats, found {quality_tolerance!r}")
    if use_cache or model is None:
        usable_cache_dir()
    path = Path(model) if model is not None else default_model()
    if not path.exists():
        path = _from_hub(str(model))
    encoder = (path / "config.json").is_file() and _kind_of(path) == "encoder"
    if encoder:
        from .encoder import workload_for

        if gen_lengths:
            arch = ", ".join(read_model(path).architectures) or "an encoder"
            raise UserError(f"this is an encoder model ({arch}): it is tuned for its forward over batches of sequences, not for "
                            f"generation; give --seq-len (and --batch-size) instead of {' and '.join(gen_lengths)}")
        workload = workload_for(batch_size, seq_len or 128, padding)
        prompt_len, new_tokens = workload.prompt_len, 0
    elif seq_len is not None:
        raise UserError("--seq-len is for encoder (embedding) models; for a causal LM give --prompt-len and --new-tokens")
    else:
        workload = Workload(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, padding=padding)
    real_prompts = None
    if prompts is not None:
        if encoder:
            raise UserError("--prompts is for text generation: an encoder model is tuned on batches of --seq-len tokens")
        if facts is not None and facts.source != "probe":
            raise UserError("--prompts needs measuring on this machine: it cannot be used with --target or --facts")
        from . import prompts as prompts_mod

        # each prompt cut to its last --prompt-len tokens where that is given, else to what the positions leave
        positions = read_model(path).max_positions
        if "--prompt-len" in gen_lengths:
            cut: int | None = prompt_len
        else:
            cut = positions - new_tokens if isinstance(positions, int) and positions > new_tokens else None
        real_prompts = prompts_mod.load(prompts, path, prompt_len=cut, trust_remote_code=trust_remote_code)
        prompt_len = real_prompts.longest
        workload = dataclasses.replace(workload, prompt_len=prompt_len, padding=padding or batch_size > 1, prompts=real_prompts.describe())
    budget = parse_max_memory(max_memory) if max_memory else None
    if facts is not None and facts.source != "probe" and encoder:
        raise UserError("tuning an encoder model for another machine (--target/--facts) is not supported: run autotune tune on that machine")
    if facts is not None and facts.source != "probe":
        # a prediction needs no weights (config.json is enough), but not an impossible workload
        too_long = [p for p in load_problems(read_model(path), prompt_len=prompt_len, new_tokens=new_tokens, trust_remote_code=True,
                                             known_types=None) if p.id == "WORKLOAD-TOO-LONG"]
        if too_long:
            raise UserError(f"{too_long[0].id}: {too_long[0].message}; fix: {too_long[0].fix}")
        result = predict(path, facts, workload, objective)
        return result if report else result.config
    # checked before anything starts: an unknown name is one line
    fixed = pinned_axes({k: v for k, v in (("dtype", dtype), ("attention", attention), ("cache", cache)) if v is not None})
    from .machine import probe

    spec = read_model(path)
    # what stops from_pretrained (or the workload) is found here, in milliseconds, not by every candidate failing
    require_loadable(spec, prompt_len=prompt_len, new_tokens=new_tokens, trust_remote_code=trust_remote_code, for_generation=not encoder)
    t0 = time.perf_counter()
    own_runner = runner is None
    if own_runner:
        # started first: the server imports torch and transformers while this process probes
        from .runner import ForkRunner

        runner = ForkRunner(timeout_s=candidate_timeout or 900.0, preload_model_type=spec.model_type if isinstance(spec.model_type, str) else None)
        runner.start()
    try:
        here = facts or probe()
        device = "cuda" if here.gpus not in (UNKNOWN, ()) and here.gpus else "cpu"
        if own_runner and not candidate_timeout and device == "cpu":
            runner.timeout_s = 300.0
        visible = {str(g.index) for g in here.gpus} if device == "cuda" else set()
        unseen = sorted(k for k in (budget or {}) if k.isdigit() and k not in visible)
        if unseen:
            raise UserError(f"--max-memory names GPU {', '.join(unseen)}, but " + (f"the visible GPUs are {', '.join(sorted(visible))}" if visible
                            else "no GPU is visible here") + " (CUDA ordinals, after CUDA_VISIBLE_DEVICES)")
        with MeasureLock(usable_cache_dir(), device, wait_s=wait, say=say) as lock:
            # the cache is read inside the lock: what another tune measured meanwhile is seen
            cache = ResultCache(cache_dir() / "results", here, spec, workload, extra=f"{objective}|{quantization}|{budget}|{headroom_gib}|{sorted(fixed.items())}|{decode_loop}|{compile_modes}|{quality_tolerance}|{fuse_projections}|{sdpa_gqa}") if use_cache else None
            if own_runner and cache is not None:
                runner.workdir = cache.root / cache.key  # runs (and their logits) stay beside the cached results
            tuner: Any
            if encoder:
                from .encoder import EncoderTuner

                if budget:
                    raise UserError("--max-memory is not supported for encoder models yet")
                tuner = EncoderTuner(str(path), facts=here, workload=workload, model=spec, runner=runner, objective=objective, cache=cache,
                                     reps=reps, faults=faults, progress=progress, candidate_timeout=candidate_timeout, time_budget=time_budget,
                                     fixed=fixed, trust_remote_code=trust_remote_code)
            else:
                tuner = Tuner(path, facts=here, workload=workload, objective=objective, time_budget=time_budget, quantization=quantization,
                              max_memory=budget, min_throughput=min_throughput, reps=reps, runner=runner, cache=cache, faults=faults,
                              progress=progress, candidate_timeout=candidate_timeout, headroom_gib=headroom_gib, fixed=fixed,
                              check_capacity=check_capacity, model=spec, trust_remote_code=trust_remote_code, decode_loop=decode_loop,
                              compile_modes=tuple(compile_modes), quality_tolerance=quality_tolerance, prompts=real_prompts,
                              fuse_projections=fuse_projections, sdpa_gqa=sdpa_gqa)
            tuner.start = t0 + lock.waited_s
            result = tuner.run()
            if cache is not None and result.pick is not None:
                cache.save_pick(result.config)  # still inside the lock: the next tune reads a complete file
        if lock.waited_s >= 1:
            result.notes.append(f"waited {lock.waited_s:.0f} s for another tune to finish measuring on this machine")
        start_s = getattr(runner, "server_start_s", None)
        if isinstance(start_s, (int, float)):
            result.notes.append(f"fork server ready after {start_s:.1f} s (imports of torch and transformers, overlapped with probing and the first candidate)")
    finally:
        if own_runner:
            runner.close()
    if cache is not None and cache.hits:
        result.notes.append(f"{cache.hits} measurement(s) reused from the cache ({cache.path}); --no-cache to measure afresh")
    if result.pick is None:
        result.notes.append("no candidate worked: see each trial's reason")
    if model is None:
        result.notes.insert(0, f"no model given: tuned the built-in default, a small random Llama at {path} (built locally, no network)")
    return result if report else result.config
