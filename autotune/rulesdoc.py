"""docs/rules.md, generated from the rule files (a test fails when the committed copy is stale)."""

from __future__ import annotations

from typing import Iterable

from .render import rule_markdown
from .rules import Rule


def rules_markdown(rules: Iterable[Rule]) -> str:
    rules = list(rules)
    head = [
        "# autotune rules",
        "",
        "Generated from `rules/*.toml` by `autotune rules --markdown > docs/rules.md`; do not edit by hand.",
        "Each rule has a stable ID that is never reused; `autotune rules ID` prints one page.",
        "",
        "| ID | severity | option | name |",
        "|---|---|---|---|",
    ]
    head += [f"| [{r.id}](#{r.id.lower()}-{r.name}) | {r.severity} | `{r.option}` | {r.name} |" for r in rules]
    head.append("")
    return "\n".join(head + [rule_markdown(r) for r in rules])
