"""The sync-free decode loop (autotune/decode.py): the same tokens as transformers' generate for
greedy decoding, its own fallbacks, and how the config dict, autotune.load and a candidate's
process use it. On the CPU the step runs uncompiled; the compiled step is measured on the GPU
(docs/PERFORMANCE.md, issue 12)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from autotune import decode  # noqa: E402
from autotune.config import ConfigError, load, parse_config  # noqa: E402
from tests.conftest import MANY_EOS, decode_batch, decode_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return decode_model()


@pytest.fixture(scope="module")
def batch():
    return decode_batch()

# the stopping cases each loop is checked on: a length, a minimum, EOS stops, EOS after a minimum
LENGTHS = pytest.mark.parametrize("kw", [
    {"max_new_tokens": 40},
    {"max_new_tokens": 40, "min_new_tokens": 20},
    {"max_new_tokens": 60, "eos_token_id": MANY_EOS},
    {"max_new_tokens": 60, "eos_token_id": MANY_EOS, "min_new_tokens": 30},
], ids=["length", "min-new-tokens", "eos", "eos-after-min"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@LENGTHS
@pytest.mark.parametrize("every", [1, 5, 1000])
def test_greedy_tokens_equal_generate(model, batch, attn, kw, every):
    ids, mask = batch
    model.config._attn_implementation = attn
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, **kw)
    plain = model.generate(ids, **common)
    before = decode.stats["runs"]
    fast = model.generate(ids, **common, custom_generate=decode.generate, check_every=every)
    assert decode.stats["runs"] == before + 1  # the loop ran, it did not fall back
    assert fast.shape == plain.shape
    assert torch.equal(fast, plain)


def test_the_eos_case_really_stops_early(model, batch):
    ids, mask = batch
    out = model.generate(ids, attention_mask=mask, cache_implementation="static", do_sample=False, max_new_tokens=60,
                         eos_token_id=MANY_EOS, custom_generate=decode.generate)
    assert out.shape[1] < ids.shape[1] + 60  # every row met an EOS: the length is the last row's first EOS
    rows_hit = [any(int(t) in MANY_EOS for t in row[ids.shape[1]:]) for row in out]
    assert all(rows_hit)


def test_sampling_with_top_k_1_is_greedy(model, batch):
    ids, mask = batch
    common = dict(attention_mask=mask, cache_implementation="static", max_new_tokens=20)
    greedy = model.generate(ids, do_sample=False, **common)
    sampled = model.generate(ids, do_sample=True, top_k=1, temperature=0.7, **common, custom_generate=decode.generate)
    assert torch.equal(sampled, greedy)


def test_sampling_follows_the_distribution(model):
    # one step from a fixed prompt, many rows: the sampled tokens' frequencies follow softmax(logits / T)
    ids = torch.full((4000, 4), 42)
    torch.manual_seed(3)
    out = model.generate(ids, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, max_new_tokens=1, cache_implementation="static",
                         custom_generate=decode.generate)
    with torch.no_grad():
        p = torch.softmax(model(ids[:1]).logits[0, -1] / 2.0, dim=-1)
    top = int(p.argmax())
    freq = (out[:, -1] == top).float().mean().item()
    assert abs(freq - p[top].item()) < 4 * (p[top].item() * (1 - p[top].item()) / 4000) ** 0.5 + 1e-3


def test_unsupported_calls_run_transformers_loop(model, batch):
    ids, mask = batch
    common = dict(attention_mask=mask, do_sample=False, max_new_tokens=8)
    fell = decode.stats["fallbacks"]
    dyn = model.generate(ids, **common, custom_generate=decode.generate)  # dynamic cache: not the loop's
    assert decode.stats["fallbacks"] == fell + 1 and "static cache" in decode.stats["last_fallback"]
    assert torch.equal(dyn, model.generate(ids, **common))
    rep = model.generate(ids, **common, cache_implementation="static", repetition_penalty=1.3, custom_generate=decode.generate)
    assert "RepetitionPenalty" in decode.stats["last_fallback"]
    assert torch.equal(rep, model.generate(ids, **common, cache_implementation="static", repetition_penalty=1.3))


class _Collect:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.got = []

    def put(self, value):
        self.got.append(value)

    def end(self):
        pass


def test_config_names_the_loop_and_load_applies_it(tiny_llama, batch):
    cfg = {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa", "device_map": "cpu"},
           "generate": {"cache_implementation": "static"}, "runtime": {"decode_loop": "sync-free"}}
    assert parse_config(cfg).decode_loop == "sync-free"
    assert "sync-free-loop" in parse_config(cfg).label()
    m = load(tiny_llama, cfg)
    ids = torch.randint(3, 256, (2, 10))
    runs = decode.stats["runs"]
    out = m.generate(ids, do_sample=False, max_new_tokens=12)
    assert decode.stats["runs"] == runs + 1
    plain = m.generate(ids, do_sample=False, max_new_tokens=12, custom_generate=None)  # transformers' own, for one call
    assert decode.stats["runs"] == runs + 1
    assert torch.equal(out, plain)
    # transformers hands a callable custom_generate no streamer (5.17): a call with one keeps its loop
    streamer = _Collect()
    m.generate(ids[:1], do_sample=False, max_new_tokens=4, streamer=streamer)
    assert decode.stats["runs"] == runs + 1 and len(streamer.got) == 5  # the prompt, then each token
    json.dumps(cfg)  # plain JSON


@pytest.mark.parametrize("bad, says", [
    ({"runtime": {"decode_loop": "fast"}}, "runtime.decode_loop: unknown loop 'fast'"),
    ({"generate": {"compile_config": {"mode": "turbo"}}}, "generate.compile_config.mode: unknown mode 'turbo'"),
    ({"generate": {"compile_config": {"speed": 1}}}, "generate.compile_config: expected an object of transformers' CompileConfig fields"),
    ({"generate": {"compile_config": {"fullgraph": "yes"}}}, "generate.compile_config.fullgraph: expected true or false"),
    # transformers' own generate hands torch.compile CompileConfig's mode with the options: refused there
    ({"generate": {"compile_config": {"options": {"coordinate_descent_tuning": True}}}}, "generate.compile_config.options: only with runtime.decode_loop"),
    ({"generate": {"compile_config": {"mode": "max-autotune", "options": {"coordinate_descent_tuning": True}}}, "runtime": {"decode_loop": "sync-free"}},
     "generate.compile_config: give mode or options, not both"),
    ({"generate": {"compile_config": {"options": ["freezing"]}}, "runtime": {"decode_loop": "sync-free"}},
     "generate.compile_config.options: expected an object of inductor options"),
])
def test_bad_loop_and_compile_config_are_one_line(bad, says):
    cfg = {"from_pretrained": {"dtype": "bfloat16"}, **bad}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_compile_mode_is_in_the_label_and_reaches_compile_config(tiny_llama):
    from autotune.config import generate_kwargs

    cfg = {"from_pretrained": {"dtype": "bfloat16"}, "generate": {"cache_implementation": "static", "compile_config": {"mode": "max-autotune"}}}
    assert parse_config(cfg).label() == "bfloat16 default-attn static-cache+compile(max-autotune)"
    cc = generate_kwargs(cfg)["compile_config"]
    assert type(cc).__name__ == "CompileConfig" and cc.mode == "max-autotune"


@pytest.mark.parametrize("options, own, passed", [
    ({"coordinate_descent_tuning": True, "triton.cudagraphs": True}, True, {"coordinate_descent_tuning": True, "triton.cudagraphs": False}),
    ({"coordinate_descent_tuning": True}, False, {"coordinate_descent_tuning": True}),  # no CUDA graphs asked for: none
])
def test_compile_options_reach_torch_compile_through_the_loop(monkeypatch, options, own, passed):
    """With the loop, compile_config.options go to torch.compile without the mode (it takes one of
    the two); CUDA graphs asked for in them are the loop's own."""
    from types import SimpleNamespace

    from transformers import CompileConfig, GenerationConfig

    cfg = {"from_pretrained": {"dtype": "bfloat16"}, "generate": {"cache_implementation": "static", "compile_config": {"options": options}},
           "runtime": {"decode_loop": "sync-free"}}
    parse_config(cfg)  # accepted with the loop
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    monkeypatch.setattr(decode, "_compiled", {})
    gc = GenerationConfig(compile_config=CompileConfig(options=dict(options)))
    step, is_own = decode._step_fn(object(), {"do_sample": False}, gc, SimpleNamespace(type="cuda"), graph_steps=1)
    assert is_own is own and seen["options"] == passed and "mode" not in seen and seen["dynamic"] is False


