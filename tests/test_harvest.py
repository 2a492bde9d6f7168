"""The rules agree with the table harvested from the released wheels (tools/harvest.py writes
autotune/data/harvest.json; the rules read it through release_has / release_lacks): for every
harvested transformers release, a config that uses a keyword the release does not know gets an
error, and one it knows does not."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from autotune.gate import check

from .conftest import ROOT

TABLE = json.loads((ROOT / "autotune" / "data" / "harvest.json").read_text())
RELEASES = sorted(TABLE["transformers"], key=lambda v: tuple(int(x) for x in v.split(".")))


@lru_cache(maxsize=None)
def _errors(target: str, version: str, cfg: str) -> frozenset[str]:
    r = check(json.loads(cfg), target=target, overrides=[f"packages.transformers={version}", "packages.torch=2.11.0", "packages.accelerate=1.15.0",
                                                         "packages.bitsandbytes=0.50.2", "packages.optimum=1.23.3"])
    return frozenset(f["rule"] for f in r["findings"] if f["severity"] == "error")


# (table fact, config that uses it, the rule IDs any of which must fire when the release lacks it)
GATES = [
    ("kw_dtype", {"dtype": "float16"}, {"LEGACY-DTYPE-TOO-NEW"}),
    ("kw_attn_implementation", {"torch_dtype": "float16", "attn_implementation": "sdpa"}, {"ATTN-IMPL-UNKNOWN-KEY"}),
    ("kw_use_flash_attention_2", {"torch_dtype": "float16", "use_flash_attention_2": True}, {"LEGACY-USE-FLASH-ATTENTION-2-REMOVED"}),
    ("kw_load_in_8bit", {"torch_dtype": "float16", "load_in_8bit": True}, {"LEGACY-LOAD-IN-KBIT-REMOVED"}),
    ("kw_load_in_4bit", {"torch_dtype": "float16", "load_in_4bit": True}, {"LEGACY-LOAD-IN-KBIT-REMOVED"}),
    ("kw_tp_plan", {"torch_dtype": "bfloat16", "tp_plan": "auto"}, {"PLACE-TP-TRANSFORMERS"}),
    ("kw_distributed_config", {"torch_dtype": "bfloat16", "distributed_config": {"tp_plan": "auto"}}, {"PLACE-TP-TRANSFORMERS"}),
    ("flash_attention_3", {"torch_dtype": "float16", "attn_implementation": "flash_attention_3"}, {"ATTN-FA3-NAME"}),
    ("to_bettertransformer", {"torch_dtype": "float16", "to_bettertransformer": True}, {"BT-TRANSFORMERS-5", "BT-TRANSFORMERS-TOO-OLD"}),
]


@pytest.mark.parametrize("fact,cfg,rules", GATES, ids=[g[0] for g in GATES])
def test_rules_follow_the_harvested_keyword_table(fact, cfg, rules):
    wrong = []
    for v in RELEASES:
        knows = TABLE["transformers"][v][fact]
        fired = bool(_errors("2xh100-80gb", v, json.dumps(cfg)) & rules)
        if fired == knows:
            wrong.append(f"{v}: release {'knows' if knows else 'lacks'} it, rule {'fired' if fired else 'silent'}")
    assert not wrong, f"{len(wrong)} release(s) disagree: " + "; ".join(wrong[:6])


def test_every_minor_is_harvested_with_its_first_and_last_patch():
    minors = {tuple(v.split(".")[:2]) for v in RELEASES}
    assert ("4", "0") in minors and len(minors) >= 75 and len(RELEASES) > len(minors)


def test_a_release_reads_as_the_harvested_one_at_or_below_it():
    from autotune.facts import UNKNOWN
    from autotune.rules import release_fact

    assert release_fact("transformers", "4.56.1", "kw_dtype") is True, "a patch between a minor's first and last"
    assert release_fact("transformers", "4.55.9", "kw_dtype") is False
    assert release_fact("transformers", "99.0.0", "kw_dtype") is TABLE["transformers"][RELEASES[-1]]["kw_dtype"], "newer than the harvest: the last"
    assert release_fact("transformers", "3.5.1", "kw_dtype") is UNKNOWN, "older than the harvest: unknown"
    assert release_fact("transformers", "5.15.1+local", "kw_tp_plan") is False


def _optimum_disagreements(rule: str, model_type: str, torch: str, expect) -> list[str]:
    """Harvested optimum releases with BetterTransformer where ``rule`` fires for a
    ``model_type`` model on ``torch`` other than ``expect(row)`` says."""
    from autotune.model import ModelSpec

    spec = ModelSpec(path="x", model_type=model_type, supports={"sdpa": False})
    wrong = []
    for v, row in TABLE["optimum"].items():
        if not row.get("bettertransformer"):
            continue
        r = check({"torch_dtype": "float16", "to_bettertransformer": True}, target="t4", model=spec,
                  overrides=[f"packages.optimum={v}", "packages.transformers=4.35.2", f"packages.torch={torch}"])
        if any(f["rule"] == rule for f in r["findings"]) != expect(row):
            wrong.append(v)
    return wrong


@pytest.mark.parametrize("model_type", ["llama", "bert", "mistral", "qwen2"])
def test_bt_arch_follows_each_optimum_releases_mapping(model_type):
    wrong = _optimum_disagreements("BT-ARCH", model_type, "2.1.2", lambda row: model_type not in row["bt_model_types"])
    assert not wrong, f"BT-ARCH disagrees with optimum's MODEL_MAPPING for {model_type} in {wrong}"


@pytest.mark.parametrize("target,major", [("b200", "10"), ("h100-80gb", "9"), ("a10g", "8")])
def test_fa2_kernels_follow_each_flash_attn_release(target, major):
    wrong = []
    for v, row in TABLE["flash-attn"].items():
        r = check({"attn_implementation": "flash_attention_2", "dtype": "bfloat16"}, target=target, overrides=[f"packages.flash-attn={v}"])
        fired = any(f["rule"] == "ATTN-FA2-NOT-BUILT-FOR-ARCH" for f in r["findings"])
        if fired == (major in row["fa2_cuda_majors"]):
            wrong.append(v)
    assert not wrong, f"ATTN-FA2-NOT-BUILT-FOR-ARCH disagrees with flash-attn's setup.py on {target} for {wrong}"


# (harvested floor of the installed transformers, the package (or host.python) it bounds, config,
# the rule). For every release where the floor changes, the last release before and the first
# after are checked: one version below the floor fires, the floor itself does not.
FLOORS = [
    ("torch_floor", "torch", {"dtype": "bfloat16"}, "INST-TORCH-BELOW-TRANSFORMERS-FLOOR"),
    ("accelerate_min", "accelerate", {"dtype": "bfloat16", "device_map": "auto"}, "INST-ACCELERATE-FLOOR"),
    ("bitsandbytes_min", "bitsandbytes", {"dtype": "bfloat16", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     "BNB-TRANSFORMERS-FLOOR"),
    ("flash_attn_2_min", "flash-attn", {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}, "ATTN-FA2-VERSION"),
    ("sdpa_torch_min", "torch", {"dtype": "float16", "attn_implementation": "sdpa"}, "SDPA-TORCH-FLOOR"),
    ("bnb_8bit_min", "bitsandbytes", {"dtype": "float16", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
     "BNB-8BIT-VERSION"),
]


def _below(version: str) -> str:
    """A release just below ``version`` (2.1 -> 2.0.9, 0.46.1 -> 0.46.0.9)."""
    from packaging.version import Version

    parts = list(Version(version).release) + [0] * (3 - len(Version(version).release))
    i = max(k for k, p in enumerate(parts) if p > 0)
    return ".".join(str(p) for p in parts[:i] + [parts[i] - 1] + [9] * (len(parts) - i - 1) + ([9] if i == len(parts) - 1 else []))


def _boundaries(key: str) -> list[str]:
    """The last release before and the first after every change of ``key`` in the table."""
    out: list[str] = []
    for before, after in zip(RELEASES, RELEASES[1:]):
        if TABLE["transformers"][before].get(key) != TABLE["transformers"][after].get(key):
            out += [before, after]
    return sorted(set(out), key=RELEASES.index)


def _facts_file(tmp_path, transformers: str, **packages: str | None) -> str:
    facts = json.loads((ROOT / "tests" / "fixtures" / "h100-probe.json").read_text())
    facts["packages"].update({"transformers": transformers, "torch": "2.11.0", "accelerate": "1.15.0", **packages})
    path = tmp_path / f"facts-{transformers}.json"
    path.write_text(json.dumps(facts))
    return str(path)


def _check_cli(tmp_path, cfg: dict, facts_file: str, capsys) -> set[str]:
    """`autotune check CONFIG --facts FILE --json` (in this process: the CLI is a thin shell)."""
    from autotune.cli import main

    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    main(["check", str(cfg_path), "--facts", facts_file, "--json"])
    return {f["rule"] for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "error"}


def test_floor_boundaries_are_found_in_the_table():
    # the changes the rules' "why" texts name: torch floor from 4.52 (rising in 5.x), accelerate from 4.37,
    # bitsandbytes from 5.0, flash-attn from 4.35
    assert {v.split(".")[0] for v in _boundaries("torch_floor")} == {"4", "5"}
    assert any(v.startswith("4.37") for v in _boundaries("accelerate_min"))
    assert any(v.startswith("5.0") for v in _boundaries("bitsandbytes_min"))
    assert any(v.startswith("4.35") for v in _boundaries("flash_attn_2_min"))


@pytest.mark.parametrize("key,package,cfg,rule", FLOORS, ids=[f[0] for f in FLOORS])
def test_version_floors_follow_the_harvested_table_at_every_boundary(key, package, cfg, rule, tmp_path, capsys):
    wrong = []
    for v in _boundaries(key):
        floor = TABLE["transformers"][v].get(key)
        extra = {"bitsandbytes": "0.50.2"} if package != "bitsandbytes" else {}
        if floor is None:  # no floor in this release: even an old one passes (flash-attn 1.x is no FlashAttention-2 at all)
            cases = [({"torch": "1.13.1", "flash-attn": "2.0.0"}.get(package, "0.1.0"), False)]
        else:
            cases = [(_below(floor), True), (floor, False)]
        for pv, fires in cases:
            got = rule in _check_cli(tmp_path, cfg, _facts_file(tmp_path, v, **{**extra, package: pv}), capsys)
            if got != fires:
                wrong.append(f"transformers {v} (floor {floor}) with {package} {pv}: {'fired' if got else 'silent'}")
    assert not wrong, "; ".join(wrong[:6])


def test_python_floor_follows_each_releases_requires_python(tmp_path, capsys):
    wrong = []
    for v in _boundaries("requires_python"):
        spec = TABLE["transformers"][v]["requires_python"]
        from packaging.version import Version

        minor = Version(spec.split(">=")[1]).release[1]
        for py, fires in ((f"3.{minor - 1}.9", True), (f"3.{minor}.0", False)):
            facts = json.loads(Path(_facts_file(tmp_path, v)).read_text())
            facts["host"]["python"] = py
            path = tmp_path / "py.json"
            path.write_text(json.dumps(facts))
            got = "INST-PYTHON-FLOOR" in _check_cli(tmp_path, {"dtype": "bfloat16"}, str(path), capsys)
            if got != fires:
                wrong.append(f"transformers {v} ({spec}) on Python {py}: {'fired' if got else 'silent'}")
    assert not wrong, "; ".join(wrong[:6])


def test_4bit_auto_map_gate_follows_the_table(tmp_path, capsys):
    """accelerate at or below the version the release checks (> 0.19.0) fires with a strategy string."""
    cfg = {"dtype": "float16", "device_map": "auto", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    wrong = []
    for v in _boundaries("bnb_4bit_auto_map_accelerate_above"):
        above = TABLE["transformers"][v].get("bnb_4bit_auto_map_accelerate_above")
        for acc, fires in ([(above, True), ("0.20.0", False)] if above else [("0.19.0", False)]):
            got = "BNB-4BIT-AUTO-MAP-OLD-ACCELERATE" in _check_cli(tmp_path, cfg, _facts_file(tmp_path, v, accelerate=acc, bitsandbytes="0.50.2"), capsys)
            if got != fires:
                wrong.append(f"transformers {v} with accelerate {acc}: {'fired' if got else 'silent'}")
    assert not wrong, "; ".join(wrong)


def test_fa2_offload_refusal_follows_each_release(tmp_path, capsys):
    wrong = []
    offload = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": "cpu", "lm_head": "cpu"}
    for v in _boundaries("fa2_refuses_offload_map"):
        row = TABLE["transformers"][v]
        fa2 = {"attn_implementation": "flash_attention_2"} if row["kw_attn_implementation"] else {"use_flash_attention_2": True}
        got = "ATTN-FA2-OFFLOAD-MAP" in _check_cli(tmp_path, {"torch_dtype": "float16", "device_map": offload, **fa2},
                                                   _facts_file(tmp_path, v, **{"flash-attn": "2.7.4"}), capsys)
        if got != row["fa2_refuses_offload_map"]:
            wrong.append(f"{v}: {'fired' if got else 'silent'}")
    assert not wrong and len(_boundaries("fa2_refuses_offload_map")) == 4, wrong


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_bt_torch_gate_follows_each_optimum_release(model_type):
    """torch 1.13.1: refused for every model from optimum 1.11, for requires_torch_20() types before."""
    wrong = _optimum_disagreements("BT-TORCH-FLOOR", model_type, "1.13.1",
                                   lambda row: bool(row.get("bt_torch2_all") or model_type in (row.get("bt_torch2_model_types") or [])))
    assert not wrong, f"BT-TORCH-FLOOR disagrees with optimum's transform() for {model_type} in {wrong}"


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "electra"])
def test_encoder_sdpa_follows_each_transformers_release(model_type):
    """attn_implementation="sdpa" on an encoder: refused by the releases whose modeling file has no _supports_sdpa."""
    from autotune.model import ModelSpec

    spec = ModelSpec(path="x", model_type=model_type, architectures=("X",), supports={"sdpa": True})
    wrong = []
    for v in RELEASES:
        row = TABLE["transformers"][v]
        if not row["kw_attn_implementation"]:
            continue
        r = check({"torch_dtype": "float16", "attn_implementation": "sdpa"}, target="t4", model=spec,
                  overrides=[f"packages.transformers={v}", "packages.torch=2.5.1", "packages.accelerate=1.1.0"])
        fired = any(f["rule"] == "ATTN-SDPA-ENCODER-RELEASE" for f in r["findings"])
        if fired == (model_type in row["sdpa_encoder_types"]):
            wrong.append(v)
    assert not wrong, f"ATTN-SDPA-ENCODER-RELEASE disagrees with the modeling files for {model_type} in {wrong[:5]}"
