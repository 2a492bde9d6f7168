"""The sync-free decode loop on a real GPU (skipped without one): greedy tokens equal to
transformers' generate uncompiled (the same kernels: what is under test is the loop's logic),
and compiled with the loop's own CUDA graph (torch.cuda.CUDAGraph captured for real) against
transformers' own compiled static-cache generate, in float32 so that the compilers' different
fusions cannot flip a near tie. The CPU tests (tests/test_decode.py) fake the capture."""

from __future__ import annotations

import pytest

from tests.conftest import MANY_EOS, decode_batch, decode_model, gpu_present

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_present() or not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

from autotune import decode  # noqa: E402

CASES = pytest.mark.parametrize("kw", [
    {"max_new_tokens": 40},
    {"max_new_tokens": 40, "min_new_tokens": 20},
    {"max_new_tokens": 60, "eos_token_id": MANY_EOS},
], ids=["length", "min-new-tokens", "eos"])


@pytest.fixture(scope="module")
def model():
    return decode_model().cuda()  # float32, as from_config makes it


@pytest.fixture(scope="module")
def batch():
    ids, mask = decode_batch()
    return ids.cuda(), mask.cuda()


@CASES
def test_uncompiled_on_the_gpu_gives_generates_tokens(model, batch, kw):
    ids, mask = batch
    common = dict(attention_mask=mask, cache_implementation="static", disable_compile=True, do_sample=False, **kw)
    plain = model.generate(ids, **common)
    before = decode.stats["runs"]
    fast = model.generate(ids, **common, custom_generate=decode.generate)
    assert decode.stats["runs"] == before + 1
    assert torch.equal(fast, plain)


@CASES
def test_compiled_with_its_own_graph_gives_compiled_generates_tokens(model, batch, kw):
    ids, mask = batch
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, **kw)
    plain = model.generate(ids, **common)
    for call in range(2):  # the second call replays the graph captured by the first
        fast = model.generate(ids, **common, custom_generate=decode.generate, graph_steps=1)
        assert torch.equal(fast, plain), call
    assert len(decode._graph_sets) == 1  # the loop captured a graph of its own
    decode.release()


@CASES
@pytest.mark.parametrize("n", [2, 10])
def test_prompt_lookup_compiled_with_its_own_graph_gives_greedy_tokens(model, batch, kw, n):
    """The loop's prompt lookup, its verifying step compiled and captured for real, one row at a
    time (left padding in rows 1 and 2): the tokens of transformers' compiled generate without
    lookup, and of transformers' own prompt lookup (assisted decoding, dynamic cache, uncompiled)."""
    ids, mask = batch
    for row in range(ids.shape[0]):
        x, m = ids[row:row + 1], mask[row:row + 1]
        common = dict(attention_mask=m, do_sample=False, **kw)
        plain = model.generate(x, cache_implementation="static", **common)
        theirs = model.generate(x, prompt_lookup_num_tokens=n, **common)
        for call in range(2):  # the second call replays the graph the first captured
            runs = decode.stats["runs"]
            ours = model.generate(x, cache_implementation="static", prompt_lookup_num_tokens=n, custom_generate=decode.generate, **common)
            assert decode.stats["runs"] == runs + 1, decode.stats.get("last_fallback")
            assert torch.equal(ours, plain) and torch.equal(ours, theirs), (row, call)
        (held,) = decode._graph_sets.values()
        assert isinstance(held, decode._LookupSet) and held.replay is not None
    decode.release()
