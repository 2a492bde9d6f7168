"""check(): judge a config dict against a machine's facts. The contract is in DESIGN.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import Workload, parse_config, read_config
from .engine import run
from .facts import Facts, load_facts
from .model import ModelSpec, load_problems, read_model
from .profiles import apply_overrides, load_target
from .rules import Rule, condition_facts, default_rules, rules_version

SCHEMA = 1
# Installation rules about the probing machine itself, not about a config's stack.
_MACHINE_ONLY = ("deep.", "nvml.", "gpu.", "host.nvidia_device_nodes")


def resolve_facts(
    *, facts: Facts | None = None, facts_file: str | Path | None = None, target: str | None = None, overrides: Iterable[str] = ()
) -> Facts:
    """The facts to judge against: given ones, a file, a target profile, or a probe of this machine."""
    if facts is None:
        if facts_file is not None:
            facts = load_facts(facts_file)
        elif target is not None:
            facts = load_target(target)
        else:
            from .machine import probe

            facts = probe()
    return apply_overrides(facts, overrides)


def check_rules(rules: Iterable[Rule]) -> list[Rule]:
    return [r for r in rules if r.scope != "installation" or not any(p.startswith(_MACHINE_ONLY) for p in condition_facts(r.when))]


def check(
    config: Mapping[str, Any] | str | Path,
    *,
    facts: Facts | None = None,
    facts_file: str | Path | None = None,
    target: str | None = None,
    overrides: Iterable[str] = (),
    model: ModelSpec | str | Path | None = None,
    workload: Workload | None = None,
    rules: Iterable[Rule] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Judge ``config`` (a dict or a JSON file) on the facts. Returns the check report dict;
    with ``strict``, a rule that could not be evaluated also makes it not ``ok``.

    Raises :class:`~autotune.errors.UserError` for unusable input (exit code 2 in the CLI).
    """
    cfg = read_config(config) if isinstance(config, (str, Path)) else config
    candidate = parse_config(cfg, workload=workload)
    f = resolve_facts(facts=facts, facts_file=facts_file, target=target, overrides=overrides)
    spec = read_model(model) if isinstance(model, (str, Path)) else model
    rule_list = check_rules(rules if rules is not None else default_rules())
    result = run(f, candidate, spec, rules=rule_list, scopes=("candidate", "gpu", "installation"))
    findings = [x.to_dict() for x in result.findings]
    problems = []
    if isinstance(model, (str, Path)):  # a folder on this disk: would from_pretrained load it at all?
        fp = cfg.get("from_pretrained", cfg) if isinstance(cfg, Mapping) else {}
        problems = load_problems(spec, prompt_len=workload.prompt_len if workload else None, new_tokens=workload.new_tokens if workload else None,
                                 trust_remote_code=bool(isinstance(fp, Mapping) and fp.get("trust_remote_code")))
    findings = [p.to_finding() for p in problems] + findings
    return {
        "schema": SCHEMA,
        "ok": not result.errors and not problems and not (strict and result.not_evaluated),
        "strict": strict,
        "rules_version": rules_version(),
        "facts": {"source": f.source, "fingerprint": f.fingerprint()},
        "candidate": candidate.label(),
        "findings": findings,
        "not_evaluated": [n.to_dict() for n in result.not_evaluated],
    }


def exit_code(report: Mapping[str, Any], *, strict: bool = False) -> int:
    """0: no error findings; 1: an error (with ``strict``, also anything not evaluated)."""
    if not report["ok"]:
        return 1
    if strict and report["not_evaluated"]:
        return 1
    return 0
