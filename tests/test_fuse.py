"""Fused projections (autotune.fuse, runtime.fuse_projections): the same outputs as the model
as loaded, one matmul per group in the compiled graph, and nothing fused where it would not be
the same computation."""

from __future__ import annotations

import logging

import pytest

from autotune.config import ConfigError, load, parse_config
from autotune.fuse import GROUPS, fuse_projections, groups_in

from .conftest import gpu_present, save_tiny_llama

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama32"), dtype="float32")


def _cfg(fuse=True, **rt):
    return {"from_pretrained": {"dtype": "float32", "device_map": "cpu"}, "generate": {}, "runtime": {"fuse_projections": fuse, **rt}}


def test_llama_fuses_qkv_and_gate_up_and_gives_the_same_logits_and_tokens(llama32):
    plain = load(llama32, _cfg(False))
    fused = load(llama32, _cfg(True))
    layer = fused.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "FusedPart" and type(layer.mlp.up_proj).__name__ == "FusedPart"
    assert layer.self_attn.fused_q_proj_k_proj_v_proj.weight.shape == (64 + 2 * 32, 64)  # 4 heads x 16, and 2 KV heads x 16 twice
    assert layer.mlp.fused_gate_proj_up_proj.weight.shape == (2 * 128, 64)
    assert layer.self_attn.k_proj.weight.shape == plain.model.layers[0].self_attn.k_proj.weight.shape
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters()), "no weight held twice"
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = plain(ids).logits, fused(ids).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert torch.equal(fused.generate(ids, **kw), plain.generate(ids, **kw))
    assert layer.self_attn.fused_q_proj_k_proj_v_proj._y is None, "no activation kept past the layer"


def test_the_sync_free_loop_on_a_fused_model_gives_generates_tokens(llama32):
    from autotune import decode

    m = load(llama32, _cfg(True))
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0,
              cache_implementation="static")
    with torch.inference_mode():
        assert torch.equal(m.generate(ids, custom_generate=decode.generate, **kw), m.generate(ids, **kw))


def test_compiled_the_fused_model_has_one_matmul_per_group_and_one_graph(llama32):
    m = load(llama32, _cfg(True))
    graphs: list[int] = []

    def backend(gm, example):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)))
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(m.forward, backend=backend, fullgraph=True)
    with torch.inference_mode():
        f(torch.randint(3, 256, (1, 8)))
    # 2 layers x (q/k/v, o, gate/up, down) + lm_head; unfused it would be 2 x 7 + 1
    assert graphs == [2 * 4 + 1]


def _qkv():
    """A module holding q/k/v projections with biases (8 -> 8, 4, 4), and those Linears."""
    lin = [torch.nn.Linear(8, n, bias=True) for n in (8, 4, 4)]
    parent = torch.nn.Module()
    for name, m in zip(("q_proj", "k_proj", "v_proj"), lin):
        setattr(parent, name, m)
    return parent, lin


def test_a_sibling_given_another_input_computes_its_own_rows():
    # cross-attention feeds keys and values another tensor than queries: no slice of the query's product
    parent, lin = _qkv()
    want_q, want_k = [m.weight.detach().clone() for m in lin[:2]]
    report = fuse_projections(parent)
    assert report["fused"] == ["q_proj/k_proj/v_proj"]
    x, enc = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        q, k, v = parent.q_proj(x), parent.k_proj(enc), parent.v_proj(enc)
        torch.testing.assert_close(q, torch.nn.functional.linear(x, want_q, lin[0].bias))
        torch.testing.assert_close(k, torch.nn.functional.linear(enc, want_k, lin[1].bias))
        torch.testing.assert_close(v, lin[2](enc))


def test_what_is_not_plain_nn_linear_is_left_as_loaded():
    class QuantLinear(torch.nn.Linear):  # a quantizer's own module (bitsandbytes' Linear8bitLt is one)
        pass

    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = QuantLinear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    assert fuse_projections(parent)["fused"] == [] and "not plain nn.Linear" in fuse_projections(parent)["skipped"]["q_proj/k_proj/v_proj"]
    # mixed sizes of input, or a bias on one sibling only: not one matmul
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=True)
    assert fuse_projections(parent) == {"fused": [], "skipped": {"gate_proj/up_proj": "some with a bias, some without"}}