def test_a_candidate_process_times_the_loop_and_checks_its_tokens(tiny_llama, tmp_path):
    from autotune.worker import run_candidate

    cfg = {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa", "device_map": "cpu"},
           "generate": {"cache_implementation": "static", "disable_compile": True}, "runtime": {"decode_loop": "sync-free"}}
    spec = {"model": str(tiny_llama), "label": "loop", "config": cfg, "reps": 2, "min_reps": 2, "quality_steps": 2, "seed": 0,
            "workload": {"batch_size": 2, "prompt_len": 16, "new_tokens": 12, "padding": True, "task": "generate"}}
    res = run_candidate(spec, str(tmp_path))
    assert res["status"] == "ok", res.get("error")
    assert res["decode_tok_s"] > 0 and res["ttft_s"] > 0
    assert "itl_p50_s" not in res  # tokens are not clocked one by one in the loop
    assert res["decode_loop"]["tokens_equal"] is True and res["decode_loop"]["agree_tokens"] == 12
    assert res["decode_loop"]["timed_equal_warmup"] is True  # the timed runs decoded what was checked
    assert res["decode_loop"]["runs"] >= 1 + len(res["runs"])  # counted after the timed runs, not at the check
    assert (tmp_path / "logits.pt").is_file()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("min_new", [0, 10], ids=["no-minimum", "eos-masked"])
