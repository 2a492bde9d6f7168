"""The rules engine: rule files (TOML data) turn (facts, model, candidate) into findings.

A rule's condition is a small tree of tables, never code:

* ``{ all = [c, ...] }``, ``{ any = [c, ...] }``, ``{ not = c }``
* a leaf ``{ fact = "PATH", OP = VALUE }`` with one operator:
  ``in``/``not_in`` (enumerations), ``eq``/``ne``, ``version`` (a PEP 440 specifier, pre-releases
  allowed, local labels such as ``+cu130`` ignored), ``lt``/``le``/``gt``/``ge`` (numbers),
  ``is_null`` (``true``: absent / not installed), ``known`` (``true``: the fact is known),
  ``contains`` (a list fact holds the value), ``empty`` (a list fact is empty), ``version_below`` (this version is lower than
  the version at another fact's path).

Logic is three-valued: a leaf over a fact nobody measured is *unknown*; ``all`` is false as
soon as one part is false, ``any`` true as soon as one is true, and otherwise unknown wins.
A rule whose condition ends unknown is reported as "not evaluated" with the facts it needs;
it never counts as passed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from .errors import RuleFileError
from .facts import UNKNOWN

SEVERITIES = ("error", "warning", "info")
SCOPES = ("candidate", "gpu", "installation")
_OPS = ("in", "not_in", "eq", "ne", "version", "lt", "le", "gt", "ge", "is_null", "known", "contains", "empty", "version_below",
        "version_at_most", "version_outside", "release_has", "release_lacks", "in_release", "not_in_release")
_ID = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_RULE_KEYS = {"id", "name", "severity", "option", "scope", "when", "message", "fix", "why", "sources", "examples", "status", "needs_model"}
_EXAMPLE_KEYS = {"fires", "target", "facts", "set", "candidate", "model", "note"}


# ---------------------------------------------------------------------------- three-valued logic
class Unknown:
    """A condition that could not be decided, with the fact paths it needed."""

    def __init__(self, needs: Iterable[str]) -> None:
        self.needs = tuple(dict.fromkeys(needs))

    def __bool__(self) -> bool:  # pragma: no cover - guards against accidental truthiness
        raise TypeError("an Unknown result must be checked with isinstance, not bool()")



def _kleene(results: list[Any], decisive: bool) -> Any:
    """Three-valued AND (``decisive=False``) / OR (``decisive=True``): one decisive value
    settles it; otherwise any unknown makes the whole unknown, with every fact it needs."""
    if any(r is decisive for r in results):
        return decisive
    unknown = [r for r in results if isinstance(r, Unknown)]
    if unknown:
        return Unknown(n for u in unknown for n in u.needs)
    return not decisive


def _all(results: list[Any]) -> Any:
    return _kleene(results, decisive=False)


def _any(results: list[Any]) -> Any:
    return _kleene(results, decisive=True)


def _version(value: Any) -> Version | None:
    try:
        v = Version(str(value))
    except InvalidVersion:
        return None
    return Version(v.public)  # "2.11.0+cu130" compares as "2.11.0"


@lru_cache(maxsize=512)
def _spec(text: str) -> SpecifierSet:
    return SpecifierSet(text, prereleases=True)


@lru_cache(maxsize=1)
def harvested() -> dict[str, Any]:
    """autotune/data/harvest.json (tools/harvest.py): per package, per release, what its files say."""
    import json

    path = Path(__file__).resolve().parent / "data" / "harvest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def release_fact(package: str, version: Any, key: str) -> Any:
    """``key`` of the newest harvested release of ``package`` at or below ``version`` (releases
    after the last harvest read as the last one; a release between a minor's first and last
    patch as the one before it); UNKNOWN below the first harvested release or when unrecorded."""
    import bisect

    v = _version(version)
    versions, rows = _releases(package)
    if v is None:
        return UNKNOWN
    i = bisect.bisect_right(versions, v)
    return rows[i - 1].get(key, UNKNOWN) if i else UNKNOWN


@lru_cache(maxsize=None)
def _releases(package: str) -> tuple[tuple[Version, ...], tuple[dict[str, Any], ...]]:
    """The harvested releases of ``package`` that were read, in version order, parsed once
    (``release_fact`` runs for every rule on every candidate)."""
    pairs = sorted(((Version(r), row) for r, row in (harvested().get(package) or {}).items() if "error" not in row), key=lambda p: p[0])
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _leaf(cond: Mapping[str, Any], get: Callable[[str], Any]) -> Any:
    path = cond["fact"]
    op = next(k for k in cond if k != "fact")
    arg = cond[op]
    value = get(path)
    if op == "known":
        return (value is not UNKNOWN) == arg
    if value is UNKNOWN:
        return Unknown([path])
    if op == "is_null":
        return (value is None) == arg
    if op == "in":
        return value in arg
    if op == "not_in":
        return value not in arg
    if op == "eq":
        return value == arg
    if op == "ne":
        return value != arg
    if op == "contains":
        return isinstance(value, (list, tuple, set, frozenset)) and arg in value
    if op == "empty":
        return (not value) == arg if isinstance(value, (list, tuple, dict, str)) else Unknown([path])
    if value is None:  # an absent package has no version and no size: comparisons are false
        return False
    if op == "version":
        v = _version(value)
        return Unknown([path]) if v is None else _spec(arg).contains(v, prereleases=True)
    if op in ("in_release", "not_in_release"):  # a list of the installed release of another package ("optimum:bt_model_types")
        package, key = arg.split(":", 1)
        listed = get(f"release.{package}.{key}")
        if listed is UNKNOWN:
            return Unknown([f"pkg.{package}"])
        if not isinstance(listed, list):  # not installed, or this release has no such list: nothing to be in
            return False
        return (value in listed) == (op == "in_release")
    if op in ("release_has", "release_lacks"):  # a fact of the installed release, from the harvested table
        has = get(f"release.{path.split('.', 1)[1]}.{arg}")
        if not isinstance(has, bool):
            return Unknown([path])
        return has if op == "release_has" else not has
    if op in ("version_below", "version_at_most", "version_outside"):  # against what another fact holds
        a = _version(value)
        if a is None:
            return Unknown([path])
        other = get(arg)
        # release.PACKAGE.KEY is unknown when PACKAGE's own version is: that is the fact to name
        needs = [arg, f"pkg.{arg.split('.')[1]}"] if arg.startswith("release.") else [arg]
        if other is UNKNOWN:
            return Unknown(needs)
        if other is None:
            return False
        if op == "version_outside":  # a specifier (">=3.9.0") or a requirement ("transformers[sentencepiece]<4.35,>=4.26")
            try:
                text = str(other)
                spec = Requirement(text).specifier if text[:1].isalpha() else _spec(text)
                return not spec.contains(a, prereleases=True)
            except (InvalidSpecifier, InvalidRequirement, TypeError):
                return Unknown(needs)
        b = _version(other)
        if b is None:
            return Unknown(needs)
        return a < b if op == "version_below" else a <= b
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return Unknown([path])
    return {"lt": value < arg, "le": value <= arg, "gt": value > arg, "ge": value >= arg}[op]


def evaluate(cond: Mapping[str, Any], get: Callable[[str], Any]) -> Any:
    """Evaluate a validated condition: True, False or an :class:`Unknown`."""
    if "all" in cond:
        return _all([evaluate(c, get) for c in cond["all"]])
    if "any" in cond:
        return _any([evaluate(c, get) for c in cond["any"]])
    if "not" in cond:
        r = evaluate(cond["not"], get)
        return r if isinstance(r, Unknown) else not r
    return _leaf(cond, get)


def condition_facts(cond: Mapping[str, Any]) -> list[str]:
    """Every fact path a condition reads."""
    if "all" in cond or "any" in cond:
        return [p for c in cond.get("all", cond.get("any", [])) for p in condition_facts(c)]
    if "not" in cond:
        return condition_facts(cond["not"])
    out = [cond["fact"]]
    if "version_below" in cond:
        out.append(cond["version_below"])
    return out


# ---------------------------------------------------------------------------- rules and loading
@dataclass(frozen=True)
class Example:
    fires: bool
    target: str | None = None
    facts: Mapping[str, Any] | None = None
    set: tuple[str, ...] = ()
    candidate: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: str
    option: str
    scope: str
    when: Mapping[str, Any]
    message: str
    fix: str
    sources: tuple[str, ...]
    examples: tuple[Example, ...]
    file: str
    why: str = ""
    status: str = "active"

    @property
    def active(self) -> bool:
        return self.status == "active"


def _validate_condition(cond: Any, where: str, key: str) -> None:
    if not isinstance(cond, dict) or not cond:
        raise RuleFileError(where, key, "a condition must be a non-empty table")
    if "all" in cond or "any" in cond:
        (kind,) = [k for k in ("all", "any") if k in cond]
        if set(cond) != {kind} or not isinstance(cond[kind], list) or not cond[kind]:
            raise RuleFileError(where, key, f"'{kind}' must be the only key and hold a non-empty list of conditions")
        for i, c in enumerate(cond[kind]):
            _validate_condition(c, where, f"{key}.{kind}[{i}]")
        return
    if "not" in cond:
        if set(cond) != {"not"}:
            raise RuleFileError(where, key, "'not' must be the only key")
        _validate_condition(cond["not"], where, f"{key}.not")
        return
    if "fact" not in cond or not isinstance(cond["fact"], str):
        raise RuleFileError(where, key, "a leaf condition needs 'fact' (a path such as 'gpu.compute_capability')")
    ops = [k for k in cond if k != "fact"]
    if len(ops) != 1 or ops[0] not in _OPS:
        raise RuleFileError(where, key, f"a leaf needs exactly one operator of {', '.join(_OPS)}; found {ops}")
    op, arg = ops[0], cond[ops[0]]
    if op in ("in", "not_in") and not isinstance(arg, list):
        raise RuleFileError(where, f"{key}.{op}", "expected a list")
    if op == "version":
        try:
            _spec(arg)
        except (InvalidSpecifier, TypeError):
            raise RuleFileError(where, f"{key}.version", f"{arg!r} is not a PEP 440 specifier") from None
    if op in ("lt", "le", "gt", "ge") and (not isinstance(arg, (int, float)) or isinstance(arg, bool)):
        raise RuleFileError(where, f"{key}.{op}", "expected a number")
    if op in ("is_null", "known", "empty") and not isinstance(arg, bool):
        raise RuleFileError(where, f"{key}.{op}", "expected true or false")
    if op in ("version_below", "version_at_most", "version_outside") and not isinstance(arg, str):
        raise RuleFileError(where, f"{key}.{op}", "expected a fact path")
    if op in ("version_below", "version_at_most", "version_outside") and arg.startswith("release."):
        package, _, name = arg[len("release."):].partition(".")
        rows = harvested().get(package) or {}
        if not name or not any(isinstance(r.get(name), str) for r in rows.values()):
            raise RuleFileError(where, f"{key}.{op}", f"{arg!r}: expected release.PACKAGE.KEY naming a version fact in autotune/data/harvest.json")
    if op in ("in_release", "not_in_release"):
        package, _, name = str(arg).partition(":")
        rows = harvested().get(package) or {}
        if not name or not any(isinstance(r.get(name), list) for r in rows.values()):
            raise RuleFileError(where, f"{key}.{op}", f"{arg!r}: expected PACKAGE:KEY naming a list in autotune/data/harvest.json")
    if op in ("release_has", "release_lacks"):
        if not cond["fact"].startswith("pkg."):
            raise RuleFileError(where, f"{key}.{op}", "reads the harvested table of a package: the fact must be pkg.NAME")
        rows = harvested().get(cond["fact"].split(".", 1)[1]) or {}
        if not any(isinstance(r.get(arg), bool) for r in rows.values()):
            raise RuleFileError(where, f"{key}.{op}", f"{arg!r} is not a yes/no fact of {cond['fact']} in autotune/data/harvest.json")


def _rule_from(raw: Any, where: str, position: int) -> Rule:
    key = f"rule[{position}]"
    if not isinstance(raw, dict):
        raise RuleFileError(where, key, "expected a table")
    rid = raw.get("id", "?")
    key = f"rule[{position}] ({rid})"
    extra = set(raw) - _RULE_KEYS
    if extra:
        raise RuleFileError(where, f"{key}.{sorted(extra)[0]}", f"unknown key; allowed: {', '.join(sorted(_RULE_KEYS))}")
    for req in ("id", "name", "severity", "option", "when", "message", "fix", "sources", "examples"):
        if req not in raw:
            raise RuleFileError(where, f"{key}.{req}", "missing")
    for s in ("id", "name", "severity", "option", "message", "fix"):
        if not isinstance(raw[s], str) or not raw[s].strip():
            raise RuleFileError(where, f"{key}.{s}", "expected a non-empty string")
    if not _ID.match(raw["id"]):
        raise RuleFileError(where, f"{key}.id", "expected an upper-case code like ATTN-FA2-ARCH")
    if not _NAME.match(raw["name"]):
        raise RuleFileError(where, f"{key}.name", "expected a kebab-case name like flash-attention-2-needs-ampere")
    if raw["severity"] not in SEVERITIES:
        raise RuleFileError(where, f"{key}.severity", f"expected one of {', '.join(SEVERITIES)}")
    scope = raw.get("scope", "candidate")
    if scope not in SCOPES:
        raise RuleFileError(where, f"{key}.scope", f"expected one of {', '.join(SCOPES)}")
    status = raw.get("status", "active")
    if status not in ("active", "retired"):
        raise RuleFileError(where, f"{key}.status", "expected 'active' or 'retired'")
    _validate_condition(raw["when"], where, f"{key}.when")
    sources = raw["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise RuleFileError(where, f"{key}.sources", "expected a non-empty list of citations (URL or library file@version)")
    examples = raw["examples"]
    if not isinstance(examples, list) or not examples:
        raise RuleFileError(where, f"{key}.examples", "expected at least one example (fires = true / false)")
    exs = []
    for i, ex in enumerate(examples):
        ekey = f"{key}.examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("fires"), bool):
            raise RuleFileError(where, ekey, "each example needs fires = true or false")
        bad = set(ex) - _EXAMPLE_KEYS
        if bad:
            raise RuleFileError(where, f"{ekey}.{sorted(bad)[0]}", f"unknown key; allowed: {', '.join(sorted(_EXAMPLE_KEYS))}")
        if "target" not in ex and "facts" not in ex:
            raise RuleFileError(where, ekey, "give 'target' (a profile name), 'facts' (a facts table, merged over the target's), or both")
        exs.append(
            Example(
                fires=ex["fires"],
                target=ex.get("target"),
                facts=ex.get("facts"),
                set=tuple(ex.get("set", ())),
                candidate=ex.get("candidate", {}),
                model=ex.get("model"),
                note=ex.get("note", ""),
            )
        )
    return Rule(
        id=raw["id"],
        name=raw["name"],
        severity=raw["severity"],
        option=raw["option"],
        scope=scope,
        when=raw["when"],
        message=raw["message"].strip(),
        fix=raw["fix"].strip(),
        sources=tuple(sources),
        examples=tuple(exs),
        file=where,
        why=raw.get("why", "").strip(),
        status=status,
    )


def parse_rule_file(text: str, where: str) -> list[Rule]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RuleFileError(where, "(toml)", str(e)) from None
    if set(data) - {"rule"}:
        raise RuleFileError(where, sorted(set(data) - {"rule"})[0], "unknown top-level key; rule files hold [[rule]] tables")
    rules = data.get("rule")
    if not isinstance(rules, list) or not rules:
        raise RuleFileError(where, "rule", "a rule file holds one or more [[rule]] tables")
    return [_rule_from(r, where, i) for i, r in enumerate(rules)]


def rules_dir() -> Path:
    """Where the rule files are: inside the installed wheel, or the repository's ``rules/``."""
    packaged = resources.files("autotune").joinpath("rules")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "rules"


