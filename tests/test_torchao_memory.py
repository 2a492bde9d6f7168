"""The memory model's torchao weight bytes against what torchao 0.18 really holds after
transformers' ``from_pretrained`` quantized a model: int8 weight-only on the CPU; int8, int4
(tinygemm's tile-packed layout, CUDA only) and float8 (sm89+) on a GPU (skipped without one)."""

from __future__ import annotations

import pytest

from tests.conftest import gpu_present, save_tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")


def held_bytes(t) -> int:
    """Bytes of a parameter, a torchao tensor subclass counted by its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(held_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # Linear widths that tinygemm's int4 packing and float8's row scales accept
    return save_tiny_llama(tmp_path_factory.mktemp("ao"), dtype="bfloat16", hidden_size=256, intermediate_size=512, vocab_size=512)


def estimate_and_held(folder, kind: str, device: str) -> tuple[int, int, int]:
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from autotune.config import Workload, parse_config
    from autotune.machine import probe
    from autotune.memory import estimate
    from autotune.model import read_model
    from autotune.space import TORCHAO_KINDS

    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS[kind]}}
    cfg = {"from_pretrained": {"dtype": "bfloat16", "device_map": device, "quantization_config": q}}
    wl = Workload(batch_size=1, prompt_len=8, new_tokens=4)
    spec, facts = read_model(folder), probe()
    est = estimate(parse_config(cfg, workload=wl), spec, facts)
    plain = estimate(parse_config({"from_pretrained": {"dtype": "bfloat16"}}, workload=wl), spec, facts)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device, quantization_config=TorchAoConfig.from_dict(q))
    quantized = [p for p in model.parameters() if type(p).__name__ != "Parameter"]
    assert quantized, "torchao quantized no weight"
    return est.weights, sum(held_bytes(p) for p in model.parameters()), plain.weights


def test_int8_weights_are_counted_as_torchao_holds_them(folder):
    est, held, bf16 = estimate_and_held(folder, "torchao-int8wo", "cpu")
    assert est == held, (est, held)  # int8 values, an fp32 scale and an int8 zero point per row
    assert held < 0.6 * bf16


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present() or not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", ["torchao-int8wo", "torchao-int4wo", "torchao-float8dq"])
def test_gpu_weights_are_counted_as_torchao_holds_them(folder, kind):
    if kind == "torchao-float8dq" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm89+")
    est, held, bf16 = estimate_and_held(folder, kind, "cuda")
    assert abs(est - held) <= 0.01 * held, (est, held)


def test_weights_torchao_leaves_unquantized_are_counted_so_and_named(tmp_path, tinygemm_on_cpu):
    """int4 weight-only (group 128) on a model of hidden size 192: torchao leaves every
    projection whose input is 192 wide as loaded (bf16), and quantizes only down_proj (input
    512). The estimate counts exactly what is held, and rule TORCHAO-SHAPES-UNQUANTIZED's fact
    names the projections that stayed. (tinygemm's CUDA ops have CPU stand-ins here.)"""
    from autotune.config import parse_config
    from autotune.memory import torchao_unquantized
    from autotune.model import read_model
    from autotune.space import TORCHAO_KINDS

    odd = save_tiny_llama(tmp_path / "odd", dtype="bfloat16", hidden_size=192, intermediate_size=512, vocab_size=512,
                          num_attention_heads=3, num_key_value_heads=1)
    est, held, bf16 = estimate_and_held(odd, "torchao-int4wo", "cpu")
    assert est == held, (est, held)
    from transformers import AutoModelForCausalLM, TorchAoConfig

    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS["torchao-int4wo"]}}
    model = AutoModelForCausalLM.from_pretrained(odd, dtype=torch.bfloat16, device_map="cpu", quantization_config=TorchAoConfig.from_dict(q))
    layer = model.model.layers[0]
    left = sorted(n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and type(m.weight) is torch.nn.Parameter)
    said, share = torchao_unquantized(parse_config({"from_pretrained": {"dtype": "bfloat16", "quantization_config": q}}), read_model(odd))
    assert left == ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert said == ["q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj (input size 192 not a multiple of group_size 128)"]
    assert share == pytest.approx(1 - 512 * 192 / (2 * 192 * 192 + 2 * 64 * 192 + 3 * 512 * 192))
    # and the one int4 weight is padded as rule TORCHAO-INT4-PADDING says: input 512 to 1,024 (8 int4 values an int32)
    from autotune.memory import int4_padding

    assert layer.mlp.down_proj.weight.qdata.numel() * 8 == 192 * 1024
    assert int4_padding(parse_config({"from_pretrained": {"dtype": "bfloat16", "quantization_config": q}}), read_model(odd)) == (
        0.5, ["down_proj (input 512 to 1024)"])