def test_forced_logits_through_the_loop_equal_transformers_loop(model, batch, attn, min_new):
    """A loop candidate's quality logits come from the loop's own step (the graph that is timed),
    fed forced tokens: the same logits transformers' loop records through a logits processor,
    EOS masked below the minimum length, padded rows included, and the loop stops after them."""
    from transformers import LogitsProcessorList

    from autotune.worker import _ForceTokens

    ids, mask = batch
    model.config._attn_implementation = attn
    steps, n_new = 6, 10
    forced = torch.randint(30, 300, (ids.shape[0], n_new), generator=torch.Generator().manual_seed(2))
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, max_new_tokens=n_new, min_new_tokens=min_new)
    proc = _ForceTokens(torch, forced, keep=steps)
    model.generate(ids, **common, logits_processor=LogitsProcessorList([proc]))
    want = torch.stack(proc.logits, dim=1)
    got: list = []
    runs = decode.stats["runs"]
    out = model.generate(ids, **common, custom_generate=decode.generate, forced_tokens=forced[:, :steps], logits_out=got)
    assert decode.stats["runs"] == runs + 1 and len(got) == steps
    assert torch.equal(out[:, ids.shape[1]:], forced[:, :steps])  # the forced tokens were fed, not the chosen ones
    got = torch.stack(got, dim=1)
    masked = torch.isinf(want)
    assert torch.equal(torch.isinf(got), masked) and bool(masked.any()) == (min_new > 0)
    assert torch.allclose(got[~masked], want[~masked], atol=1e-5, rtol=1e-5)


