"""Run a rule's own examples: build the facts, candidate and model an example describes."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .config import parse_config
from .engine import Result, run
from .facts import Facts
from .model import ModelSpec
from .profiles import apply_overrides, load_target
from .rules import Example, Rule


def example_facts(example: Example) -> Facts:
    base: dict[str, Any] = load_target(example.target).to_dict() if example.target else {"schema": 1, "source": "file"}
    if example.facts:
        for key, value in example.facts.items():
            if isinstance(value, Mapping) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
    facts = Facts.from_dict(base, where="example")
    return apply_overrides(facts, example.set)


def example_model(raw: Mapping[str, Any] | None) -> ModelSpec | None:
    if raw is None:
        return None
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields}
    return ModelSpec(path="(example)", **kw)


def run_example(rule: Rule, example: Example) -> Result:
    facts = example_facts(example)
    candidate = parse_config(example.candidate) if rule.scope != "installation" or example.candidate else None
    return run(facts, candidate, example_model(example.model), rules=[rule], scopes=(rule.scope,))


def fired(rule: Rule, example: Example) -> bool | None:
    """True / False, or None when the rule could not be evaluated on the example."""
    result = run_example(rule, example)
    if any(f.rule == rule.id for f in result.findings):
        return True
    if any(n.rule == rule.id for n in result.not_evaluated):
        return None
    return False
