"""Encoder and embedding models (BERT-class), tuned for what they serve: one forward over a batch.

The workload is ``batch_size`` sequences of ``seq_len`` tokens (``Workload.prompt_len``; with
``padding`` the rows have lengths from the whole sequence down to about half, padded on the right
as a tokenizer pads a batch). A candidate is dtype x attention x ``torch.compile`` mode, loaded
through ``AutoModel`` (``runtime.model_class``); it is timed by single forwards (sequences/s,
latency p50/p99) in a fresh process, and judged by its mean-pooled embeddings against the most
precise candidate's (float32, eager preferred): cosine similarity, with a noise floor per dtype.

The search:

1. every dtype x attention the rules let through, uncompiled (on CUDA also SDPA with each fused
   backend forced: flash, efficient, cuDNN);
2. on CUDA, ``torch.compile`` (default mode, and ``reduce-overhead``, which adds CUDA graphs)
   of each dtype x attention within ``COMPILE_MARGIN`` of the best uncompiled speed, warmed up
   (compiled) side by side where memory allows and timed one at a time;
3. the two best re-measured in fresh processes when they are within ``HEAD_TO_HEAD`` of each other.

On the CPU nothing is compiled (inductor's C++ compile takes minutes there, and transformers'
own guides compile for CUDA); that is noted in the report.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import Workload
from .facts import Facts
from .judge import Judge, dtype_of, logits_of, mark_reference, precision_of, quickest_compile
from .measure import Bench, OnBench
from .model import ModelSpec
from .space import DTYPES, Space, finish_config
from .trial import STATUS_OK, Trial

ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
COMPILE_MODES_MEASURED = ("default", "reduce-overhead")
# forced SDPA backends measured uncompiled on CUDA (math, the unfused reference, is left out);
# compiled variants are taken of the default dispatch only, which picks among these itself
SDPA_BACKENDS = ("flash", "efficient", "cudnn")
# compiled variants are measured for the dtype x attention within this fraction of the best
# uncompiled speed: compiling removes launch gaps and fuses, it does not make float32 matmuls
# as fast as half-precision tensor cores
COMPILE_MARGIN = 0.5
HEAD_TO_HEAD = 0.10
# quality: 1 - mean cosine to the reference within max(FLOOR_FACTOR x the dtype's floor, MIN_TOL),
# and no row below ROW_MIN_COS
FLOOR_FACTOR = 10.0
MIN_TOL = 1e-5
ROW_MIN_COS = 0.99


def encoder_config(dtype: str | None, attn: str | None, compile_mode: str | None = None, backend: str | None = None) -> dict[str, Any]:
    fp: dict[str, Any] = {}
    if dtype:
        fp["dtype"] = dtype
    if attn:
        fp["attn_implementation"] = attn
    rt: dict[str, Any] = {"model_class": "AutoModel"}
    if backend:
        rt["sdpa_backend"] = backend
    if compile_mode:
        rt["compile"] = {"mode": compile_mode}
    return {"from_pretrained": fp, "generate": {}, "runtime": rt}


def compare_embeddings(ref: Any, emb: Any) -> dict[str, float]:
    """Cosine similarity of each row's embedding to the reference's: the mean and the lowest."""
    import torch

    if ref.shape != emb.shape:
        return {"cos_mean": 0.0, "cos_min": 0.0}
    cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=-1)
    cos = torch.nan_to_num(cos, nan=0.0)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def check_embeddings(trials: list[Trial], notes: list[str]) -> float | None:
    """Each measured candidate's pooled embeddings against the most precise one's, with a noise
    floor per dtype (the closest any candidate of that dtype came). Marks the ones beyond it
    "wrong"; returns the lowest floor (1 - mean cosine)."""
    have = [(t, e) for t in trials if t.status == STATUS_OK for e in [logits_of(t)] if e is not None]
    if not have:
        return None

    def precision(item: tuple[Trial, Any]) -> tuple[int, int, int]:
        t = item[0]
        return (precision_of(t),
                0 if t.config["from_pretrained"].get("attn_implementation") == "eager" else 1,
                1 if (t.config.get("runtime") or {}).get("compile") else 0)

    def dt(t: Trial) -> str:
        return str(dtype_of(t) or "default")

    ref, ref_emb = min(have, key=precision)
    gaps = {id(t): compare_embeddings(ref_emb, e) for t, e in have if t is not ref}
    floors: dict[str, float] = {}
    for t, _ in have:
        if t is not ref:
            gap = 1 - gaps[id(t)]["cos_mean"]
            floors[dt(t)] = min(floors.get(dt(t), gap), gap)
    for t, _ in have:
        if t is ref:
            mark_reference(t, {"cos_mean": 1.0, "cos_min": 1.0}, "embeddings")
            continue
        m = gaps[id(t)]
        floor = max(floors.get(dt(t), 0.0), 0.0)
        tol = max(FLOOR_FACTOR * floor, MIN_TOL)
        t.quality = {"cos_mean": m["cos_mean"], "cos_min": m["cos_min"], "reference": ref.label, "floor": floor, "tolerance": tol}
        finite = all(r.get("logits_finite", True) for r in t.results if r.get("status") == STATUS_OK)
        if not finite or 1 - m["cos_mean"] > tol or m["cos_min"] < ROW_MIN_COS:
            why = ("embeddings contain NaN/inf" if not finite else
                   f"embeddings differ from {ref.label}'s: mean cosine {m['cos_mean']:.6f} (1 - cos {1 - m['cos_mean']:.2e} > tolerance {tol:.2e}), "
                   f"lowest row {m['cos_min']:.4f}")
            t.status, t.reason = "wrong", why
    lowest = min(floors.values()) if floors else 0.0
    notes.append(f"quality: pooled embeddings against {ref.label}; noise floor per dtype (1 - mean cosine): "
                 + ", ".join(f"{d} {f:.1e}" for d, f in sorted(floors.items())))
    return lowest


class EncoderTuner(OnBench):
    """Measures an encoder's candidates on this machine and picks the fastest that is correct."""

    def __init__(self, model_path: str, *, facts: Facts, workload: Workload, model: ModelSpec, runner: Any, objective: str = "throughput",
                 cache: Any = None, reps: int = 3, faults: dict[str, str] | None = None, progress: Callable[[str, int, int], None] | None = None,
                 candidate_timeout: float | None = None, time_budget: float | None = None, fixed: dict[str, str] | None = None,
                 trust_remote_code: bool = False) -> None:
        if objective != "throughput":
            from .errors import UserError

            raise UserError(f"encoder models are tuned for throughput (sequences/s); --objective {objective} is for text generation")
        self.path, self.facts, self.workload, self.model = str(model_path), facts, workload, model
        self.objective = objective
        self.notes: list[str] = []
        self.space = Space(model, facts, workload, fixed=fixed)
        self.space.trust_remote_code = trust_remote_code
        self.bench = Bench(self.path, workload, runner=runner, cache=cache, reps=reps, faults=faults, progress=progress,
                           candidate_timeout=candidate_timeout, time_budget=time_budget)
        self.judge = Judge(objective, notes=self.notes, speed="seq_s")
        self.baseline: Trial | None = None

    def trial(self, stage: str, cfg: dict[str, Any]) -> Trial:
        return self.space.place(stage, cfg)  # this machine's placement, the rules and the memory estimate

    def make_baseline(self) -> Trial:
        """``AutoModel.from_pretrained(path)`` as a user writes it, on the device: the checkpoint's
        dtype as transformers loads it by default, its default attention, no compile."""
        self.baseline = self.space.baseline("baseline: AutoModel.from_pretrained(path) defaults", {"model_class": "AutoModel"})
        return self.baseline

    def search(self) -> None:
        """The stages of the module's docstring, in order."""
        sp, bench = self.space, self.bench
        baseline = self.make_baseline()
        dtypes = [sp.fixed["dtype"]] if "dtype" in sp.fixed else list(DTYPES)
        attns = [sp.fixed["attention"]] if "attention" in sp.fixed else list(ATTENTIONS)
        plain = [self.trial("encode", encoder_config(d, a)) for d in dtypes for a in attns]
        if sp.device == "cuda" and "sdpa" in attns:  # SDPA's fused backends, forced one at a time (the rules drop what cannot run)
            plain += [self.trial("encode", encoder_config(d, "sdpa", backend=b)) for d in dtypes for b in SDPA_BACKENDS]
        for t in bench.add([baseline, *plain]):
            bench.measure(t)
        ok = [t for t in plain if t.status == STATUS_OK and not t.config["runtime"].get("sdpa_backend")]
        if sp.device == "cuda" and ok:
            best = max(t.median("seq_s") or 0 for t in ok)
            near = [t for t in ok if (t.median("seq_s") or 0) >= (1 - COMPILE_MARGIN) * best]
            for t in ok:
                if t not in near:
                    self.notes.append(f"{t.label}: not compiled ({t.median('seq_s'):.0f} seq/s uncompiled, below "
                                      f"{1 - COMPILE_MARGIN:.0%} of the best {best:.0f})")
            compiled = [self.trial("compile", encoder_config(t.config["from_pretrained"].get("dtype"), t.config["from_pretrained"].get("attn_implementation"), mode))
                        for t in near for mode in COMPILE_MODES_MEASURED]
            compiled = bench.add(compiled)
            launched = bench.launch(compiled) if sp.fit_together(compiled) else {}
            bench.warm(launched)
            for t in compiled:
                bench.measure(t, launched.get(t.label))
        elif sp.device != "cuda":
            self.notes.append("torch.compile not measured on the CPU (inductor's C++ compile takes minutes there); on a GPU it is")
        self.head_to_head()

    def run(self) -> Any:
        from .tuner import TuneResult

        interrupted = self.run_search(self.search)
        floor = check_embeddings(self.trials, self.notes)
        self.compile_breakeven()
        pick = self.judge.choose(self.trials)
        if self.bench.contended:
            self.notes.append(f"{len(self.bench.contended)} run(s) shared the machine with other work and are not cached "
                              f"(their figures may be low): {self.bench.contended[0]}")
        self.notes.append("capacity (the largest batch) is not checked for encoder models yet")
        config = {}
        if pick:
            config = finish_config(pick.config, self.facts, self.workload, self.objective, measured=True)
            config["runtime"]["padding_side"] = "right"
        return TuneResult(config=config, trials=self.trials, pick=pick, baseline=self.baseline, facts=self.facts, model=self.model,
                          workload=self.workload, objective=self.objective, wall_s=self.bench.elapsed(), measured=True, notes=self.notes,
                          capacity={}, quality_floor=floor, interrupted=interrupted, timeline=self.bench.timeline)

    def head_to_head(self) -> None:
        """The two fastest, each measured once more in a fresh process, when they are close."""
        ranked = sorted((t for t in self.trials if t.status == STATUS_OK and t.stage != "baseline"), key=lambda t: t.median("seq_s") or 0, reverse=True)
        if len(ranked) < 2:
            return
        a, b = ranked[:2]
        if (b.median("seq_s") or 0) < (1 - HEAD_TO_HEAD) * (a.median("seq_s") or 0):
            return
        for t in (a, b):
            self.bench.measure(t)

    def compile_breakeven(self) -> None:
        """For each compiled candidate faster than its uncompiled twin: after how many batches its compile pays off."""
        by_key = {(dtype_of(t), t.config["from_pretrained"].get("attn_implementation")): t for t in self.trials
                  if t.stage == "encode" and t.status == STATUS_OK and not t.config["runtime"].get("sdpa_backend")}
        for t in self.trials:
            if t.stage != "compile" or t.status != STATUS_OK:
                continue
            twin = by_key.get((dtype_of(t), t.config["from_pretrained"].get("attn_implementation")))
            quick = quickest_compile(t)
            comp = quick["compile_s"] if quick else None
            fast, slow = t.median("latency_s"), twin.median("latency_s") if twin else None
            if comp and fast and slow and slow > fast:
                batches = comp / (slow - fast)
                t.quality["compile_breakeven_batches"] = int(batches)
                self.notes.append(f"{t.label}: compiling took {comp:.0f} s and pays off after about {batches:,.0f} batches of this workload "
                                  f"against {twin.label}")


def workload_for(batch_size: int, seq_len: int, padding: bool) -> Workload:
    return Workload(batch_size=batch_size, prompt_len=seq_len, new_tokens=0, padding=padding, task="encode")


__all__ = ["EncoderTuner", "encoder_config", "compare_embeddings", "check_embeddings", "workload_for"]
