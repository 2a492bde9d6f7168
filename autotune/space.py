"""The candidate space: what a candidate's config looks like, which options exist on this
machine, and what the rules and the memory estimate say of each before anything is loaded.

Adding an axis (a quantization backend, a compile mode, a decode loop) means: a keyword of
:func:`candidate_config`, its cost in :func:`simplicity`, and its values in :func:`full_space`
(which the search and the exhaustive oracle share).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

from .config import Candidate, Workload, parse_config
from .engine import run as run_rules
from .errors import UserError
from .facts import UNKNOWN, Facts
from .memory import GIB, estimate, gpu_budget, int4_groups_that_fit
from .model import ModelSpec
from .trial import Trial

DTYPES = ("bfloat16", "float16", "float32")
# SDPA backends become options of their own at prompts this long (below it they barely differ)
LONG_PROMPT = 1024


# torchao weight-only (and float8) quantization as candidates: TorchAoConfig.to_dict's JSON form
# (torchao 0.18's config_to_dict; the omitted fields take the class defaults in config_from_dict).
# set_inductor_config is off: torchao's recommended inductor settings (coordinate-descent tuning of
# every kernel) made one 1.1 B candidate's compile run past 7 minutes on the H100.
TORCHAO_KINDS = {
    "torchao-int8wo": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {"set_inductor_config": False}},
    # the tinygemm layout: torch's own _weight_int4pack_mm kernel, no extra native package (bfloat16 only)
    "torchao-int4wo": {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {"group_size": 128, "int4_packing_format": "tile_packed_to_4d", "set_inductor_config": False}},
    "torchao-float8dq": {"_type": "Float8DynamicActivationFloat8WeightConfig", "_version": 2,
                         "_data": {"granularity": {"_type": "PerRow", "_version": 1, "_data": {}}, "set_inductor_config": False}},
}
# Inductor options a torchao kind compiles with, given to the sync-free loop as
# generate.compile_config.options (transformers' own loop cannot take options: config.py). int8
# weight-only: without coordinate-descent tuning inductor lowers torchao's x @ w.to(bf16) * scale to
# aten._weight_int8pack_mm (fx_passes/quantization.py, the woq patterns, registered for CUDA too),
# which decoded a 7 B shape at 19.7 tok/s on an H200; with it the M=1 matmul is decomposed into a
# fused Triton reduction first (decomposition.py mm: "Our matrix vector multiplies only achieve
# peak bandwidth with coordinate descent tuning"): 203-277 tok/s over four compiles, against bf16's
# 211-215 (the tuning benchmarks block sizes, and its picks vary; h200-s10-graphs-7b-int8.json,
# h200-s12-graphs-7b-int8-cd-fresh.json). Only one-row matmuls are decomposed: at batch 8 int8
# crawls whatever the options (TORCHAO-INT8WO-BATCHED). int4's tinygemm kernel is no matmul inductor decomposes:
# the same option made it slower (316.7 vs 331.3 tok/s, h200-s10-graphs-7b-int4.json).
TORCHAO_COMPILE_OPTIONS = {"torchao-int8wo": {"coordinate_descent_tuning": True, "triton.cudagraphs": True}}


def int4_group_size(model: ModelSpec | None) -> int:
    """The group size the tune's int4 weight-only kind takes for ``model``: 128 (torchao's
    default, the one measured) where it divides every decoder projection's input size, else
    the largest of 64 and 32 that does. torchao leaves a weight whose input the group does not
    divide unquantized (rule TORCHAO-SHAPES-UNQUANTIZED), so a model of hidden size 576 in
    groups of 128 would be int4 in its down projections only. 128 where none divides them all
    (the rule then warns) or neither the checkpoint nor config.json gives the sizes."""
    fits = int4_groups_that_fit(model) if model is not None else UNKNOWN
    if fits is UNKNOWN:
        return 128
    return next((g for g in (128, 64, 32) if g in fits), 128)


def candidate_config(dtype: str, attn: str, *, backend: str | None = None, cache: str | None = None, compile_: bool = True,
                     quant: str | None = None, compute: str | None = None, device_map: Any = None, max_memory: Any = None,
                     loop: str | None = None, compile_mode: str | None = None, lookup: int | None = None, fuse: bool = False,
                     gqa: bool = False, int4_group: int | None = None) -> dict[str, Any]:
    """A candidate as a config dict (the contract's three parts). ``loop``: runtime.decode_loop;
    ``compile_mode``: generate.compile_config.mode (None: transformers' default); ``lookup``:
    generate.prompt_lookup_num_tokens (prompt-lookup decoding); ``fuse``:
    runtime.fuse_projections (q/k/v and gate/up as one matmul each, :mod:`autotune.fuse`); ``gqa``:
    runtime.sdpa_gqa (SDPA's enable_gqa instead of transformers' key/value copies, :mod:`autotune.gqa`);
    ``int4_group``: the int4 kind's group size where not 128 (:func:`int4_group_size`)."""
    fp: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if device_map is not None:
        fp["device_map"] = device_map
    if max_memory:
        fp["max_memory"] = max_memory
    if quant in TORCHAO_KINDS:
        kind = TORCHAO_KINDS[quant]
        if quant == "torchao-int4wo" and int4_group and int4_group != kind["_data"]["group_size"]:
            kind = {**kind, "_data": {**kind["_data"], "group_size": int4_group}}
        fp["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": kind}}
    elif quant:
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
        if compile_ and compile_mode:
            gen["compile_config"] = {"mode": compile_mode}
        elif compile_ and loop == "sync-free" and quant in TORCHAO_COMPILE_OPTIONS:
            gen["compile_config"] = {"options": dict(TORCHAO_COMPILE_OPTIONS[quant])}
    if lookup:
        gen["prompt_lookup_num_tokens"] = lookup
    rt: dict[str, Any] = {"sdpa_backend": backend}
    if loop:
        rt["decode_loop"] = loop
    if fuse:
        rt["fuse_projections"] = True
    if gqa:
        rt["sdpa_gqa"] = True
    return {"from_pretrained": fp, "generate": gen, "runtime": rt}


def label_of(cfg: dict[str, Any]) -> str:
    return parse_config(cfg).label()


def simplicity(c: Candidate) -> int:
    """Lower is simpler: no quantization, no extra package, no forced backend, no compile, one GPU."""
    s = {"sdpa": 0, "eager": 1, "flex_attention": 2}.get(c.attn_implementation or "sdpa", 3)  # flash_attention_* need a package
    s += 10 if c.quantization not in (None, "none") else 0
    s += 2 if c.sdpa_backend else 0
    s += (1 if c.compile else 3) if c.cache_implementation else 0
    s += 1 if c.compile_mode not in (None, "reduce-overhead") else 0  # a longer compile
    s += 1 if c.decode_loop else 0  # autotune's code in the user's generate
    s += 1 if c.fuse_projections else 0  # autotune's code in the user's model
    s += 1 if c.sdpa_gqa else 0  # autotune's attention function in it
    s += 1 if c.prompt_lookup else 0  # one row per call, and a gain that depends on the text
    return s + placement_cost(c)


def placement_cost(c: Candidate) -> int:
    """Placement's share of simplicity: one GPU < a device_map split < tensor parallel (torchrun) < CPU offload."""
    if c.tensor_parallel:
        return 4
    if isinstance(c.max_memory, dict) and "cpu" in c.max_memory:
        return 8
    if c.device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return 2
    return 0


def regime(cfg: dict[str, Any], device: str) -> str:
    """How a candidate's decode runs: "compiled" (static cache, compiled by transformers on CUDA)
    or "eager" (dynamic cache, or a static one that is not compiled). Measurements from one
    regime do not rank candidates of the other (docs/PERFORMANCE.md)."""
    gen = cfg.get("generate") or {}
    fixed = gen.get("cache_implementation") in ("static", "offloaded_static")
    return "compiled" if device == "cuda" and fixed and not gen.get("disable_compile") else "eager"


def same_candidate(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two configs that load and generate alike (placement keys aside), with the same SDPA backend,
    decode loop, fused projections and SDPA grouped-query attention (or not)."""
    def key(c: dict[str, Any]) -> tuple:
        fp = {k: v for k, v in (c.get("from_pretrained") or {}).items() if k not in ("device_map", "max_memory")}
        rt = c.get("runtime") or {}
        return (sorted(fp.items(), key=str), sorted((c.get("generate") or {}).items(), key=str), rt.get("sdpa_backend"),
                rt.get("decode_loop") or "transformers", bool(rt.get("fuse_projections")), bool(rt.get("sdpa_gqa")))
    return key(a) == key(b)


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


def preferred(facts: Facts) -> tuple[str, str]:
    """(device, preferred dtype) for this machine."""
    gpus = facts.gpus if facts.gpus is not UNKNOWN else ()
    cuda = bool(gpus) and facts.torch_cuda not in (None, UNKNOWN)
    if not cuda:
        flags = (facts.host or {}).get("cpu_flags", []) if isinstance(facts.host, dict) else []
        return "cpu", "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"
    ampere = all(g.capability is not None and g.capability.at_least(8) for g in gpus)
    return "cuda", "bfloat16" if ampere else "float16"


def first_gpu_name(facts: Facts) -> Any:
    """The name of GPU 0, the one results are recorded under (None without a GPU)."""
    return facts.gpus[0].name if facts.gpus not in (UNKNOWN, ()) and facts.gpus else None


def attentions(device: str, workload: Workload, notes: list[str] | None = None) -> list[str]:
    """The attention implementations worth measuring here (the rules drop the ones that cannot run)."""
    out = ["sdpa", "eager"]
    if device == "cuda":
        out += ["flash_attention_2", "flash_attention_3", "flash_attention_4"]
        if workload.prompt_len >= 2048:
            out.append("flex_attention")
        elif notes is not None:
            notes.append("flex_attention not measured below 2,048-token prompts (it compiles kernels of its own; even at 4,096 it ran 38 % slower than sdpa compiled on an H100)")
    elif notes is not None:
        notes.append("flash attention and flex attention not measured on the CPU (CUDA only, or compile-bound there)")
    return out


def attention_options(device: str, workload: Workload, fixed: dict[str, str], notes: list[str] | None = None) -> list[tuple[str, str | None]]:
    """(attention, SDPA backend) pairs: each implementation, and on CUDA at long prompts each SDPA backend."""
    attns = [fixed["attention"]] if "attention" in fixed else attentions(device, workload, notes)
    out: list[tuple[str, str | None]] = [(a, None) for a in attns]
    if device == "cuda" and workload.prompt_len >= LONG_PROMPT and "sdpa" in attns:
        out += [("sdpa", b) for b in ("flash", "efficient", "cudnn")]
    return out


def full_space(device: str, half: str, workload: Workload, fixed: dict[str, str] | None = None, *, fuse: bool = False,
               gqa: bool = False) -> Iterator[dict[str, Any]]:
    """Every unquantized single-device candidate: dtype x attention (x SDPA backend) x cache/compile
    (x compile mode x decode loop x fused projections, where ``fuse``, x SDPA's own grouped-query
    attention, where ``gqa`` and the attention is SDPA with a backend that takes it, where it compiles).
    The exhaustive oracle measures all of it; the search measures a part chosen by regime."""
    fixed = fixed or {}
    dtypes = [fixed["dtype"]] if "dtype" in fixed else list(DTYPES)
    caches: list[tuple[str | None, bool]] = [(None, True)]
    if fixed.get("cache") != "dynamic":
        caches += [("static", True), ("static", False)] if device == "cuda" else [("static", False)]
    for dtype in dtypes:
        for attn, backend in attention_options(device, workload, fixed):
            for cache, comp in caches:
                compiled = bool(cache and comp and device == "cuda")  # what compiling adds: the decode loop, the compile modes, fused projections
                for f, g in transforms(attn, backend, fuse=fuse and compiled, gqa=gqa and compiled):
                    for mode, loop in ((None, None), *(COMPILE_VARIANTS if compiled else ())):
                        yield candidate_config(dtype, attn, backend=backend, cache=cache, compile_=comp, loop=loop, compile_mode=mode, fuse=f, gqa=g)


def gqa_applies(attn: str, backend: str | None) -> bool:
    """Whether runtime.sdpa_gqa goes with this attention and SDPA backend: SDPA's, on a backend that
    takes grouped heads with a mask (not forced to flash or efficient: rule SDPA-GQA-BACKEND)."""
    return attn == "sdpa" and backend not in ("flash", "efficient")


def transforms(attn: str, backend: str | None, *, fuse: bool, gqa: bool) -> list[tuple[bool, bool]]:
    """The (fuse_projections, sdpa_gqa) pairs a compiled candidate of this attention is tried with,
    the tune's screen and the oracle alike: each with and without fusing where ``fuse``, each also
    with SDPA's GQA where ``gqa`` and :func:`gqa_applies`."""
    return [(f, g) for f in ((False, True) if fuse else (False,))
            for g in ((False, True) if gqa and gqa_applies(attn, backend) else (False,))]


# A compiled static cache's variants beyond transformers' default (CompileConfig mode reduce-overhead,
# its own loop): autotune's sync-free loop, and max-autotune compiles (GEMM autotuning, longer compiles)
COMPILE_VARIANTS: tuple[tuple[str | None, str | None], ...] = ((None, "sync-free"), ("max-autotune", None), ("max-autotune", "sync-free"))


class Space:
    """What can run here: rules and memory estimate for each candidate, and where it is placed."""

    def __init__(self, model: ModelSpec, facts: Facts, workload: Workload, *, max_memory: dict[str, int] | None = None,
                 headroom_gib: float = 1.0, fixed: dict[str, str] | None = None) -> None:
        if headroom_gib < 0:
            raise UserError("headroom must be >= 0 GiB")
        self.model, self.facts, self.workload = model, facts, workload
        self.max_memory = max_memory
        self.headroom = int(headroom_gib * GIB)
        self.fixed = pinned_axes(fixed)
        self.trust_remote_code = False
        self.device, self.half = preferred(facts)
        # the rules and the estimate judge against the user's budget where it is below what is free
        self.judge_facts = facts
        if max_memory and facts.gpus not in (UNKNOWN, ()):
            self.judge_facts = facts.replace(gpus=tuple(
                dataclasses.replace(g, memory_free_gib=min(max_memory[str(g.index)] / GIB, g.memory_free_gib if isinstance(g.memory_free_gib, (int, float)) else float("inf")))
                if str(g.index) in max_memory else g for g in facts.gpus))

    def gpu_indexes(self) -> list[int]:
        return [g.index for g in self.facts.gpus] if self.device == "cuda" else []

    def budget(self, index: int) -> int | None:
        """Bytes GPU ``index`` may hold: the user's --max-memory, else its free memory."""
        if self.max_memory and str(index) in self.max_memory:
            return self.max_memory[str(index)]
        b = gpu_budget(self.facts, index, Candidate())
        return None if b is UNKNOWN else b

    def fit_together(self, trials: Sequence[Any], also: Sequence[Any] = ()) -> bool:
        """May ``trials`` sit in GPU 0's memory at once (beside the biggest of ``also``, e.g. a
        screen)? Only on CUDA, on one GPU each, under no --max-memory budget (a per-process cap
        would not bound their sum), and when their estimates together fit what is free."""
        live = [t for t in trials if t.status != "dropped"]
        if self.device != "cuda" or not live or self.max_memory:
            return False
        if any(t.config["from_pretrained"].get("device_map") not in ({"": 0}, "cuda", "cuda:0", 0) or not isinstance(t.estimate_gib, (int, float))
               for t in [*live, *also]):
            return False
        budget = self.budget(0)
        extra = max((t.estimate_gib for t in also), default=0.0)
        return budget is not None and (sum(t.estimate_gib for t in live) + extra) * GIB + self.headroom <= budget

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

    def estimate(self, cfg: dict[str, Any]) -> Any:
        """The memory estimate of ``cfg`` at this workload, on this machine's device."""
        return estimate(parse_config(cfg, workload=self.workload), self.model, self.facts, on_gpu=self.device == "cuda")

    def placement(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """{"": 0} when GPU 0 holds it (by the estimate), else device_map="auto" with max_memory."""
        if self.device == "cpu":
            return {"device_map": "cpu"}
        est = self.estimate(cfg)
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
             compile_: bool = True, quant: str | None = None, loop: str | None = None, compile_mode: str | None = None,
             lookup: int | None = None, fuse: bool = False, gqa: bool = False) -> Trial:
        base = candidate_config(dtype, attn, backend=backend, cache=cache, compile_=compile_, quant=quant, compute=self.half if quant else None,
                                loop=loop, compile_mode=compile_mode, lookup=lookup, fuse=fuse, gqa=gqa,
                                int4_group=int4_group_size(self.model) if quant == "torchao-int4wo" else None)
        return self.place(stage, base)

    def place(self, stage: str, cfg: dict[str, Any]) -> Trial:
        """A trial of ``cfg`` with this machine's placement."""
        cfg = {"from_pretrained": dict(cfg["from_pretrained"]), "generate": dict(cfg.get("generate") or {}), "runtime": dict(cfg.get("runtime") or {})}
        cfg["from_pretrained"].update(self.placement(cfg))
        return self.trial(stage, cfg)

    def trial(self, stage: str, cfg: dict[str, Any], label: str | None = None) -> Trial:
        if self.trust_remote_code:  # the user said so (the model's auto_map); recorded in every config
            cfg = {**cfg, "from_pretrained": {**cfg["from_pretrained"], "trust_remote_code": True}}
        c = parse_config(cfg, workload=self.workload)
        t = Trial(label=label or label_of(cfg), stage=stage, config=cfg, simplicity=simplicity(c))
        self.judge(t)
        t.simplicity += 1 if t.warnings else 0  # a rule's warning (runs, but emulated or risky) loses ties
        return t

    def baseline(self, label: str, runtime: dict[str, Any] | None = None) -> Trial:
        """transformers' defaults as a user loads them on this device (``runtime``: e.g. the Auto class), judged."""
        cfg: dict[str, Any] = {"from_pretrained": {"device_map": "cuda" if self.device == "cuda" else "cpu"}, "generate": {}, "runtime": dict(runtime or {})}
        if self.trust_remote_code:
            cfg["from_pretrained"]["trust_remote_code"] = True
        t = Trial(label=label, stage="baseline", config=cfg, simplicity=0)
        self.judge(t)
        return t

    def judge(self, t: Trial) -> None:
        """Rules and the memory estimate, before anything is loaded."""
        cand = parse_config(t.config, workload=self.workload)
        res = run_rules(self.judge_facts, cand, self.model)
        # what the hardware cannot do first: an install does not lift it (FA2 on a T4 is
        # "needs Ampere" before "flash-attn is not installed")
        errors = sorted((f for f in res.findings if f.severity == "error"), key=lambda f: "-ARCH" not in f.rule)
        t.warnings = [f"{f.rule}: {f.message}" for f in res.findings if f.severity == "warning"]
        est = estimate(cand, self.model, self.facts, on_gpu=self.device == "cuda")
        if est is not UNKNOWN:
            t.estimate_gib = round(est.total / GIB, 3)
        if errors:
            t.status = "dropped"
            t.errors = [f"{f.rule}: {f.message}" for f in errors]
            t.reason = "; ".join(t.errors)


def finish_config(cfg: dict[str, Any], facts: Facts, workload: Workload, objective: str, *, measured: bool,
                  reasons: list[str] | None = None) -> dict[str, Any]:
    """The config dict of the contract: the candidate's parts, plus how it was made."""
    import json

    from . import __version__

    out = json.loads(json.dumps(cfg))
    out.setdefault("generate", {})
    rt = out.setdefault("runtime", {})
    rt.setdefault("sdpa_backend", None)
    rt["padding_side"] = "left"
    rt.setdefault("launch", None)
    out["autotune"] = {
        "schema": 1,
        "version": __version__,
        "objective": objective,
        "measured": measured,
        "workload": dataclasses.asdict(workload),
        "tuned_on": {"facts": facts.fingerprint(), "gpu": first_gpu_name(facts), "torch": facts.package("torch") or None,
                     "transformers": facts.package("transformers") or None},
    }
    if reasons:
        out["autotune"]["reasons"] = reasons
    return out
