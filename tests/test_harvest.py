"""The rules agree with the table harvested from the released wheels (tools/harvest.py writes
autotune/data/harvest.json; the rules read it through release_has / release_lacks): for every
harvested transformers release, a config that uses a keyword the release does not know gets an
error, and one it knows does not."""

from __future__ import annotations

import json
from functools import lru_cache

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


@pytest.mark.parametrize("model_type", ["llama", "bert", "mistral", "qwen2"])
def test_bt_arch_follows_each_optimum_releases_mapping(model_type):
    from autotune.model import ModelSpec

    spec = ModelSpec(path="x", model_type=model_type, supports={"sdpa": False})
    wrong = []
    for v, row in TABLE["optimum"].items():
        if not row.get("bettertransformer"):
            continue
        r = check({"torch_dtype": "float16", "to_bettertransformer": True}, target="t4", model=spec,
                  overrides=[f"packages.optimum={v}", "packages.transformers=4.35.2", "packages.torch=2.1.2"])
        fired = any(f["rule"] == "BT-ARCH" for f in r["findings"])
        if fired == (model_type in row["bt_model_types"]):
            wrong.append(v)
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
