"""doctor(): the facts, every option's verdict from the rules engine, and what is broken."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from .config import Candidate
from .engine import Finding, run
from .facts import UNKNOWN, Facts
from .model import ModelSpec
from .rules import Rule, default_rules, rules_version

# (axis, value, the rule options that speak for it, how to set it on the base candidate)
OPTIONS: tuple[tuple[str, str, tuple[str, ...], dict[str, Any]], ...] = (
    ("dtype", "float32", ("dtype",), {"dtype": "float32", "dtype_key": "dtype"}),
    ("dtype", "float16", ("dtype",), {"dtype": "float16", "dtype_key": "dtype"}),
    ("dtype", "bfloat16", ("dtype",), {"dtype": "bfloat16", "dtype_key": "dtype"}),
    ("attn_implementation", "eager", ("attn_implementation",), {"attn_implementation": "eager"}),
    ("attn_implementation", "sdpa", ("attn_implementation",), {"attn_implementation": "sdpa"}),
    ("attn_implementation", "flash_attention_2", ("attn_implementation",), {"attn_implementation": "flash_attention_2"}),
    ("attn_implementation", "flash_attention_3", ("attn_implementation",), {"attn_implementation": "flash_attention_3"}),
    ("attn_implementation", "flash_attention_4", ("attn_implementation",), {"attn_implementation": "flash_attention_4"}),
    ("attn_implementation", "flex_attention", ("attn_implementation",), {"attn_implementation": "flex_attention"}),
    ("sdpa_backend", "flash", ("sdpa_backend",), {"attn_implementation": "sdpa", "sdpa_backend": "flash"}),
    ("sdpa_backend", "efficient", ("sdpa_backend",), {"attn_implementation": "sdpa", "sdpa_backend": "efficient"}),
    ("sdpa_backend", "cudnn", ("sdpa_backend",), {"attn_implementation": "sdpa", "sdpa_backend": "cudnn"}),
    ("sdpa_backend", "math", ("sdpa_backend",), {"attn_implementation": "sdpa", "sdpa_backend": "math"}),
    ("quantization", "bitsandbytes 8-bit", ("quantization",), {"quantization": "bnb-8bit"}),
    ("quantization", "bitsandbytes 4-bit nf4", ("quantization",), {"quantization": "bnb-4bit", "bnb_4bit_quant_type": "nf4"}),
    # the tune's torchao kinds (space.TORCHAO_KINDS), in bfloat16 as it measures them
    ("quantization", "torchao int8 weight-only", ("quantization",),
     {"quantization": "torchao", "torchao_type": "Int8WeightOnlyConfig", "torchao_sets_inductor_config": False, "dtype": "bfloat16"}),
    ("quantization", "torchao int4 weight-only (tile-packed, group 128)", ("quantization",),
     {"quantization": "torchao", "torchao_type": "Int4WeightOnlyConfig", "torchao_group_size": 128, "torchao_packing_format": "tile_packed_to_4d",
      "torchao_sets_inductor_config": False, "dtype": "bfloat16"}),
    ("quantization", "torchao float8 (dynamic activations, per row)", ("quantization",),
     {"quantization": "torchao", "torchao_type": "Float8DynamicActivationFloat8WeightConfig", "torchao_granularity": "PerRow",
      "torchao_sets_inductor_config": False, "dtype": "bfloat16"}),
    ("cache", "static cache (compiled)", ("cache", "quantization"), {"cache_implementation": "static"}),
    ("placement", "one GPU", ("device_map", "memory"), {"device_map": {"": 0}}),
    ("placement", "device_map=auto across GPUs", ("device_map", "max_memory", "memory"), {"device_map": "auto"}),
    ("placement", "CPU offload", ("device_map", "memory"), {"device_map": {"model": 0, "lm_head": "cpu"}}),
    ("placement", "tensor parallel (torchrun)", ("tp_plan",), {"distributed_config": True}),
)


@dataclass
class OptionVerdict:
    axis: str
    value: str
    status: str  # available / unavailable / warning / not evaluated
    findings: list[Finding] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    model_checks: list[str] = field(default_factory=list)  # rules that need --model

    def to_dict(self) -> dict[str, Any]:
        return {
            "option": self.axis,
            "value": self.value,
            "status": self.status,
            "findings": [f.to_dict() for f in self.findings],
            "needs": self.needs,
            "needs_model": self.model_checks,
        }


def base_candidate(facts: Facts) -> Candidate:
    """A plain, valid config for this machine, to vary one option at a time."""
    if facts.gpus is UNKNOWN or not facts.gpus:
        return Candidate(dtype="float32", dtype_key="dtype", attn_implementation="sdpa", device_map=None if facts.gpus is UNKNOWN else "cpu")
    ampere = all(g.capability is not None and g.capability.at_least(8) for g in facts.gpus)
    return Candidate(dtype="bfloat16" if ampere else "float16", dtype_key="dtype", attn_implementation="sdpa")


def option_verdicts(facts: Facts, model: ModelSpec | None = None, rules: Iterable[Rule] | None = None) -> list[OptionVerdict]:
    rule_list = [r for r in (rules if rules is not None else default_rules()) if r.scope != "installation"]
    base = base_candidate(facts)
    verdicts = []
    for axis, value, rule_options, changes in OPTIONS:
        cand = dataclasses.replace(base, **changes)
        half = base.dtype if base.dtype != "float32" else "bfloat16"
        if axis == "quantization":  # bitsandbytes wants a half-precision compute dtype
            cand = dataclasses.replace(cand, bnb_4bit_compute_dtype=half)
        if value.startswith("flash_attention") or (axis == "sdpa_backend" and value in ("flash", "cudnn")):
            cand = dataclasses.replace(cand, dtype=half)  # the fused kernels run in half precision only
        if value.startswith("tensor parallel"):
            cand = dataclasses.replace(cand, device_map=None)
        result = run(facts, cand, model, rules=[r for r in rule_list if r.option in rule_options])
        errors = [f for f in result.findings if f.severity == "error"]
        warnings = [f for f in result.findings if f.severity == "warning"]
        # Without a model, model-specific checks stay open; they do not make the option unknown.
        needs = sorted({n for ne in result.not_evaluated for n in ne.needs if n != "model"})
        model_checks = sorted({ne.rule for ne in result.not_evaluated if "model" in ne.needs})
        if errors:
            status = "unavailable"
        elif warnings:
            status = "warning"
        elif needs:
            status = "not evaluated"
        else:
            status = "available"
        verdicts.append(OptionVerdict(axis, value, status, result.findings, needs, model_checks))
    return verdicts


def doctor(facts: Facts, model: ModelSpec | None = None, rules: Iterable[Rule] | None = None) -> dict[str, Any]:
    """The doctor report as data. ``exit_code`` in it: 1 when the installation is broken."""
    rule_list = list(rules if rules is not None else default_rules())
    install = run(facts, None, None, rules=rule_list, scopes=("installation",))
    verdicts = option_verdicts(facts, model, rule_list)
    broken = [f for f in install.findings if f.severity == "error"]
    return {
        "schema": 1,
        "rules_version": rules_version(),
        "facts": facts.to_dict(),
        "options": [v.to_dict() for v in verdicts],
        "installation": {
            "findings": [f.to_dict() for f in install.findings],
            "not_evaluated": [n.to_dict() for n in install.not_evaluated],
        },
        "broken": bool(broken),
        "exit_code": 1 if broken else 0,
    }
