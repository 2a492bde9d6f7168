"""Facts files: round trip, partial files, profiles, overrides, bad input."""

from __future__ import annotations

import json

import pytest

from autotune.errors import FactsError, UserError
from autotune.facts import UNKNOWN, Facts, load_facts
from autotune.profiles import apply_overrides, load_target, profile_names

from .conftest import ROOT, write_json

REQUIRED_TARGETS = ["cpu", "t4", "v100-16gb", "a10g", "l4", "a100-40gb", "a100-80gb", "rtx-3090", "rtx-4090", "h100-80gb", "h200", "b200"]


@pytest.mark.parametrize("name", REQUIRED_TARGETS)
def test_every_profile_loads(name):
    f = load_target(name)
    assert f.source == f"profile:{name}"
    assert isinstance(f.package("torch"), str) and isinstance(f.package("transformers"), str)
    for g in f.gpus:
        assert g.capability is not None and g.memory_total_gib > 0
        assert g.memory_free_gib is UNKNOWN, "profiles carry no free memory"
    assert (f.gpu_count == 0) == (name == "cpu")
    assert Facts.from_dict(f.to_dict()).to_dict() == f.to_dict()


def test_profile_names_cover_the_required_set():
    assert set(REQUIRED_TARGETS) <= set(profile_names())


def test_multi_and_mixed_targets():
    f = load_target("4xh100")
    assert [g.index for g in f.gpus] == [0, 1, 2, 3] and f.source == "profile:4xh100-80gb"
    f = load_target("t4+a100-80gb")
    assert [g.compute_capability for g in f.gpus] == ["7.5", "8.0"]
    assert f.package("transformers") == load_target("t4").package("transformers")


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="unknown target 'tpu-v5'"):
        load_target("tpu-v5")


def test_overrides():
    f = apply_overrides(load_target("a100-80gb"), ["packages.flash-attn=null", "gpus.count=2", "driver.cuda=12.4", "host.python=3.10.14"])
    assert f.package("flash-attn") is None
    assert f.gpu_count == 2 and f.gpus[1].index == 1
    assert f.driver["cuda"] == "12.4" and f.host["python"] == "3.10.14"
    assert f.source.endswith("+set")
    f = apply_overrides(load_target("2xh100"), ["gpus.1.memory_total_gib=20"])
    assert [g.memory_total_gib for g in f.gpus] == [79.65, 20.0]


@pytest.mark.parametrize("bad, match", [
    ("packages.torch", "expected KEY=VALUE"),
    ("packages.torch=banana", "not a valid version"),
    ("gpus.count=two", "not a whole number"),
    ("gpus.7.name=x", "there is no GPU 7"),
    ("gpus.compute_capability=fast", "compute capability"),
    ("colour=blue", "unknown fact"),
])
def test_bad_overrides(bad, match):
    with pytest.raises(UserError, match=match):
        apply_overrides(load_target("h100"), [bad])


def test_partial_facts_are_accepted_and_unknown_is_not_absent(tmp_path):
    p = write_json(tmp_path / "partial.json", {"gpus": [{"name": "Tesla T4", "compute_capability": "7.5"}], "packages": {"flash-attn": None}})
    f = load_facts(p)
    assert f.source == "file"
    assert f.gpus[0].index == 0 and f.gpus[0].memory_total_gib is UNKNOWN
    assert f.package("flash-attn") is None  # null: not installed
    assert f.package("torch") is UNKNOWN  # left out: unknown
    assert f.driver is UNKNOWN and f.host is UNKNOWN


def test_hand_written_numeric_capability(tmp_path):
    f = load_facts(write_json(tmp_path / "f.json", {"gpus": [{"compute_capability": 8.6}]}))
    assert f.gpus[0].compute_capability == "8.6"


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema": 7}', "schema 7 is not supported"),
    ('{"gpus": {"name": "x"}}', "gpus: expected list"),
    ('{"gpus": [{"compute_capability": "fast"}]}', "compute capability 'fast'"),
    ('{"packages": {"torch": 2.1}}', "expected a version string or null"),
    ('{"gpus": [{"memory_total_gib": "lots"}]}', "expected a number of GiB"),
])
def test_malformed_facts_files(tmp_path, content, match):
    p = tmp_path / "facts.json"
    p.write_text(content)
    with pytest.raises(FactsError, match=match):
        load_facts(p)


def test_a_version_text_that_is_not_pep440_is_kept_as_installed_version_unknown(tmp_path):
    """Issue 11: a source build's own label ("two", "main") is installed, version unknown -
    not a fatal facts error (FACTS-VERSION-UNPARSED reports it)."""
    p = tmp_path / "facts.json"
    p.write_text('{"packages": {"torch": "two"}}')
    f = load_facts(p)
    assert f.package("torch") == "two" and f.package_version("torch") is UNKNOWN and f.unparsed_versions() == ["torch 'two'"]


def test_missing_facts_file(tmp_path):
    with pytest.raises(FactsError, match="facts file not found"):
        load_facts(tmp_path / "nope.json")


def test_real_h100_fixture_loads():
    path = ROOT / "tests" / "fixtures" / "h100-probe.json"
    f = load_facts(path)
    assert f.source == "probe"
    assert f.gpus[0].compute_capability == "9.0"
    assert f.package("flash-attn") is None
    assert json.loads(path.read_text())["schema"] == 1
