"""autotune doctor and probe: report shape, verdicts per machine, exit codes, bad input."""

from __future__ import annotations

import json

import pytest

from autotune.diagnosis import doctor
from autotune.facts import Facts, load_facts
from autotune.profiles import apply_overrides, load_target

from .conftest import A100, T4, ROOT, FakeNvml, device, run_cli, write_json


def verdicts(report):
    return {(o["option"], o["value"]): o["status"] for o in report["options"]}


def test_json_shape_and_every_option_axis():
    r = doctor(load_target("h100"))
    assert set(r) >= {"schema", "facts", "options", "installation", "broken", "exit_code"}
    axes = {o["option"] for o in r["options"]}
    assert axes == {"dtype", "attn_implementation", "sdpa_backend", "quantization", "cache", "placement"}
    for o in r["options"]:
        assert o["status"] in ("available", "unavailable", "warning", "not evaluated")
        for f in o["findings"]:
            assert f["message"] and f["fix"] and f["source"]


def test_h100_fixture_verdicts():
    v = verdicts(doctor(load_facts(ROOT / "tests" / "fixtures" / "h100-probe.json")))
    assert v[("dtype", "bfloat16")] == "available"
    assert v[("attn_implementation", "sdpa")] == "available"
    assert v[("attn_implementation", "flash_attention_2")] == "unavailable"  # not installed there
    assert v[("quantization", "bitsandbytes 4-bit nf4")] == "unavailable"  # not installed there
    assert v[("placement", "tensor parallel (torchrun)")] == "unavailable"  # one GPU


def test_t4_verdicts():
    v = verdicts(doctor(apply_overrides(load_target("t4"), ["packages.flash-attn=2.8.3"])))
    assert v[("dtype", "bfloat16")] == "warning"
    assert v[("attn_implementation", "flash_attention_2")] == "unavailable"
    assert v[("sdpa_backend", "flash")] == "unavailable"
    assert v[("quantization", "bitsandbytes 8-bit")] == "warning"


def test_torchao_kinds_verdicts():
    ao = ["packages.torchao=0.18.0"]
    names = ("torchao int8 weight-only", "torchao int4 weight-only (tile-packed, group 128)", "torchao float8 (dynamic activations, per row)")
    h100 = verdicts(doctor(apply_overrides(load_target("h100"), ao)))
    assert [h100[("quantization", n)] for n in names] == ["available"] * 3
    assert [verdicts(doctor(load_target("h100")))[("quantization", n)] for n in names] == ["unavailable"] * 3  # no torchao there
    a100 = verdicts(doctor(apply_overrides(load_target("a100-80gb"), ao)))
    assert a100[("quantization", names[2])] == "unavailable" and a100[("quantization", names[1])] == "available"  # float8 needs sm89
    cpu = verdicts(doctor(apply_overrides(load_target("cpu"), ao)))
    assert [cpu[("quantization", n)] for n in names] == ["available", "unavailable", "unavailable"]  # int4 and float8 need CUDA


def test_healthy_cpu_machine_exits_0():
    r = doctor(load_target("cpu"))
    assert r["exit_code"] == 0 and not r["broken"]
    assert verdicts(r)[("placement", "one GPU")] == "unavailable"


def test_broken_installation_exits_1():
    f = apply_overrides(load_target("a100-80gb"), ["packages.torch=2.11.0+cpu", "torch_cuda=null"])
    r = doctor(f)
    assert r["exit_code"] == 1
    (fix,) = [x["fix"] for x in r["installation"]["findings"] if x["rule"] == "INST-TORCH-CPU-ONLY"]
    assert fix == "pip install --force-reinstall torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"


def test_nvml_broken_exits_1(fake_probe):
    from autotune.machine import NvmlUnavailable

    f = fake_probe(nvml=FakeNvml(init_error=NvmlUnavailable("mismatch", "Driver/library version mismatch")))
    assert doctor(f)["exit_code"] == 1


def test_mixed_gpus_each_judged(fake_probe):
    f = fake_probe([device(0, *T4), device(1, *A100)], packages={"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "flash-attn": "2.8.3", "bitsandbytes": None})
    r = doctor(f)
    fa2 = [o for o in r["options"] if o["value"] == "flash_attention_2"][0]
    # the base candidate sits on GPU 0 (the A100 in CUDA order) - FA2 runs there
    assert fa2["status"] == "available"
    f2 = apply_overrides(f, [])
    from autotune.gate import check

    rep = check({"attn_implementation": "flash_attention_2", "dtype": "float16", "device_map": "auto"}, facts=f2)
    gpus = [x.get("gpu") for x in rep["findings"] if x["rule"] == "ATTN-FA2-ARCH"]
    assert gpus == [1], "the T4 (CUDA ordinal 1) fails, the A100 does not"


def test_cli_doctor_and_probe_here():
    out = run_cli("doctor", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["facts"]["source"] == "probe"
    out = run_cli("probe", "--json")
    assert out.returncode == 0
    facts = Facts.from_dict(json.loads(out.stdout))
    assert facts.package("packaging") is not None or "packaging" not in facts.packages
    text = run_cli("doctor").stdout
    assert "Options" in text and "attn_implementation" in text


def test_cli_doctor_reads_facts_files(tmp_path):
    p = write_json(tmp_path / "f.json", {"gpus": [{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_gib": 15.0}]})
    out = run_cli("doctor", "--facts", str(p), "--json")
    assert out.returncode == 0
    v = verdicts(json.loads(out.stdout))
    assert v[("attn_implementation", "flash_attention_2")] == "unavailable"  # by architecture alone
    assert v[("dtype", "float16")] in ("available", "not evaluated")


def test_cli_probe_writes_a_file(tmp_path):
    out = run_cli("probe", "-o", str(tmp_path / "facts.json"))
    assert out.returncode == 0 and out.stdout == ""
    assert load_facts(tmp_path / "facts.json").source == "probe"


@pytest.mark.parametrize("args, match", [
    (["doctor", "--facts", "missing.json"], "facts file not found"),
    (["doctor", "--target", "quantum"], "unknown target"),
    (["doctor", "--deep", "--target", "t4"], "cannot be combined"),
    (["doctor", "--model", "nowhere"], "model folder not found"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_doctor_bad_input(tmp_path, args, match):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and match in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_doctor_malformed_facts(tmp_path):
    (tmp_path / "f.json").write_text("{oops")
    out = run_cli("doctor", "--facts", str(tmp_path / "f.json"))
    assert out.returncode == 2 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr


def test_rules_cli():
    out = run_cli("rules")
    assert out.returncode == 0 and "ATTN-FA2-ARCH" in out.stdout
    out = run_cli("rules", "ATTN-FA2-ARCH")
    assert out.returncode == 0 and "Sources" in out.stdout and "Fix" in out.stdout
    assert run_cli("targets").returncode == 0