def load_rules(directory: str | Path | None = None) -> tuple[Rule, ...]:
    d = Path(directory) if directory is not None else rules_dir()
    files = sorted(d.glob("*.toml"))
    if not files:
        raise RuleFileError(str(d), "(folder)", "no rule files (*.toml) found")
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for f in files:
        for r in parse_rule_file(f.read_text(encoding="utf-8"), f.name):
            if r.id in seen:
                raise RuleFileError(f.name, f"{r.id}.id", f"duplicate rule id (also in {seen[r.id]})")
            seen[r.id] = f.name
            rules.append(r)
    return tuple(rules)


@lru_cache(maxsize=1)
def default_rules() -> tuple[Rule, ...]:
    return load_rules()


def rules_version(rules: Iterable[Rule] | None = None) -> str:
    import hashlib

    blob = "\n".join(f"{r.id}:{r.status}:{r.severity}:{r.when}" for r in (rules or default_rules()))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- messages
_PLACEHOLDER = re.compile(r"\{([a-z_][\w\-]*(?:\.[\w\-]+)*)\}")


def render(template: str, get: Callable[[str], Any]) -> str:
    def sub(m: re.Match[str]) -> str:
        v = get(m.group(1))
        if v is UNKNOWN:
            return "unknown"
        if v is None:
            return "not installed" if m.group(1).startswith("pkg.") else "none"
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x) for x in v) or "none"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    return _PLACEHOLDER.sub(sub, template)
