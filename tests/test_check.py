"""autotune check: configs (full, bare, legacy) judged against facts; exit codes; a real model folder."""

from __future__ import annotations

import json

import pytest

from autotune.gate import check, exit_code
from autotune.config import parse_config, parse_max_memory
from autotune.errors import ConfigError
from autotune.model import read_model

from .conftest import run_cli, write_json

FULL = {
    "from_pretrained": {"dtype": "bfloat16", "attn_implementation": "sdpa", "device_map": {"": 0}},
    "generate": {"cache_implementation": "static", "disable_compile": False},
    "runtime": {"sdpa_backend": None, "padding_side": "left", "launch": None},
    "autotune": {"schema": 1, "version": "0.1.0", "objective": "throughput", "workload": {"batch_size": 1, "prompt_len": 512, "new_tokens": 128},
                 "tuned_on": {"facts": "sha256:x", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "transformers": "5.17.0"}},
}


def rules_of(report, severity=None):
    return {f["rule"] for f in report["findings"] if severity is None or f["severity"] == severity}


def test_full_config_on_its_own_machine_is_ok():
    r = check(FULL, target="h100")
    assert r["ok"] and r["schema"] == 1 and r["rules_version"]
    assert not rules_of(r, "error")
    assert "CACHE-COMPILE-WARMUP" in rules_of(r, "info")


def test_same_config_on_a_t4():
    r = check(FULL, target="t4")
    assert "DTYPE-BF16-ARCH" in rules_of(r, "warning")
    assert "CFG-TUNED-ON-OTHER-STACK" in rules_of(r, "warning")


# (target, config, rule expected as error) — drawn from the guides' advice
ERROR_CASES = [
    ("t4", {"attn_implementation": "flash_attention_2", "torch_dtype": "float16"}, "ATTN-FA2-MISSING"),
    ("t4", {"attn_implementation": "flash_attention_2", "torch_dtype": "float16"}, "ATTN-FA2-ARCH"),
    ("h100", {"use_flash_attention_2": True, "torch_dtype": "bfloat16"}, "LEGACY-USE-FLASH-ATTENTION-2-REMOVED"),
    ("h100", {"load_in_8bit": True}, "LEGACY-LOAD-IN-KBIT-REMOVED"),
    ("h100", {"dtype": "bfloat16", "to_bettertransformer": True}, "BT-TRANSFORMERS-5"),
    ("cpu", {"dtype": "bfloat16", "device_map": "cuda"}, "PLACE-NO-GPU"),
    ("h100", {"dtype": "bfloat16", "device_map": "auto", "max_memory": {"0": "70GiB", "1": "70GiB"}}, "PLACE-MAX-MEMORY-KEYS"),
    ("2xh100", {"dtype": "bfloat16", "tp_plan": "auto", "device_map": "auto"}, "PLACE-TP-WITH-DEVICE-MAP"),
    ("v100-16gb", {"attn_implementation": "flash_attention_4", "dtype": "float16"}, "ATTN-FA4-ARCH"),
]


@pytest.mark.parametrize("target, cfg, rule", ERROR_CASES)
def test_error_cases(target, cfg, rule):
    r = check(cfg, target=target)
    assert rule in rules_of(r, "error"), r["findings"]
    assert not r["ok"] and exit_code(r) == 1


# the same legacy configs across stacks: what each spelling means on 4.46, 4.57 and 5.x
STACKS = {"4.46": ["packages.transformers=4.46.3", "packages.accelerate=1.0.1"], "4.57": ["packages.transformers=4.57.1"], "5.17": []}


@pytest.mark.parametrize("stack, cfg, expect", [
    ("4.46", {"torch_dtype": "float16"}, set()),
    ("4.57", {"torch_dtype": "float16"}, {"LEGACY-TORCH-DTYPE"}),
    ("5.17", {"torch_dtype": "float16"}, {"LEGACY-TORCH-DTYPE"}),
    ("4.46", {"dtype": "float16"}, {"LEGACY-DTYPE-TOO-NEW"}),
    ("4.46", {"use_flash_attention_2": True, "torch_dtype": "float16"}, {"LEGACY-USE-FLASH-ATTENTION-2-DEPRECATED"}),
    ("4.57", {"use_flash_attention_2": True, "torch_dtype": "float16"}, {"LEGACY-USE-FLASH-ATTENTION-2-REMOVED", "LEGACY-TORCH-DTYPE"}),
    ("4.57", {"load_in_4bit": True, "torch_dtype": "float16"}, {"LEGACY-LOAD-IN-KBIT-DEPRECATED", "LEGACY-TORCH-DTYPE"}),
    ("5.17", {"load_in_4bit": True, "dtype": "float16"}, {"LEGACY-LOAD-IN-KBIT-REMOVED"}),
])
def test_legacy_spellings_by_stack(stack, cfg, expect):
    r = check(cfg, target="a100-80gb", overrides=STACKS[stack])
    legacy = {f for f in rules_of(r) if f.startswith("LEGACY-")}
    assert legacy == expect