def test_the_worker_fails_a_fused_candidate_with_nothing_to_fuse(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from autotune.fuse import NothingToFuse
    from autotune.worker import _load

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(NothingToFuse, match="nothing to fuse in GPT2LMHeadModel"):
        _load(torch, str(tmp_path), _cfg(True))
    assert _load(torch, str(tmp_path), _cfg(False))[0] is not None


def test_groups_in_reads_a_checkpoints_tensor_names():
    names = [f"model.layers.{i}.{part}.weight" for i in range(2) for part in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert groups_in(names) == 4
    assert groups_in([n for n in names if "v_proj" not in n]) == 2, "q/k without v is no group"
    assert groups_in(["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]) == 0
    assert groups_in([]) is None
    assert ("q_proj", "k_proj", "v_proj") in GROUPS


def test_the_config_key_is_a_boolean_and_named_in_the_label():
    c = parse_config({"from_pretrained": {"dtype": "bfloat16"}, "generate": {"cache_implementation": "static"},
                      "runtime": {"decode_loop": "sync-free", "fuse_projections": True}})
    assert c.fuse_projections is True and c.label().endswith("sync-free-loop fused-projections")
    assert parse_config({"from_pretrained": {}, "generate": {}, "runtime": {"fuse_projections": False}}).fuse_projections is False
    with pytest.raises(ConfigError, match="runtime.fuse_projections"):
        parse_config({"from_pretrained": {}, "generate": {}, "runtime": {"fuse_projections": "yes please"}})


def test_a_part_still_shows_its_rows_of_weight_and_bias():
    parent, lin = _qkv()
    want = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in lin]
    fuse_projections(parent)
    for name, (w, b) in zip(("q_proj", "k_proj", "v_proj"), want):
        part = getattr(parent, name)
        assert torch.equal(part.weight, w) and torch.equal(part.bias, b)
    assert [n for n, _ in parent.named_parameters()] == ["fused_q_proj_k_proj_v_proj.weight", "fused_q_proj_k_proj_v_proj.bias"]


@pytest.mark.parametrize("arch, groups", [
    ("Qwen2", 4),      # q/k/v with biases
    ("Qwen3", 4),      # q_norm / k_norm after the projections
    ("Gemma2", 4),     # softcapping, its own MLP activation
    ("OPT", 2),        # q/k/v with biases, no gate/up
    ("Qwen2Moe", 4),   # attention and the shared expert's gate/up
    ("Phi3", 0),       # ships qkv_proj and gate_up_proj fused already
])
def test_other_architectures_give_the_same_logits(arch, groups):
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    extra = {"Qwen2": dict(intermediate_size=128, num_key_value_heads=2), "Qwen3": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
             "Gemma2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16), "OPT": dict(ffn_dim=128, word_embed_proj_dim=64),
             "Qwen2Moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_key_value_heads=2, num_experts=4),
             "Phi3": dict(intermediate_size=128, num_key_value_heads=2, pad_token_id=0)}[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, f"{arch}Config")(**kw, **extra)).eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.inference_mode():
        want = model(ids, attention_mask=mask).logits
        assert len(fuse_projections(model)["fused"]) == groups
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)


# ---- torchao: each group quantized whole, from the checkpoint's unquantized weights

def _torchao(kind="Int8WeightOnlyConfig", data=None, fuse=True, dtype="float32"):
    q = {"quant_method": "torchao", "quant_type": {"default": {"_type": kind, "_version": 2, "_data": data or {}}}}
    return {"from_pretrained": {"dtype": dtype, "device_map": "cpu", "quantization_config": q}, "generate": {}, "runtime": {"fuse_projections": fuse}}


def assert_parts_hold_their_rows(plain, fused):
    """Every fused q/k/v and gate/up part of ``fused`` holds, bit for bit, the quantized data its
    projection has in ``plain`` (the same checkpoint loaded unfused)."""
    from autotune.fuse import _same_quantized

    for i, (a, b) in enumerate(zip(plain.model.layers, fused.model.layers)):
        for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for n in names:
                part, alone = getattr(getattr(b, parent), n).weight, getattr(getattr(a, parent), n).weight.detach()
                assert _same_quantized(part, alone), f"layer {i} {n}: the fused rows are what quantizing it alone gave"


def test_torchao_groups_are_quantized_whole_and_hold_each_parts_quantized_rows(llama32):
    pytest.importorskip("torchao")
    from autotune.fuse import _same_quantized

    plain, fused = load(llama32, _torchao(fuse=False)), load(llama32, _torchao())
    for b in fused.model.layers:
        whole = b.self_attn.fused_q_proj_k_proj_v_proj.weight
        assert type(whole).__name__ == "Int8Tensor" and tuple(whole.shape) == (64 + 2 * 32, 64), "quantized once, as one weight"
    assert_parts_hold_their_rows(plain, fused)
    assert not _same_quantized(fused.model.layers[0].mlp.gate_proj.weight, plain.model.layers[0].mlp.up_proj.weight.detach()), "the check can fail"
    assert sum(type(m).__name__ == "FusedLinear" for m in fused.modules()) == 4
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        assert torch.equal(fused.generate(ids, **kw), plain.generate(ids, **kw))


def test_a_torchao_scale_shared_across_rows_leaves_the_groups_as_loaded(llama32, caplog):
    pytest.importorskip("torchao")
    per_tensor = {"granularity": {"_type": "PerTensor", "_version": 1, "_data": {}}}
    with caplog.at_level(logging.WARNING, logger="autotune"):
        m = load(llama32, _torchao("Float8WeightOnlyConfig", per_tensor))
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert any("nothing fused" in r.getMessage() and "a scale shared across rows" in r.getMessage() for r in caplog.records)
    per_row = load(llama32, _torchao("Float8WeightOnlyConfig"))  # the default granularity: one scale a row
    assert type(per_row.model.layers[0].self_attn.q_proj).__name__ == "FusedPart"


def test_torchao_groups_without_the_unquantized_checkpoint_are_left_as_loaded(llama32, tmp_path):
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    from autotune.fuse import NothingToFuse
    from autotune.worker import _failure

    m = load(llama32, _torchao(fuse=False))
    m.save_pretrained(tmp_path / "saved-quantized")  # torchao's tensors in the safetensors
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved-quantized", device_map="cpu")
    report = fuse_projections(again)
    assert report["fused"] == [] and set(report["skipped"].values()) == {
        "the checkpoint holds torchao's quantized weights, not the unquantized ones to fuse and quantize"}
    # and `autotune check` says so before anything loads (rule FUSE-SAVED-QUANTIZED reads config.json)
    from autotune.gate import check

    fused_cfg = {"from_pretrained": {"dtype": "bfloat16"}, "generate": {}, "runtime": {"fuse_projections": True}}
    said = [f["rule"] for f in check(fused_cfg, target="h100", model=tmp_path / "saved-quantized")["findings"]]
    assert "FUSE-SAVED-QUANTIZED" in said and "FUSE-SAVED-QUANTIZED" not in [
        f["rule"] for f in check(fused_cfg, target="h100", model=llama32)["findings"]]
    m.name_or_path = str(tmp_path / "gone")
    assert set(fuse_projections(m)["skipped"].values()) == {f"no local checkpoint folder for {tmp_path / 'gone'} to read the unquantized weights from"}
    # the worker's strict load: not this candidate's to run, said as such in its result
    with pytest.raises(NothingToFuse) as e:
        from autotune.config import apply_model_transforms

        apply_model_transforms(again, _torchao(), strict=True)
    assert _failure(e.value, 300)["not_applicable"] is True and "not_applicable" not in _failure(RuntimeError("x"), 300)


def test_the_cpu_stand_in_multiplies_as_torchs_own_int4_kernel(tinygemm_on_cpu):
    """The fixture's matmul against torch's CPU int4 kernel, which reads the same per-group
    scales and zeros, on one weight quantized by torchao: the same product."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 512, bias=False, dtype=torch.bfloat16)
    exact = lin.weight.detach().clone()
    quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    w, x = lin.weight, torch.randn(3, 2048, dtype=torch.bfloat16)
    rows = w.qdata.contiguous().view(torch.uint8).reshape(512, -1)
    values = torch.stack([(rows >> 4) & 0xF, rows & 0xF], dim=-1).reshape(512, -1).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 8)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, w.scale_and_zero)
    assert torch.equal(lin(x), theirs)
    error = float((theirs.float() - x.float() @ exact.float().t()).norm() / (x.float() @ exact.float().t()).norm())
    assert 0.03 < error < 0.1, error  # 4-bit steps over a group's range: about 1/15 of a uniform weight's spread


def test_int4_tile_packed_groups_fuse_with_each_parts_quantized_rows(tmp_path, tinygemm_on_cpu):
    """int4 weight-only (group 128, per-group scales and zeros within each row) fused as the
    tune loads it: every group is quantized whole, each part's slice holds its quantized
    rows, and the model decodes the same tokens."""
    from autotune.fuse import _same_quantized
    from autotune.space import TORCHAO_KINDS

    folder = save_tiny_llama(tmp_path / "m", dtype="bfloat16", hidden_size=256, intermediate_size=512, num_attention_heads=8)
    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS["torchao-int4wo"]}}

    def cfg(fuse):
        return {"from_pretrained": {"dtype": "bfloat16", "device_map": "cpu", "quantization_config": q}, "generate": {},
                "runtime": {"fuse_projections": fuse}}

    plain, fused = load(folder, cfg(False)), load(folder, cfg(True))
    whole = fused.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj.weight
    assert type(whole).__name__ == "Int4TilePackedTo4dTensor" and tuple(whole.shape) == (256 + 2 * 64, 256)
    assert sum(type(m).__name__ == "FusedLinear" for m in fused.modules()) == 2 * 2
    assert_parts_hold_their_rows(plain, fused)
    assert not _same_quantized(fused.model.layers[0].self_attn.k_proj.weight, plain.model.layers[0].self_attn.v_proj.weight.detach())
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        la, lb = plain(ids).logits.float(), fused(ids).logits.float()
        assert (la - lb).abs().max() <= 1e-2 * la.abs().max(), float((la - lb).abs().max())
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        assert torch.equal(fused.generate(ids, **kw), plain.generate(ids, **kw))


def test_int4_groups_whose_rows_are_not_whole_tiles_are_left_as_loaded(tmp_path, tinygemm_on_cpu):
    """tinygemm packs 8 rows a tile and pads a weight's rows to a multiple of 8: a part of 20
    rows alone is padded to 24, and the fused weight's tiles straddle the parts, so no slice of
    it is that part's quantized data. The check says so and the group stays as loaded."""
    from autotune.space import TORCHAO_KINDS

    # 2 key/value heads of 10: k_proj and v_proj have 20 rows each (q_proj 80)
    folder = save_tiny_llama(tmp_path / "m", dtype="bfloat16", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=10)
    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS["torchao-int4wo"]}}
    m = load(folder, {"from_pretrained": {"dtype": "bfloat16", "device_map": "cpu", "quantization_config": q}, "generate": {}, "runtime": {}})
    report = fuse_projections(m)
    assert report["fused"] == ["model.layers.0.mlp.gate_proj/up_proj", "model.layers.1.mlp.gate_proj/up_proj"], report
    assert set(report["skipped"]) == {"model.layers.0.self_attn.q_proj/k_proj/v_proj", "model.layers.1.self_attn.q_proj/k_proj/v_proj"}
    assert all("rows are not what quantizing it alone gave" in r for r in report["skipped"].values()), report["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present() or not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", ["torchao-int8wo", "torchao-int4wo", "torchao-float8dq"])