def test_a_loop_candidates_quality_logits_come_from_the_loop(tiny_llama, tmp_path, monkeypatch):
    """In a candidate's process the loop serves the quality pass too: transformers' own loop on
    the compiled static cache would compile the forward again after the timed runs."""
    from autotune import worker

    cfg = {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa", "device_map": "cpu"},
           "generate": {"cache_implementation": "static", "disable_compile": True}, "runtime": {"decode_loop": "sync-free"}}
    spec = {"model": str(tiny_llama), "label": "loop", "config": cfg, "reps": 2, "min_reps": 2, "quality_steps": 3, "seed": 0,
            "workload": {"batch_size": 2, "prompt_len": 16, "new_tokens": 12, "padding": True, "task": "generate"}}
    seen = []
    monkeypatch.setattr(worker, "_ForceTokens", lambda *a, **k: seen.append("transformers' loop") or (_ for _ in ()).throw(AssertionError))
    res = worker.run_candidate(spec, str(tmp_path))
    assert res["status"] == "ok", res.get("error")
    assert not seen
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.shape == (2, 3, 256)
    monkeypatch.undo()  # transformers' loop for the same candidate without the decode loop
    plain = dict(spec, config={**cfg, "runtime": {}})
    (tmp_path / "plain").mkdir()
    assert worker.run_candidate(plain, str(tmp_path / "plain"))["status"] == "ok"
    ref = torch.load(tmp_path / "plain" / "logits.pt")
    assert torch.allclose(logits.float(), ref.float(), atol=2e-3)  # both saved in float16


