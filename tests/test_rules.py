"""The rule files: every rule's own examples, validation of malformed files, the shipped wheel, docs."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from autotune.errors import RuleFileError
from autotune.rules import Unknown, default_rules, evaluate, load_rules, parse_rule_file, rules_dir
from autotune.rulesdoc import rules_markdown
from autotune.ruletest import fired

from .conftest import ROOT

RULES = default_rules()
EXAMPLES = [(r, i, e) for r in RULES for i, e in enumerate(r.examples)]


@pytest.mark.parametrize("rule, i, example", EXAMPLES, ids=[f"{r.id}-{i}" for r, i, _ in EXAMPLES])
def test_rule_examples(rule, i, example):
    assert fired(rule, example) is example.fires, f"{rule.id} example {i}: {example.note or example.candidate}"


def test_every_rule_has_a_firing_and_a_quiet_example():
    for r in RULES:
        kinds = {e.fires for e in r.examples}
        assert kinds == {True, False}, f"{r.id} needs examples that fire and that do not"


def test_ids_are_unique_and_sources_cited():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert all(r.sources for r in RULES)
    assert len(RULES) >= 80


def test_rules_dir_is_the_top_level_folder():
    assert rules_dir().resolve() == (ROOT / "rules").resolve() or rules_dir().name == "rules"


GOOD = '''
[[rule]]
id = "X-ONE"
name = "x-one"
severity = "error"
option = "dtype"
when = { fact = "candidate.dtype", in = ["float16"] }
message = "m"
fix = "f"
sources = ["s"]
[[rule.examples]]
fires = true
target = "cpu"
'''


@pytest.mark.parametrize("mutate, key", [
    (lambda s: s.replace('severity = "error"', 'severity = "fatal"'), "severity"),
    (lambda s: s.replace('id = "X-ONE"', 'id = "x one"'), ".id"),
    (lambda s: s.replace('name = "x-one"', 'name = "X One"'), ".name"),
    (lambda s: s.replace('sources = ["s"]', "sources = []"), ".sources"),
    (lambda s: s.replace('in = ["float16"]', 'in = "float16"'), ".in"),
    (lambda s: s.replace('in = ["float16"]', 'version = "not a spec"'), ".version"),
    (lambda s: s.replace('in = ["float16"]', 'eval = "1+1"'), ".when"),
    (lambda s: s.replace('message = "m"\n', ""), ".message"),
    (lambda s: s.replace("fires = true", 'fires = "yes"'), "examples[0]"),
    (lambda s: s + "colour = 1\n", "colour"),
    (lambda s: s.replace("[[rule]]", "[[rule]"), "(toml)"),
])
def test_malformed_rule_files_name_the_file_and_key(mutate, key):
    with pytest.raises(RuleFileError) as e:
        parse_rule_file(mutate(GOOD), "bad.toml")
    assert e.value.path == "bad.toml"
    assert key in e.value.key


def test_duplicate_ids_across_files(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD)
    with pytest.raises(RuleFileError, match="duplicate rule id"):
        load_rules(tmp_path)


def test_three_valued_logic():
    get = {"a": 1, "b": None}.get
    from autotune.facts import UNKNOWN

    g = lambda p: get(p, UNKNOWN)  # noqa: E731
    assert evaluate({"all": [{"fact": "a", "eq": 1}, {"fact": "zz", "eq": 1}]}, g).needs == ("zz",)
    assert evaluate({"all": [{"fact": "a", "eq": 2}, {"fact": "zz", "eq": 1}]}, g) is False
    assert evaluate({"any": [{"fact": "a", "eq": 1}, {"fact": "zz", "eq": 1}]}, g) is True
    assert isinstance(evaluate({"not": {"fact": "zz", "eq": 1}}, g), Unknown)
    assert evaluate({"fact": "b", "version": ">=1"}, g) is False  # not installed has no version
    assert evaluate({"fact": "b", "is_null": True}, g) is True


def test_prerelease_versions_match_specifiers():
    from autotune.facts import UNKNOWN

    g = {"pkg.flash-attn-4": "4.0.0b36"}.get
    assert evaluate({"fact": "pkg.flash-attn-4", "version": ">=4.0.0b1"}, lambda p: g(p, UNKNOWN)) is True
    assert evaluate({"fact": "pkg.flash-attn-4", "version": ">=3.0,<4.1"}, lambda p: g(p, UNKNOWN)) is True
    # PEP 440: "<4.0" excludes the pre-releases of 4.0 itself
    assert evaluate({"fact": "pkg.flash-attn-4", "version": "<4.0"}, lambda p: g(p, UNKNOWN)) is False


def test_docs_rules_md_is_fresh():
    committed = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    assert committed == rules_markdown(RULES), "docs/rules.md is stale: run `autotune rules --markdown > docs/rules.md`"


@pytest.mark.slow
def test_wheel_ships_every_rule_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("autotune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (ROOT / "rules").glob("*.toml"):
        assert f"autotune/rules/{f.name}" in names
    assert "autotune/data/profiles.toml" in names
