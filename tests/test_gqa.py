"""SDPA's own grouped-query attention (autotune.gqa, runtime.sdpa_gqa): transformers' results
without its repeat_kv copies, and a clear refusal where there is nothing grouped to change."""

from __future__ import annotations

import logging

import pytest

from autotune.config import ConfigError, load, parse_config
from autotune.gqa import NAME, NotGrouped

from .conftest import save_tiny_llama

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):  # 4 query heads share 2 key/value heads
    return save_tiny_llama(tmp_path_factory.mktemp("gqa"), dtype="float32")


def _cfg(gqa=True, attn="sdpa", **rt):
    return {"from_pretrained": {"dtype": "float32", "device_map": "cpu", "attn_implementation": attn}, "generate": {},
            "runtime": {"sdpa_gqa": gqa, **rt}}


def test_same_logits_and_tokens_with_enable_gqa_in_every_attention_call(grouped, monkeypatch):
    plain, gqa = load(grouped, _cfg(False)), load(grouped, _cfg(True))
    assert gqa.config._attn_implementation == NAME and plain.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: a mask in the prefill too
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, cache_implementation="static")
    calls = {"gqa": 0, "repeated": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls["gqa" if k.get("enable_gqa") else "repeated"] += 1
        return sdpa(*a, **k)

    with torch.inference_mode():
        want_logits, want = plain(ids, attention_mask=mask).logits, plain.generate(ids, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        got_logits, got = gqa(ids, attention_mask=mask).logits, gqa.generate(ids, **kw)
        from autotune import decode

        looped = gqa.generate(ids, custom_generate=decode.generate, **kw)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, want) and torch.equal(looped, want)
    assert calls["gqa"] > 0 and calls["repeated"] == 0, calls


def test_compiled_it_is_one_graph(grouped):
    m = load(grouped, _cfg(True))
    graphs = []
    torch._dynamo.reset()
    f = torch.compile(m.forward, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)
    with torch.inference_mode():
        f(torch.randint(3, 256, (1, 8)), attention_mask=torch.ones(1, 8, dtype=torch.long))
    assert len(graphs) == 1


def test_nothing_grouped_or_not_sdpa_is_left_as_loaded_and_fails_a_candidate(tmp_path, grouped, caplog):
    from autotune.worker import _load

    mha = save_tiny_llama(tmp_path / "mha", num_key_value_heads=4)
    with caplog.at_level(logging.WARNING, logger="autotune"):
        m = load(mha, _cfg(True))
    assert m.config._attn_implementation == "sdpa"
    assert any("no grouped-query attention" in r.getMessage() for r in caplog.records)
    with pytest.raises(NotGrouped, match="no grouped-query attention"):
        _load(torch, str(mha), _cfg(True))
    with pytest.raises(NotGrouped, match='needs attn_implementation "sdpa"'):
        _load(torch, str(grouped), _cfg(True, attn="eager"))


def test_the_config_key_is_a_boolean_and_named_in_the_label():
    c = parse_config({"from_pretrained": {"dtype": "bfloat16", "attn_implementation": "sdpa"}, "runtime": {"sdpa_gqa": True}})
    assert c.sdpa_gqa is True and c.label() == "bfloat16 sdpa sdpa-gqa"
    with pytest.raises(ConfigError, match="runtime.sdpa_gqa"):
        parse_config({"from_pretrained": {}, "runtime": {"sdpa_gqa": 1.5}})


# (not Gemma2: transformers 5.25 refuses SDPA for it, whose softcapping SDPA cannot apply)
@pytest.mark.parametrize("arch", ["Qwen2", "Qwen3", "Mistral", "Granite", "Starcoder2"])
def test_other_grouped_architectures_give_the_same_logits(arch):
    import transformers

    from autotune.gqa import use

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    extra = {"Qwen3": dict(head_dim=16)}.get(arch, {})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, f"{arch}Config")(**kw, **extra), attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.inference_mode():
        want = model(ids, attention_mask=mask).logits
        assert use(model) == 2
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)


def test_the_screen_takes_the_attention_branch_of_a_compiled_step(grouped, monkeypatch):
    """transformers 5.23+ packs grouped query heads in an uncompiled one-token step (no copies) and
    copies keys and values in a compiled one; the screen times uncompiled steps for compiled runs,
    so under compiled_branches() every version copies, as compiling does."""
    import transformers
    from packaging.version import Version

    from autotune.gqa import compiled_branches

    real = torch.nn.functional.scaled_dot_product_attention
    heads: list[int] = []
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))

    def spy(q, k, v, *a, **kw):
        if q.shape[2] < ids.shape[1]:  # a one-token step (packed, its 2 query heads a head's 2 rows), not the prefill
            heads.append(k.shape[1])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = load(grouped, _cfg(False))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3, min_new_tokens=3, cache_implementation="static",
              disable_compile=True, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)
        plain, heads[:] = list(heads), []
        with compiled_branches():
            model.generate(ids, **kw)
    assert heads and set(heads) == {4}, f"copied to the 4 query heads, as a compiled step does: {heads}"
    packs = Version(transformers.__version__) >= Version("5.23")
    assert plain and set(plain) == ({2} if packs else {4}), (transformers.__version__, plain)
    from transformers.integrations import sdpa_attention

    if hasattr(sdpa_attention, "is_torchdynamo_compiling"):
        assert sdpa_attention.is_torchdynamo_compiling() is False, "restored on leaving"