@pytest.mark.parametrize("own", [False, True], ids=["compile-graphs", "own-graphs"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch-1", "left-padded"])
def test_the_compiled_step_is_traced_once(model, batch, padded, own, monkeypatch):
    """Every step, the first included, the loop's own graph captures, a second call and a
    quality probe after the timed generates hand the compiled step inputs it was traced for:
    with dynamic=False a stride that differs (the prompt's position slice) compiled the step a
    second time on the GPU (58-62 s against transformers' 32 s in the H100 tune), and a guard
    that fails inside a capture (copies of the EOS ids that the first call aliased) invalidates
    the capture. Traced with the eager backend here: no inductor compile on the CPU."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(decode._step, backend="eager", dynamic=False)
    monkeypatch.setattr(decode, "_step_fn", lambda *a, **k: (compiled, own))
    monkeypatch.setattr(decode._Graphs, "_capture", staticmethod(lambda torch, fn: fn))
    monkeypatch.setattr(decode, "_graph_sets", {})
    ids, mask = batch
    if not padded:
        ids, mask = ids[:1], mask[:1]
    model.config._attn_implementation = "sdpa"
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, max_new_tokens=12, eos_token_id=MANY_EOS)
    plain = model.generate(ids, **common)
    for _ in range(2):
        fast = model.generate(ids, **common, custom_generate=decode.generate, graph_steps=4)
        assert torch.equal(fast, plain)
    forced = torch.randint(30, 300, (ids.shape[0], 12), generator=torch.Generator().manual_seed(3))
    model.generate(ids, **common, custom_generate=decode.generate, forced_tokens=forced, logits_out=[])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["recompiles"]) or dict(counters["stats"])
    torch._dynamo.reset()


@pytest.fixture
def replayed(monkeypatch):
    """The loop's own CUDA graphs on the CPU: the step uncompiled, and a "graph" that replays by
    calling the captured function (the loop's state handling, blocks, remainder and EOS checks are
    what is under test; torch.cuda.graph itself is exercised on the GPU)."""
    monkeypatch.setattr(decode, "_step_fn", lambda *a, fn=None, **k: (fn or decode._step, True))
    monkeypatch.setattr(decode._Graphs, "_capture", staticmethod(lambda torch, fn: fn))
    monkeypatch.setattr(decode, "_graph_sets", {})
    return decode._graph_sets


@LENGTHS
@pytest.mark.parametrize("k,every", [(1, 1), (5, 5), (16, 32), (64, 32)])
def test_the_loops_own_graphs_give_generates_tokens(model, batch, replayed, kw, k, every):
    """k steps a replay and single-step replays for the rest (k=64 > the tokens: all single);
    the second call reuses the captured set, loading its state afresh."""
    ids, mask = batch
    model.config._attn_implementation = "sdpa"
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, **kw)
    plain = model.generate(ids, **common)
    for call in range(2):
        fast = model.generate(ids, **common, custom_generate=decode.generate, graph_steps=k, check_every=every)
        assert fast.shape == plain.shape and torch.equal(fast, plain), call
        assert len(replayed) == 1
    other = {**common, "attention_mask": mask[:, 4:], "max_new_tokens": 9, "min_new_tokens": min(kw.get("min_new_tokens", 0), 5)}  # another prompt and length
    shorter = model.generate(ids[:, 4:], **other)
    assert torch.equal(model.generate(ids[:, 4:], **other, custom_generate=decode.generate, graph_steps=k, check_every=every), shorter)


def test_the_graphs_decode_in_the_cache_they_were_captured_on(model, batch, replayed, monkeypatch):
    """Later calls of the same shape decode in the captured set's own KV cache (reset), not in the
    new StaticCache each generate makes (its memory can land elsewhere: the H200 run captured
    anew on every call); a set is captured again when the parameters moved or the shape changed,
    and one set is kept at a time."""
    from transformers.cache_utils import StaticCache

    ids, mask = batch
    captures, prefilled = [], []
    monkeypatch.setattr(decode._Graphs, "_capture", staticmethod(lambda torch, fn: captures.append(fn) or fn))
    real = type(model)._prefill

    def spy(self, input_ids, generation_config, model_kwargs, **kw):
        prefilled.append(model_kwargs.get("past_key_values", model_kwargs.get("cache")))
        return real(self, input_ids, generation_config, model_kwargs, **kw)

    monkeypatch.setattr(type(model), "_prefill", spy)
    common = dict(attention_mask=mask, cache_implementation="static", do_sample=False, max_new_tokens=20)
    plain = model.generate(ids, **common)
    prefilled.clear()
    where = iter([("a",), ("a",), ("a",), ("b",), ("b",)])  # capture; calls 2, 3 fit; call 4 finds the weights moved
    monkeypatch.setattr(decode, "_addresses", lambda model: next(where))
    for _ in range(4):
        assert torch.equal(model.generate(ids, **common, custom_generate=decode.generate, graph_steps=8), plain)
    assert len(captures) == 4 and len(replayed) == 1  # two sets of two graphs (8 steps, 1 step)
    assert all(isinstance(c, StaticCache) for c in prefilled)
    assert prefilled[1] is prefilled[0] and prefilled[2] is prefilled[0]  # the set's cache, reset
    assert prefilled[3] is not prefilled[0] and next(iter(replayed.values())).cache is prefilled[3]
    monkeypatch.setattr(decode, "_addresses", lambda model: ("b",))
    one = model.generate(ids[:1], **{**common, "attention_mask": mask[:1]})
    assert torch.equal(model.generate(ids[:1], **{**common, "attention_mask": mask[:1]}, custom_generate=decode.generate, graph_steps=8), one)
    assert len(replayed) == 1 and next(iter(replayed.values())).cache is prefilled[-1] is not prefilled[3]
    decode.release()
    assert not replayed


# ---------------------------------------------------------------------------- prompt lookup in the loop
def _assisted_forwards(model, ids, **kw):
    """transformers' own prompt-lookup decoding (assisted, dynamic cache): its tokens and how many
    forwards it ran."""
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model.generate(ids, **kw)
    finally:
        hook.remove()
    return out, len(calls)


@LENGTHS
@pytest.mark.parametrize("n", [2, 10])
@pytest.mark.parametrize("row", [0, 1, 2])
def test_prompt_lookup_in_the_loop_gives_greedy_tokens_in_assisted_decodings_forwards(model, batch, kw, n, row):
    """One row at a time (assisted decoding's limit), left padding included (rows 1 and 2): the
    loop's tokens are plain greedy decoding's and transformers' prompt lookup's, and it needs the
    same number of forwards as transformers' candidate generator, so its proposals are the same."""
    ids, mask = batch
    x, m = ids[row:row + 1], mask[row:row + 1]
    model.config._attn_implementation = "sdpa"
    common = dict(attention_mask=m, do_sample=False, **kw)
    plain = model.generate(x, cache_implementation="static", **common)
    theirs, forwards = _assisted_forwards(model, x, prompt_lookup_num_tokens=n, **common)
    runs = decode.stats["runs"]
    ours = model.generate(x, cache_implementation="static", prompt_lookup_num_tokens=n, custom_generate=decode.generate, **common)
    assert decode.stats["runs"] == runs + 1  # the loop ran it
    assert torch.equal(ours, plain) and torch.equal(ours, theirs)
    assert decode.stats["last_forwards"] == forwards
    if "eos_token_id" not in kw:  # (an EOS ends a row between two looks at it, as in the plain loop)
        assert decode.stats["last_steps"] <= forwards + 2  # few steps queued past the end


def test_prompt_lookup_in_the_loop_keeps_several_tokens_a_forward_where_the_text_repeats(model):
    """This random model's greedy output falls into repeats (one token many times, then a cycle
    of four): the lookup proposes them and one forward keeps several (the point of the option)."""
    x = torch.tensor([[40, 41, 42, 43, 44, 45] * 4])
    common = dict(do_sample=False, max_new_tokens=48, cache_implementation="static")
    plain = model.generate(x, **common)
    ours = model.generate(x, prompt_lookup_num_tokens=10, custom_generate=decode.generate, **common)
    assert torch.equal(ours, plain)
    new = plain[0, x.shape[1]:].tolist()
    assert len(set(new)) < len(new) / 2  # the premise: the text repeats itself
    assert decode.stats["last_forwards"] <= 0.75 * len(new)


@pytest.mark.parametrize("n", [2, 10])
def test_prompt_lookup_in_the_loops_own_graph_is_captured_once_and_reused(model, batch, replayed, n):
    """With the loop's own CUDA graph (replayed on the CPU by calling the captured function): the
    step is captured once and the second call reuses it and its KV cache; another length
    captures anew."""
    ids, mask = batch
    x, m = ids[1:2], mask[1:2]
    common = dict(attention_mask=m, do_sample=False, max_new_tokens=40, eos_token_id=MANY_EOS, min_new_tokens=20, cache_implementation="static")
    plain = model.generate(x, **common)
    for call in range(2):
        ours = model.generate(x, prompt_lookup_num_tokens=n, custom_generate=decode.generate, **common)
        assert torch.equal(ours, plain), call
        assert len(replayed) == 1
        (held,) = replayed.values()
        assert isinstance(held, decode._LookupSet) and held.replay is not None
        cache = held.cache
    shorter = {**common, "max_new_tokens": 9, "min_new_tokens": 0}
    assert torch.equal(model.generate(x, prompt_lookup_num_tokens=n, custom_generate=decode.generate, **shorter), model.generate(x, **shorter))
    assert len(replayed) == 1 and next(iter(replayed.values())).cache is not cache
    decode.release()


def test_prompt_lookup_the_loop_does_not_run_goes_to_assisted_decoding(model, batch):
    """Sampling and more than one row: transformers' assisted decoding, unchanged (it refuses
    batches itself)."""
    ids, mask = batch
    x, m = ids[:1], mask[:1]
    fell = decode.stats["fallbacks"]
    torch.manual_seed(0)
    got = model.generate(x, attention_mask=m, do_sample=True, top_k=1, max_new_tokens=12, prompt_lookup_num_tokens=3, custom_generate=decode.generate)
    assert decode.stats["fallbacks"] == fell + 1 and "sampling" in decode.stats["last_fallback"]
    assert torch.equal(got, model.generate(x, attention_mask=m, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3))
    with pytest.raises(ValueError, match="batch_size = 1"):
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3, custom_generate=decode.generate)
    assert "batch size > 1" in decode.stats["last_fallback"]