@pytest.mark.parametrize("target", ["t4", "v100-16gb", "a100-80gb", "h100", "cpu"])
def test_bf16_verdict_per_target(target):
    r = check({"dtype": "bfloat16"}, target=target)
    fires = "DTYPE-BF16-ARCH" in rules_of(r)
    assert fires == (target in ("t4", "v100-16gb"))


@pytest.mark.parametrize("target, ok", [("t4", False), ("v100-16gb", False), ("a10g", True), ("a100-80gb", True), ("h100", False), ("cpu", False)])
def test_fa2_verdict_per_target(target, ok):
    """h100's typical stack (the lent machine) has no flash-attn; a10g/a100 profiles do."""
    r = check({"attn_implementation": "flash_attention_2", "dtype": "float16"}, target=target)
    assert r["ok"] == ok


def test_unjudged_keys_are_info():
    r = check({"dtype": "bfloat16", "revision": "main", "trust_remote_code": True}, target="h100")
    assert r["ok"]
    (f,) = [f for f in r["findings"] if f["rule"] == "CFG-KEY-NOT-JUDGED"]
    assert f["severity"] == "info" and "revision" in f["message"]


def test_not_evaluated_lists_needs():
    r = check({"dtype": "bfloat16", "device_map": {"": 0}}, target="h100")
    ne = {n["rule"]: n["needs"] for n in r["not_evaluated"]}
    assert ne["MEM-FIT"] == ["model"]
    assert exit_code(r) == 0 and exit_code(r, strict=True) == 1


def test_partial_facts_make_rules_not_evaluated(tmp_path):
    facts = write_json(tmp_path / "f.json", {"gpus": [{"name": "Tesla T4", "compute_capability": "7.5"}]})
    r = check({"attn_implementation": "flash_attention_2", "dtype": "float16"}, facts_file=facts)
    assert "ATTN-FA2-ARCH" in rules_of(r, "error")  # the GPU is known
    assert "ATTN-FA2-MISSING" in {n["rule"] for n in r["not_evaluated"]}  # packages are not


def test_with_a_real_model_folder(tiny_llama):
    spec = read_model(tiny_llama)
    assert spec.model_type == "llama" and spec.num_kv_heads == 2 and spec.head_dim == 16
    assert spec.param_count_exact and spec.supports == {"sdpa": True, "flash_attn": True, "flex_attn": True}
    r = check({"dtype": "bfloat16", "device_map": {"": 0}}, target="t4", model=tiny_llama)
    assert not any(n["rule"] == "MEM-FIT" for n in r["not_evaluated"])
    r = check({"from_pretrained": {"dtype": "bfloat16", "attn_implementation": "sdpa"}, "runtime": {"sdpa_backend": "efficient"}}, target="h100", model=tiny_llama)
    assert "SDPA-EFFICIENT-GQA" in rules_of(r, "error")


