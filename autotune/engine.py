"""Run the rules over (facts, model, candidate): findings, and what could not be evaluated.

The fact paths a rule may read:

* ``pkg.NAME`` (version, ``null`` = not installed), ``torch_cuda``, ``driver.version`` /
  ``driver.cuda``, ``gpus.count``, ``host.*``, ``env.*``, ``nvml.*``, ``deep.*``, ``source``
* ``gpu.*`` — one GPU the candidate uses (rules with ``scope = "gpu"`` run once per GPU)
* ``model.*`` — the ModelSpec (``model.head_dim``, ``model.supports.flash_attn``, ...)
* ``candidate.*`` — the options (``candidate.dtype``, ``candidate.attn_implementation``, ...)
* ``workload.*`` — batch size, prompt length, new tokens, padding
* ``derived.*`` — facts computed from the others (device, placement, CUDA tag, ...)
* ``mem.*`` — the memory estimate against the GPUs' (or the host's) memory
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from packaging.version import Version

from .config import Candidate
from .facts import GPU, UNKNOWN, Facts, parse_version
from .memory import fit, int4_groups_that_fit, int4_padding, load_dtype, torchao_unquantized
from .model import ModelSpec
from .rules import Rule, Unknown, condition_facts, default_rules, evaluate, render

# CUDA builds PyTorch publishes wheels for, newest last (https://download.pytorch.org/whl/)
TORCH_CUDA_TAGS = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    option: str
    message: str
    fix: str
    source: str
    name: str = ""
    gpu: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = {"rule": self.rule, "severity": self.severity, "option": self.option, "message": self.message, "fix": self.fix, "source": self.source}
        if self.gpu is not None:
            d["gpu"] = self.gpu
        return d


@dataclass(frozen=True)
class NotEvaluated:
    rule: str
    needs: tuple[str, ...]
    option: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "needs": list(self.needs)}


@dataclass
class Result:
    findings: list[Finding] = field(default_factory=list)
    not_evaluated: list[NotEvaluated] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


def gpus_used(candidate: Candidate, facts: Facts) -> Any:
    """CUDA ordinals the candidate puts weights on; [] for CPU; UNKNOWN when GPUs are unknown.

    Ordinals named explicitly (``device_map={"": 1}``, ``"cuda:1"``) are returned even when
    that GPU is not visible, so the placement rules can say so.
    """
    dm = candidate.device_map
    if dm in ("cpu", "disk") or (isinstance(dm, dict) and all(str(v) in ("cpu", "disk") for v in dm.values())):
        return []
    if isinstance(dm, bool):
        dm = None
    if isinstance(dm, int):
        return [dm]
    if isinstance(dm, str) and dm.startswith("cuda:"):
        return [int(dm[5:])]
    if isinstance(dm, dict):
        used = set()
        for v in dm.values():
            s = str(v)
            if s.isdigit():
                used.add(int(s))
            elif s.startswith("cuda"):
                used.add(int(s[5:]) if ":" in s else 0)
        return sorted(used)
    if facts.gpus is UNKNOWN:
        return UNKNOWN
    visible = [g.index for g in facts.gpus]
    if dm == "cuda":
        return [0]
    if not visible:
        return []
    if candidate.tensor_parallel:
        return visible[: candidate.tp_size] if candidate.tp_size else visible  # torchrun's LOCAL_RANK r uses GPU r
    if dm in ("auto", "balanced", "balanced_low_0", "sequential"):
        if candidate.max_memory:
            named = [int(k) for k in candidate.max_memory if k.isdigit()]
            return [i for i in visible if i in named]
        return visible
    return [visible[0]]  # no device_map: the user moves the model to GPU 0 (model.to("cuda"))


def _nvlinked(facts: Facts, gpus: list[int]) -> Any:
    """True when every pair of these GPUs has NVLink, False when a pair has none, else UNKNOWN."""
    if facts.links is UNKNOWN or not facts.links:
        return UNKNOWN
    pairs = {(min(x.a, x.b), max(x.a, x.b)): x for x in facts.links}
    seen = []
    for i, a in enumerate(gpus):
        for b in gpus[i + 1:]:
            link = pairs.get((min(a, b), max(a, b)))
            seen.append(UNKNOWN if link is None or link.nvlink_links is UNKNOWN else link.nvlink_links > 0)
    if any(v is False for v in seen):
        return False
    return UNKNOWN if any(v is UNKNOWN for v in seen) else True


def _cuda_tag(driver_cuda: Any) -> Any:
    if not isinstance(driver_cuda, str):
        return UNKNOWN
    try:
        have = Version(driver_cuda)
    except Exception:  # noqa: BLE001
        return UNKNOWN
    fitting = [t for t in TORCH_CUDA_TAGS if Version(t) <= have]
    return "cu" + fitting[-1].replace(".", "") if fitting else UNKNOWN


class Context:
    """Resolves fact paths for one evaluation."""

    def __init__(self, facts: Facts, model: ModelSpec | None, candidate: Candidate | None, gpu: GPU | None = None) -> None:
        self.facts, self.model, self.candidate, self.gpu = facts, model, candidate, gpu
        self._derived: dict[str, Any] | None = None
        self._mem: dict[str, Any] | None = None

    def with_gpu(self, gpu: GPU | None) -> "Context":
        c = Context(self.facts, self.model, self.candidate, gpu)
        c._derived, c._mem = self._derived, self._mem
        return c

    def get(self, path: str) -> Any:
        head, _, rest = path.partition(".")
        f = self.facts
        if head == "pkg":
            return f.package(rest)
        if head == "release":  # release.transformers.torch_floor: a fact of the installed release, harvested
            from .rules import release_fact

            package, _, key = rest.partition(".")
            installed = f.package(package)
            return installed if installed is None or installed is UNKNOWN else release_fact(package, installed, key)
        if head == "torch_cuda":
            return f.torch_cuda
        if head == "source":
            return f.source
        if head == "gpus":
            if rest == "count":
                return f.gpu_count
            if rest == "names":
                return UNKNOWN if f.gpus is UNKNOWN else sorted({g.name for g in f.gpus if g.name is not UNKNOWN})
            return UNKNOWN
        if head in ("driver", "host", "env", "nvml", "deep"):
            return _dig(getattr(f, head), rest)
        if head == "gpu":
            if self.gpu is None:
                return UNKNOWN
            if rest == "label":
                return self.gpu.label()
            if rest == "arch_major":  # "10" for compute capability 10.0: SASS runs within one major architecture
                cc = self.gpu.compute_capability
                return str(cc).split(".")[0] if isinstance(cc, str) and cc else UNKNOWN
            return getattr(self.gpu, rest, UNKNOWN)
        if head == "model":
            return UNKNOWN if self.model is None else self.model.get(rest)
        if head == "candidate":
            if self.candidate is None:
                return UNKNOWN
            if rest == "legacy":
                return list(self.candidate.legacy)
            if rest == "unjudged":
                return list(self.candidate.unjudged)
            if rest == "misspelt":  # unjudged keys one typo away from a key autotune knows
                import difflib

                from .config import _JUDGED

                hits = ((k, difflib.get_close_matches(k, sorted(_JUDGED), n=1, cutoff=0.8)) for k in self.candidate.unjudged)
                return [f"{k!r} (did you mean {m[0]!r}?)" for k, m in hits if m]
            if rest == "compile":
                return self.candidate.compile
            if rest == "max_memory_keys":
                return sorted(self.candidate.max_memory) if self.candidate.max_memory else []
            value = getattr(self.candidate, rest, UNKNOWN)
            return value if isinstance(value, (str, int, float, bool, list, tuple, type(None))) else str(value)
        if head == "workload":
            return UNKNOWN if self.candidate is None else getattr(self.candidate.workload, rest, UNKNOWN)
        if head == "derived":
            return self.derived().get(rest, UNKNOWN)
        if head == "mem":
            return self.mem().get(rest, UNKNOWN)
        return UNKNOWN

    def derived(self) -> dict[str, Any]:
        if self._derived is not None:
            return self._derived
        f, c = self.facts, self.candidate
        d: dict[str, Any] = {"cuda_tag": _cuda_tag(_dig(f.driver, "cuda"))}
        tv = f.package("transformers")
        tvp = parse_version(tv)
        d["transformers_major"] = tvp.major if tvp else (tv if not isinstance(tv, str) else UNKNOWN)
        torch_v = f.package("torch")
        tp = parse_version(torch_v)
        d["torch_public"] = tp.public if tp else (torch_v if not isinstance(torch_v, str) else UNKNOWN)
        d["unparsed_versions"] = f.unparsed_versions()
        d["driver_vs_torch_cuda"] = _driver_vs_torch(_dig(f.driver, "cuda"), f.torch_cuda)
        if f.gpus is not UNKNOWN:
            d["mixed_gpus"] = len({(g.name, g.compute_capability) for g in f.gpus}) > 1
        if c is not None:
            used = gpus_used(c, f)
            d["gpus_used"] = used
            if used is not UNKNOWN:
                d["device"] = "cuda" if used else "cpu"
                d["gpus_used_count"] = len(used)
                if not used:
                    d["placement"] = "cpu"
                elif isinstance(c.device_map, dict) and any(str(v) in ("cpu", "disk") for v in c.device_map.values()):
                    d["placement"] = "offload"
                else:
                    d["placement"] = "multi-gpu" if len(used) > 1 else "single-gpu"
                if f.gpus is not UNKNOWN:
                    visible = {g.index for g in f.gpus}
                    d["missing_gpus"] = [i for i in used if i not in visible]
                    d["visible_gpus"] = sorted(visible)
                    mm = c.max_memory or {}
                    d["max_memory_unknown_gpus"] = [k for k in mm if k.isdigit() and int(k) not in visible]
            d["offload"] = isinstance(c.device_map, dict) and any(str(v) in ("cpu", "disk") for v in c.device_map.values())
            d["tuned_on_differs"] = _tuned_on_differs(c.tuned_on, f)
            d["padding"] = c.workload.padding and c.workload.batch_size > 1
            d["load_dtype"] = load_dtype(c, self.model, tv)
            d["quantized"] = c.quantization != "none"
            d["attn_effective"] = c.attn_implementation or ("sdpa" if tvp and tvp >= Version("4.36") else UNKNOWN)
            if self.model is not None and self.model.gqa is not UNKNOWN:
                # transformers passes enable_gqa to SDPA only when there is no mask to pass
                d["gqa_without_mask"] = self.model.gqa and not d["padding"]
            heads = self.model.num_heads if self.model is not None else UNKNOWN
            kv = self.model.num_kv_heads if self.model is not None else UNKNOWN
            if self.model is not None:
                # output widths of the Linear layers bitsandbytes quantizes (q/k/v/o, MLP)
                m = self.model
                widths = {m.hidden_size, m.intermediate_size,
                          heads * m.head_dim if isinstance(heads, int) and isinstance(m.head_dim, int) else UNKNOWN,
                          kv * m.head_dim if isinstance(kv, int) and isinstance(m.head_dim, int) else UNKNOWN}
                if all(isinstance(x, int) for x in widths):
                    d["linear_widths_off_32"] = sorted(x for x in widths if x % 32)
                # the projections a torchao config leaves as loaded (shapes its kernels do not take)
                unquantized = torchao_unquantized(c, m)
                if unquantized is not UNKNOWN:
                    d["torchao_unquantized"] = unquantized[0]
                    d["torchao_unquantized_share"] = f"{unquantized[1]:.0%}"
                padding = int4_padding(c, m)
                if padding is not UNKNOWN:
                    d["int4_padding"], d["int4_padded"] = round(padding[0], 3), padding[1]
                    d["int4_padding_pct"] = f"{padding[0]:.0%}"
                fits = int4_groups_that_fit(m) if c.quantization == "torchao" else UNKNOWN  # for a torchao rule's fix only
                if fits is not UNKNOWN:
                    d["torchao_group_sizes_that_fit"] = " or ".join(map(str, fits)) or "none"
            if f.gpus is not UNKNOWN and f.gpus:
                d["tp_size"] = (c.tp_size or len(f.gpus)) if c.tensor_parallel else None
                d["tp_exceeds_gpus"] = d["tp_size"] is not None and d["tp_size"] > len(f.gpus)
                d["tp_nvlink"] = _nvlinked(f, used) if d["tp_size"] and used is not UNKNOWN else None
            if heads is not UNKNOWN and kv is not UNKNOWN and f.gpus is not UNKNOWN and f.gpus:
                n = d["tp_size"] or len(f.gpus)
                d["heads_divide_gpus"] = heads % n == 0 and kv % n == 0
        self._derived = d
        return d

    def mem(self) -> dict[str, Any]:
        if self._mem is None:
            used = self.derived().get("gpus_used", UNKNOWN)
            c = self.candidate
            if c is not None and c.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
                base = {"spills": False}  # only a device_map strategy moves layers to the CPU by itself
            else:
                base = {}
            if self.model is None or c is None or used is UNKNOWN:
                self._mem = base
            else:
                self._mem = fit(self.candidate, self.model, self.facts, used)
        return self._mem


def _driver_vs_torch(driver_cuda: Any, torch_cuda: Any) -> Any:
    """'older-major' (cannot run), 'older-minor' (minor-version compatibility), 'ok', or UNKNOWN."""
    if torch_cuda is None:
        return "no-cuda-torch"
    if not isinstance(driver_cuda, str) or not isinstance(torch_cuda, str):
        return UNKNOWN
    try:
        d, t = Version(driver_cuda), Version(torch_cuda)
    except Exception:  # noqa: BLE001
        return UNKNOWN
    if d.major < t.major:
        return "older-major"
    if d.major == t.major and d < t:
        return "older-minor"
    return "ok"


def _tuned_on_differs(tuned_on: Any, facts: Facts) -> list[str]:
    if not isinstance(tuned_on, dict):
        return []
    out = []
    for key in ("torch", "transformers"):
        have = facts.package(key)
        if tuned_on.get(key) and isinstance(have, str) and tuned_on[key] != have:
            out.append(f"{key} {tuned_on[key]} -> {have}")
    gpu = tuned_on.get("gpu")
    if gpu and facts.gpus is not UNKNOWN and facts.gpus and all(g.name != gpu for g in facts.gpus):
        out.append(f"GPU {gpu} -> {facts.gpus[0].name}")
    return out


def _dig(obj: Any, path: str) -> Any:
    if obj is UNKNOWN:
        return UNKNOWN
    for part in path.split(".") if path else []:
        if obj is None:
            return None
        if not isinstance(obj, dict) or part not in obj:
            return UNKNOWN
        obj = obj[part]
    return obj


def run(
    facts: Facts,
    candidate: Candidate | None = None,
    model: ModelSpec | None = None,
    *,
    rules: Iterable[Rule] | None = None,
    scopes: tuple[str, ...] = ("candidate", "gpu"),
) -> Result:
    """Evaluate every active rule of the given scopes. ``candidate=None`` runs installation rules."""
    ctx = Context(facts, model, candidate)
    result = Result()
    for rule in rules if rules is not None else default_rules():
        if not rule.active or rule.scope not in scopes:
            continue
        per_gpu = rule.scope == "gpu" or any(p.startswith("gpu.") for p in condition_facts(rule.when))
        if per_gpu:
            used = ctx.derived().get("gpus_used", UNKNOWN) if candidate is not None and rule.scope == "gpu" else (
                UNKNOWN if facts.gpus is UNKNOWN else [g.index for g in facts.gpus]
            )
            targets: list[GPU | None]
            if used is UNKNOWN:
                targets = [None]
            else:
                targets = [facts.gpu(i) for i in used if facts.gpu(i) is not None]
            unknown_needs: list[str] = []
            for gpu in targets:
                _apply(rule, ctx.with_gpu(gpu), result, unknown_needs, gpu)
        else:
            unknown_needs = []
            _apply(rule, ctx, result, unknown_needs, None)
        if unknown_needs:
            needs = ["model" if model is None and (n.startswith(("model.", "mem.")) or n in _MODEL_DERIVED) else n for n in unknown_needs]
            result.not_evaluated.append(NotEvaluated(rule.id, tuple(dict.fromkeys(needs)), rule.option))
    return result


_MODEL_DERIVED = {"derived.gqa_without_mask", "derived.heads_divide_gpus", "derived.load_dtype", "derived.linear_widths_off_32",
                  "derived.torchao_unquantized", "derived.int4_padding"}


def _apply(rule: Rule, ctx: Context, result: Result, unknown_needs: list[str], gpu: GPU | None) -> None:
    outcome = evaluate(rule.when, ctx.get)
    if isinstance(outcome, Unknown):
        unknown_needs.extend(outcome.needs)
        return
    if outcome:
        result.findings.append(
            Finding(
                rule=rule.id,
                severity=rule.severity,
                option=rule.option,
                message=render(rule.message, ctx.get),
                fix=render(rule.fix, ctx.get),
                source=rule.sources[0],
                name=rule.name,
                gpu=None if gpu is None else gpu.index,
            )
        )