def test_gpu_torchao_kinds_fuse_with_the_parts_rows_and_their_outputs(tmp_path_factory, kind):
    """The tune's torchao kinds on the GPU (int4's tile-packed layout is CUDA only), fused as
    the tune loads them: every group fuses, each part's quantized rows are the unfused model's,
    and the outputs agree (the kernels see other matrix shapes, so not bit for bit)."""
    pytest.importorskip("torchao")
    if kind == "torchao-float8dq" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm89+")
    from autotune.space import TORCHAO_KINDS

    folder = save_tiny_llama(tmp_path_factory.mktemp("ao-gpu"), dtype="bfloat16", hidden_size=256, intermediate_size=512, vocab_size=512)
    q = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS[kind]}}

    def cfg(fuse):
        return {"from_pretrained": {"dtype": "bfloat16", "device_map": {"": 0}, "quantization_config": q}, "generate": {},
                "runtime": {"fuse_projections": fuse}}

    plain, fused = load(folder, cfg(False)), load(folder, cfg(True))
    assert sum(type(m).__name__ == "FusedLinear" for m in fused.modules()) == 2 * 2
    assert_parts_hold_their_rows(plain, fused)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        la, lb = plain(ids).logits.float(), fused(ids).logits.float()
    assert (la - lb).abs().max() <= 0.02 * la.abs().max(), float((la - lb).abs().max())