def test_memory_fit_for_a_7b_shape(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    folder = tmp_path / "llama7b"
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    r = check({"dtype": "float16", "device_map": {"": 0}}, target="t4", model=folder)
    assert "MEM-FIT" not in rules_of(r)  # 12.5 GiB of fp16 weights fit a 15 GiB T4
    r = check({"dtype": "float32", "device_map": {"": 0}}, target="t4", model=folder)
    assert "MEM-FIT" in rules_of(r, "error")
    r = check({"dtype": "float32", "device_map": "auto"}, target="t4", model=folder)
    assert "MEM-SPILL" in rules_of(r, "warning") and "MEM-FIT" not in rules_of(r)
    r = check({"dtype": "float16", "device_map": {"": 0}, "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, target="t4", model=folder)
    assert "MEM-FIT" not in rules_of(r)


@pytest.mark.parametrize("kind, fits", [(None, False), ("torchao-int8wo", True), ("torchao-int4wo", True)])
def test_memory_fit_counts_torchao_weights_in_their_own_bytes(tmp_path, kind, fits):
    """A 13 B shape on an L4 (24 GB): 26 GB of bf16 weights do not fit one GPU; torchao's int8
    (one byte a weight) and int4 (half a byte and a bf16 scale and zero per 128) do."""
    from autotune.space import TORCHAO_KINDS

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
           "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    folder = tmp_path / "llama13b"
    folder.mkdir()
    write_json(folder / "config.json", cfg)
    fp = {"dtype": "bfloat16", "device_map": {"": 0}}
    if kind:
        fp["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS[kind]}}
    r = check({"from_pretrained": fp}, target="l4", model=folder)
    assert ("MEM-FIT" in rules_of(r, "error")) is not fits


@pytest.mark.parametrize("version", [None, 1, 2])
def test_a_torchao_config_of_version_1_fails_the_check_as_it_fails_to_load(version):
    """No "_version" reads as 1 (torchao's config_from_dict), and torchao 0.18 removed int8's
    version 1: the installed transformers and torchao refuse the config exactly where the rule
    says so."""
    pytest.importorskip("torchao")
    import importlib.metadata

    from packaging.version import Version

    if not Version("0.18.0") <= Version(importlib.metadata.version("torchao")) < Version("0.19"):
        pytest.skip("read in torchao 0.18's source")
    from transformers import TorchAoConfig

    kind = {"_type": "Int8WeightOnlyConfig", "_data": {}, **({} if version is None else {"_version": version})}
    q = {"quant_method": "torchao", "quant_type": {"default": kind}}
    said = "TORCHAO-CONFIG-VERSION-1" in rules_of(check({"from_pretrained": {"dtype": "bfloat16", "quantization_config": q}}), "error")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchao warns that the stored version is not the current one
            TorchAoConfig.from_dict(q)
        refused = False
    except ValueError as e:
        refused = "version 1 of Int8WeightOnlyConfig has been removed" in str(e)
    assert said is refused is (version != 2)


@pytest.mark.parametrize("cfg, match", [
    ({"dtype": "float17"}, "unknown dtype"),
    ({"max_memory": {"0": "lots"}}, "cannot parse memory size 'lots'"),
    ({"max_memory": {"gpu0": "10GiB"}}, "not a GPU ordinal"),
    ({"attn_implementation": "flash"}, "unknown value 'flash'"),
    ({"device_map": "everywhere"}, "unknown device_map"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True}}, "exactly one"),
    ({"use_flash_attention_2": "yes"}, "expected true or false"),
    ({"from_pretrained": {}, "extra": 1}, "unknown top-level key"),
    ({"from_pretrained": [], "generate": {}}, "from_pretrained: expected an object"),
    ([1, 2], "must be a JSON object"),
])
def test_unusable_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(cfg)


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB,1=20GB,cpu=64GiB") == {"0": 20 * 2**30, "1": 20 * 10**9, "cpu": 64 * 2**30}
    assert parse_max_memory({0: 1024, "cuda:1": "1KiB"}) == {"0": 1024, "1": 1024}
    with pytest.raises(ConfigError):
        parse_max_memory("0:20GiB")


# ---------------------------------------------------------------------------- the CLI, as a user runs it
def test_cli_exit_codes(tmp_path):
    good = write_json(tmp_path / "good.json", {"dtype": "bfloat16"})
    bad = write_json(tmp_path / "bad.json", {"attn_implementation": "flash_attention_2", "torch_dtype": "float16"})
    assert run_cli("check", str(good), "--target", "h100").returncode == 0
    out = run_cli("check", str(bad), "--target", "t4", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert set(report) >= {"schema", "ok", "rules_version", "findings", "not_evaluated"}
    assert {"rule", "severity", "option", "message", "fix", "source"} <= set(report["findings"][0])
    assert run_cli("check", str(good), "--target", "h100", "--strict").returncode == 1  # MEM-FIT needs a model


@pytest.mark.parametrize("args, match", [
    (["check", "missing.json", "--target", "h100"], "config file not found"),
    (["check", "{bad}", "--target", "h100"], "not valid JSON"),
    (["check", "{dtype}", "--target", "h100"], "unknown dtype"),
    (["check", "{ok}", "--target", "tpu"], "unknown target"),
    (["check", "{ok}", "--facts", "nope.json"], "facts file not found"),
    (["check", "{ok}", "--target", "h100", "--model", "no-such-dir"], "model folder not found"),
    (["check", "{ok}", "--target", "h100", "--set", "gpus.count=x"], "not a whole number"),
    (["check", "{ok}", "--target", "h100", "--batch-size", "0"], "at least 1"),
    (["rules", "NOPE-1"], "unknown rule"),
    (["doctor", "--target", "h100", "--facts", "x.json"], "not allowed with argument"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, match):
    files = {"{bad}": "{not json", "{dtype}": '{"dtype": "float17"}', "{ok}": '{"dtype": "bfloat16"}'}
    real = []
    for a in args:
        if a in files:
            p = tmp_path / "cfg.json"
            p.write_text(files[a])
            a = str(p)
        real.append(a)
    out = run_cli(*real, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert match in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_public_api_names_survive_submodule_imports():
    """`autotune.check` & co. stay the functions even after every submodule was imported."""
    import importlib
    import pkgutil

    import autotune

    for mod in pkgutil.iter_modules(autotune.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"autotune.{mod.name}")
    for name in ("probe", "check", "doctor", "tune", "load", "load_target"):
        assert callable(getattr(autotune, name)), name
