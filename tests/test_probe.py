"""The probe against a fake NVML: H100, T4, mixed GPUs, no GPU, NVML errors, a busy GPU."""

from __future__ import annotations

import json

import pytest

from autotune.facts import UNKNOWN, Facts
from autotune.machine import NvmlUnavailable, cuda_order, host_info, package_versions, torch_cuda_version

from .conftest import A100, H100, T4, FakeNvml, device


def test_h100(fake_probe):
    f = fake_probe([device(0, *H100)])
    assert f.source == "probe"
    assert f.gpu_count == 1
    g = f.gpus[0]
    assert (g.index, g.name, g.compute_capability) == (0, "NVIDIA H100 80GB HBM3", "9.0")
    assert g.memory_total_gib == pytest.approx(79.65)
    assert g.memory_free_gib == pytest.approx(79.15)
    assert g.uuid.startswith("GPU-")
    assert f.driver == {"version": "580.159.04", "cuda": "13.0"}
    assert f.nvml["status"] == "ok"
    assert f.links == ()


def test_t4(fake_probe):
    f = fake_probe([device(0, *T4)])
    assert f.gpus[0].compute_capability == "7.5"
    assert f.gpus[0].capability.at_least(7, 5) and not f.gpus[0].capability.at_least(8)


def test_mixed_gpus_cuda_order_differs_from_nvml(fake_probe):
    # NVML (PCI bus order): T4 first, A100 second. CUDA's default FASTEST_FIRST puts the A100 first.
    devs = [device(0, *T4, bus="00000000:01:00.0"), device(1, *A100, bus="00000000:81:00.0")]
    f = fake_probe(devs)
    assert [g.name for g in f.gpus] == ["NVIDIA A100-SXM4-80GB", "Tesla T4"]
    assert [g.index for g in f.gpus] == [0, 1]
    assert [g.nvml_index for g in f.gpus] == [1, 0]
    assert f.nvml["ordinal_basis"] == "fastest-first-heuristic"
    f = fake_probe(devs, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert [g.name for g in f.gpus] == ["Tesla T4", "NVIDIA A100-SXM4-80GB"]
    assert f.nvml["ordinal_basis"] == "pci-bus"


def test_cuda_visible_devices_by_index_and_uuid(fake_probe):
    devs = [device(i, *H100) for i in range(4)]
    f = fake_probe(devs, env={"CUDA_VISIBLE_DEVICES": "2,0"})
    assert [g.nvml_index for g in f.gpus] == [2, 0]
    assert [g.index for g in f.gpus] == [0, 1]
    f = fake_probe(devs, env={"CUDA_VISIBLE_DEVICES": devs[3].uuid[:12]})
    assert [g.uuid for g in f.gpus] == [devs[3].uuid]
    # CUDA stops at the first entry it cannot resolve
    f = fake_probe(devs, env={"CUDA_VISIBLE_DEVICES": "1,7,2"})
    assert [g.nvml_index for g in f.gpus] == [1]
    f = fake_probe(devs, env={"CUDA_VISIBLE_DEVICES": ""})
    assert f.gpus == ()
    assert f.env["CUDA_VISIBLE_DEVICES"] == ""


def test_links_between_pairs(fake_probe):
    f = fake_probe([device(i, *H100) for i in range(3)], nvml=FakeNvml(devices_=[device(i, *H100) for i in range(3)], nvlinks=18))
    assert [(l.a, l.b) for l in f.links] == [(0, 1), (0, 2), (1, 2)]
    assert all(l.nvlink_links == 18 and l.p2p is True for l in f.links)


def test_no_gpu_no_driver(fake_probe):
    err = NvmlUnavailable("no-library", "libnvidia-ml.so not found")
    f = fake_probe(nvml=FakeNvml(init_error=err), host={"python": "3.11", "nvidia_device_nodes": False})
    assert f.gpus == ()
    assert f.gpu_count == 0
    assert f.nvml["status"] == "no-library"


def test_nvml_error_after_init_is_reported_not_raised(fake_probe):
    backend = FakeNvml(devices_=[device(0, *H100)], fail_on_devices=RuntimeError("NVMLError_GpuIsLost"))
    f = fake_probe(nvml=backend)
    assert f.gpus is UNKNOWN
    assert f.nvml["status"] == "error"
    assert "GpuIsLost" in f.nvml["message"]
    assert backend.shut, "NVML is shut down even when a query fails"


def test_driver_mismatch(fake_probe):
    f = fake_probe(nvml=FakeNvml(init_error=NvmlUnavailable("mismatch", "Driver/library version mismatch")))
    assert f.gpus is UNKNOWN
    assert f.nvml["status"] == "mismatch"


def test_busy_gpu_health(fake_probe):
    busy = device(0, *H100, free_gib=40.0, processes=[(123, 30 * 1024**3), (456, None)], reasons=["hw-thermal-slowdown"], ecc=2)
    f = fake_probe([busy])
    g = f.gpus[0]
    assert g.other_processes == 2
    assert g.memory_used_by_others_gib == pytest.approx(30.0)
    assert g.clock_event_reasons == ["hw-thermal-slowdown"]
    assert g.ecc_uncorrected == 2


def test_probe_never_imports_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, autotune.machine as p; p.probe(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_package_versions_from_metadata():
    v = package_versions(["packaging", "surely-not-installed-autotune-xyz"])
    assert v["packaging"] and v["surely-not-installed-autotune-xyz"] is None


def test_torch_cuda_read_from_version_py():
    import torch

    assert torch_cuda_version() == torch.version.cuda  # None for the CPU build CI installs


def test_host_info_has_the_basics():
    h = host_info()
    assert h["python"] and h["cpu_count"] >= 1
    assert isinstance(h.get("cpu_flags", []), list)


def test_facts_roundtrip(fake_probe):
    f = fake_probe([device(0, *T4), device(1, *A100)], nvml=FakeNvml(devices_=[device(0, *T4), device(1, *A100)], nvlinks=0))
    again = Facts.from_dict(json.loads(f.to_json()))
    assert again.to_dict() == f.to_dict()
    assert again.fingerprint() == f.fingerprint()


def test_cuda_order_ties_keep_bus_order():
    devs = [device(1, *H100, bus="00000000:20:00.0"), device(0, *H100, bus="00000000:10:00.0")]
    ordered, basis = cuda_order(devs, {})
    assert [d.pci_bus_id for d in ordered] == ["00000000:10:00.0", "00000000:20:00.0"]
    assert basis == "pci-bus"


@pytest.mark.slow
@pytest.mark.parametrize("deep_timeout", [60])
def test_deep_probe_runs_in_a_subprocess(fake_probe, deep_timeout):
    f = fake_probe([], deep=True, deep_timeout=deep_timeout)
    assert f.deep["status"] == "ok"
    assert f.deep["torch"]["import"] is True
    assert f.deep["sdpa"]["math"]["ok"] is True


def test_deep_probe_survives_a_hang(monkeypatch, tmp_path):
    from autotune import machine as probe_mod

    slow = tmp_path / "python"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    r = probe_mod.deep_probe(timeout=1, python=str(slow))
    assert r["status"] == "timeout"
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    crash.chmod(0o755)
    r = probe_mod.deep_probe(timeout=5, python=str(crash))
    assert r["status"] == "crashed" and "Segmentation" in r["message"]
