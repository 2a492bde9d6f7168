"""Fakes and fixtures: a fake NVML backend, tiny random models saved to a temp folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from autotune.facts import UNKNOWN
from autotune.machine import NvmlUnavailable, RawDevice, RawLink

GIB = 1024**3
ROOT = Path(__file__).resolve().parent.parent


def device(i: int, name: str, cc: tuple[int, int], total_gib: float, free_gib: float | None = None, bus: str | None = None, **kw: Any) -> RawDevice:
    return RawDevice(
        nvml_index=i,
        uuid=f"GPU-{i:08d}-aaaa-bbbb-cccc-{i:012d}",
        pci_bus_id=bus or f"00000000:{0x10 + i:02X}:00.0",
        name=name,
        compute_capability=cc,
        memory_total=int(total_gib * GIB),
        memory_free=int((free_gib if free_gib is not None else total_gib - 0.5) * GIB),
        mig_mode=kw.get("mig_mode", False),
        processes=kw.get("processes", []),
        clock_event_reasons=kw.get("reasons", []),
        ecc_uncorrected=kw.get("ecc", 0),
    )


@dataclass
class FakeNvml:
    """An injected NVML backend: a list of devices, a driver, links, or an error at init."""

    devices_: list[RawDevice] = field(default_factory=list)
    driver_: dict[str, str] = field(default_factory=lambda: {"version": "580.159.04", "cuda": "13.0"})
    init_error: NvmlUnavailable | None = None
    fail_on_devices: Exception | None = None
    nvlinks: int = 0
    shut: bool = False

    def init(self) -> None:
        if self.init_error:
            raise self.init_error

    def driver(self) -> dict[str, str]:
        return dict(self.driver_)

    def devices(self) -> list[RawDevice]:
        if self.fail_on_devices:
            raise self.fail_on_devices
        return list(self.devices_)

    def link(self, a: int, b: int) -> RawLink:
        return RawLink(nvlink_links=self.nvlinks, p2p=self.nvlinks > 0, topology="same-board" if self.nvlinks else "host-bridge")

    def shutdown(self) -> None:
        self.shut = True


H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 79.65)
T4 = ("Tesla T4", (7, 5), 15.0)
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0), 80.0)

PKGS = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "accelerate": "1.15.0", "optimum": None, "bitsandbytes": "0.50.2", "flash-attn": None}
HOST = {"python": "3.12.3", "os": "Linux", "cpu_count": 16, "ram_gib": 125.8, "cpu_flags": ["avx2"], "nvidia_device_nodes": True}


@pytest.fixture
def fake_probe():
    """probe() over a fake machine: fake_probe(devices, env=..., **probe kwargs)."""
    from autotune.machine import probe

    def run(devices=(), env=None, nvml=None, packages=None, torch_cuda="13.0", host=None, **kw):
        backend = nvml or FakeNvml(devices_=list(devices))
        return probe(nvml=backend, env=env or {}, packages=packages or PKGS, host=host or HOST, torch_cuda=torch_cuda, **kw)

    return run


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m autotune ARGS` in a fresh process, as a user would."""
    e = dict(os.environ)
    e.pop("AUTOTUNE_DEBUG", None)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=600)


# EOS ids that some rows produce early and others later: each row stops at a different step
MANY_EOS = [7, 9, 11, 13, 17, 19, 23, 29, 31]


def decode_model() -> Any:
    """The decode loop tests' tiny random Llama (vocab 300, EOS 5, pad 0), in eval mode on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=5, bos_token_id=1, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def decode_batch() -> tuple[Any, Any]:
    """Three rows of 12 tokens for it, two of them left-padded (as generation wants): (ids, mask)."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def save_tiny_llama(folder: Path, *, dtype: str = "float32", **overrides: Any) -> Path:
    """A tiny random Llama saved with save_pretrained (real safetensors, real config.json)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    kw.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def tinygemm_on_cpu(monkeypatch):
    """torchao's tile-packed int4 (``Int4TilePackedTo4dTensor``) on the CPU. Its quantizing,
    slicing and flattening are torchao's own; only tinygemm's two CUDA ops get CPU stand-ins:
    the packing keeps the weight's int4 bytes row after row in the 4-D shape tinygemm's has
    (8 rows a tile along dim 0), and the matmul dequantizes them as tinygemm does, per group,
    ``(q - 8) * scale + zero`` (torchao's ``dequantize_affine_tinygemm``), then multiplies. So
    the layout inside a tile is not tinygemm's; the GPU tests run the real kernels."""
    import torch

    pytest.importorskip("torchao")

    def pack(w, inner_k_tiles):  # w: uint8 [n, k/2], two int4 values a byte, the even column high
        n, half = w.shape
        return w.contiguous().view(torch.int32).reshape(n // 8, 2 * half // (inner_k_tiles * 16), 32, inner_k_tiles // 2)

    def matmul(x, qdata, group_size, scale_and_zero):
        rows = qdata.contiguous().view(torch.uint8).reshape(qdata.shape[0] * 8, -1)
        q = torch.stack([(rows >> 4) & 0xF, rows & 0xF], dim=-1).reshape(rows.shape[0], -1).float()
        scale, zero = (scale_and_zero[..., i].float().t().repeat_interleave(group_size, dim=1) for i in (0, 1))
        return (x.float() @ ((q - 8) * scale + zero).t()).to(x.dtype)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_convert_weight_to_int4pack", pack, "CPU")
    lib.impl("_weight_int4pack_mm", matmul, "CPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # from_hp asks for sm80+
    yield
    lib._destroy()


__all__ = ["FakeNvml", "device", "run_cli", "save_tiny_llama", "write_json", "UNKNOWN", "gpu_present", "MANY_EOS", "decode_model",
           "decode_batch"]
