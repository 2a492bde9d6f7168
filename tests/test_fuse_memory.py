"""What fusing projections holds on a GPU, in the memory estimate: the fused weights come on top
of the loaded ones, whose one allocation (transformers' caching_allocator_warmup) keeps the
replaced parts reserved (autotune.memory, docs/PERFORMANCE.md)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import gpu_present, save_tiny_llama

torch = pytest.importorskip("torch")

GROUPED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _estimate(folder, fuse: bool, on_gpu: bool = True, drop_tensors: bool = False):
    from autotune.config import Workload, parse_config
    from autotune.machine import probe
    from autotune.memory import estimate
    from autotune.model import read_model

    spec = read_model(folder)
    if drop_tensors:  # a model read from config.json alone
        spec = dataclasses.replace(spec, tensors=())
    cfg = {"from_pretrained": {"dtype": "bfloat16"}, "runtime": {"fuse_projections": fuse}}
    return estimate(parse_config(cfg, workload=Workload(batch_size=1, prompt_len=8, new_tokens=4)), spec, probe(), on_gpu=on_gpu)


def _grouped_bytes(folder) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 2 for k in f.keys()
                   if k.rsplit(".", 2)[-2] in GROUPED and k.endswith(".weight"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("fm"), dtype="bfloat16", hidden_size=128, intermediate_size=352, vocab_size=512)


def test_a_fused_candidate_on_a_gpu_counts_its_fused_weights_beside_the_loaded_ones(folder):
    plain, fused = _estimate(folder, False), _estimate(folder, True)
    assert plain.fused_copies == 0
    assert fused.fused_copies == _grouped_bytes(folder) > 0
    assert fused.weights == plain.weights
    assert fused.total > plain.total


def test_on_the_cpu_fusing_adds_nothing(folder):
    assert _estimate(folder, True, on_gpu=False).fused_copies == 0


def test_without_tensor_names_a_llamas_groups_are_counted_from_its_shape(folder):
    assert _estimate(folder, True, drop_tensors=True).fused_copies == _grouped_bytes(folder)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present() or not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_what_a_fused_model_reserves_is_within_its_estimate(tmp_path_factory):
    """Loaded as the tune loads it and fused, a 7 B-wide Llama reserves more than its weights'
    estimate (the replaced parts stay held), and no more than the estimate with the fused copies."""
    from autotune.config import load
    from autotune.fuse import fuse_projections
    from autotune.memory import FRAGMENTATION

    folder = save_tiny_llama(tmp_path_factory.mktemp("fm-gpu"), dtype="bfloat16", hidden_size=4096, intermediate_size=11008,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    est = _estimate(folder, True)
    torch.cuda.empty_cache()
    model = load(folder, {"from_pretrained": {"dtype": "bfloat16", "device_map": {"": 0}}, "generate": {}, "runtime": {}})
    assert len(fuse_projections(model)["fused"]) == 2 * 2
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    assert est.weights * FRAGMENTATION < reserved <= (est.weights + est.fused_copies) * FRAGMENTATION, (reserved, est)