@pytest.mark.parametrize("sizes, group", [
    ((2048, 5632, 32, 4, 64), 128),  # TinyLlama: every input a multiple of 128
    ((576, 1536, 9, 3, 64), 64),     # SmolLM-135M: 576 is 4.5 groups of 128
    ((2880, 2880, 64, 8, 64), 64),   # 2880 = 45 x 64
    ((200, 512, 4, 2, 50), 128),     # nothing divides 200: the default (and the rule warns)
])
def test_the_tunes_int4_group_size_divides_every_projections_input(sizes, group):
    from autotune.config import parse_config
    from autotune.memory import torchao_unquantized
    from autotune.model import ModelSpec
    from autotune.space import candidate_config, int4_group_size

    hidden, inter, heads, kv, hd = sizes
    spec = ModelSpec(path="m", model_type="llama", hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_kv_heads=kv, head_dim=hd)
    assert int4_group_size(spec) == group
    cfg = candidate_config("bfloat16", "sdpa", cache="static", quant="torchao-int4wo", int4_group=int4_group_size(spec))
    said, share = torchao_unquantized(parse_config(cfg), spec)
    assert (said == [] and share == 0) == (hidden != 200), said
    assert int4_group_size(ModelSpec(path="m", model_type="llama")) == 128, "sizes not given: torchao's default"


def test_what_int4_leaves_unquantized_is_read_from_the_checkpoints_own_names(tmp_path, tinygemm_on_cpu):
    """Another architecture (OPT: out_proj, fc1, fc2; no gate): the projections named, and the
    group size chosen, come from the checkpoint's tensors, and match what torchao did."""
    from transformers import AutoModelForCausalLM, OPTConfig, TorchAoConfig

    from autotune.config import parse_config
    from autotune.memory import torchao_unquantized
    from autotune.model import read_model
    from autotune.space import TORCHAO_KINDS, candidate_config, int4_group_size

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(OPTConfig(hidden_size=192, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                                               word_embed_proj_dim=192), dtype=torch.bfloat16).save_pretrained(tmp_path / "opt")
    spec = read_model(tmp_path / "opt")
    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS["torchao-int4wo"]}}
    said, _ = torchao_unquantized(parse_config({"from_pretrained": {"dtype": "bfloat16", "quantization_config": q}}), spec)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "opt", dtype=torch.bfloat16, device_map="cpu", quantization_config=TorchAoConfig.from_dict(q))
    layer = model.model.decoder.layers[0]
    left = [n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and type(m.weight) is torch.nn.Parameter]
    assert sorted(left) == ["fc1", "k_proj", "out_proj", "q_proj", "v_proj"]  # fc2's input, 512, is 4 groups
    (names, why), = (x.split(" (", 1) for x in said)
    assert sorted(names.split(", ")) == sorted(left) and why == "input size 192 not a multiple of group_size 128)", said
    group = int4_group_size(spec)
    assert group == 64
    cfg = candidate_config("bfloat16", "sdpa", quant="torchao-int4wo", int4_group=group)
    assert torchao_unquantized(parse_config(cfg), spec) == ([], 0.0)
