"""Real prompts (--prompts FILE) and prompt-lookup decoding, the option whose speed depends on the
text: reading and tokenizing the file, the search's stage in both regimes (fake runners), the
rules, a candidate's process timing it (its clock counts each verified chunk), autotune.load,
and a real tune of a model trained here on held-out text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autotune import prompts as prompts_mod
from autotune.config import ConfigError, Workload, parse_config
from autotune.errors import UserError
from autotune.profiles import load_target
from autotune.search import PROMPT_LOOKUP_TOKENS
from autotune.tuner import Tuner

from .conftest import run_cli, save_tiny_llama
from .test_search import DYNAMIC, RegimeRunner, key

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------------- the file
@pytest.mark.parametrize("name, body, want", [
    ("p.txt", "first prompt\n\n  second prompt  \n", ["first prompt", "  second prompt  "]),
    ("p.jsonl", '"def f():\\n    return 1"\n\n{"prompt": "two"}\n{"text": "three", "id": 3}\n', ["def f():\n    return 1", "two", "three"]),
    ("p.json", '["a", {"prompt": "b\\nc"}]', ["a", "b\nc"]),
])
def test_prompt_files_in_each_format(tmp_path, name, body, want):
    (tmp_path / name).write_text(body, encoding="utf-8")
    assert prompts_mod.read_texts(tmp_path / name) == want


@pytest.mark.parametrize("name, body, says", [
    ("missing.txt", None, "--prompts file not found"),
    ("p.json", '["a", ', "p.json: not valid JSON (line 1"),
    ("p.jsonl", '"ok"\n{"prompt": \n', "--prompts: p.jsonl line 2 is not valid JSON"),
    ("p.jsonl", '"ok"\n{"question": "no prompt key"}\n', "--prompts: p.jsonl line 2: expected a prompt"),
    ("p.json", '{"prompt": "a"}', "--prompts: p.json must hold a JSON list of prompts"),
    ("p.json", '["a", 3]', "--prompts: p.json item 2: expected a prompt"),
    ("p.txt", "\n  \n", "--prompts: p.txt holds no prompt"),
])
def test_bad_prompt_files_are_one_line(tmp_path, name, body, says):
    if body is not None:
        (tmp_path / name).write_text(body, encoding="utf-8")
    with pytest.raises(UserError) as e:
        prompts_mod.read_texts(tmp_path / name)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer beside it (trained on a few stdlib files)."""
    from autotune import textmodel

    folder = tmp_path_factory.mktemp("llama-tok")
    train, _ = textmodel.corpus_files(40)
    tok = textmodel.train_tokenizer(train, 300)
    tok.save_pretrained(folder)
    return save_tiny_llama(folder, vocab_size=len(tok))


def test_prompts_are_tokenized_with_the_models_tokenizer_and_cut_to_their_last_tokens(llama_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    texts = ["import os\nprint(os.getcwd())\n" * 6, "x = 1"]
    (tmp_path / "p.json").write_text(json.dumps(texts), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(llama_with_tokenizer)
    full = [tok(t)["input_ids"] for t in texts]
    p = prompts_mod.load(tmp_path / "p.json", llama_with_tokenizer, prompt_len=10)
    assert p.ids == (tuple(full[0][-10:]), tuple(full[1][-10:])) and p.truncated == 1 and p.longest == 10
    assert p.describe().startswith("p.json: 2 prompts, sha256:") and any("cut to their last 10" in n for n in p.notes())
    many = prompts_mod.load(tmp_path / "p.json", llama_with_tokenizer, limit=1)
    assert len(many.ids) == 1 and many.total == 2 and any("first 1 of the 2" in n for n in many.notes())
    assert p.digest != prompts_mod.load(tmp_path / "p.json", llama_with_tokenizer, prompt_len=9).digest


def test_a_model_without_a_tokenizer_is_one_line(tiny_llama, tmp_path):
    (tmp_path / "p.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        prompts_mod.load(tmp_path / "p.txt", tiny_llama)
    assert "needs the model's tokenizer" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra, says", [
    ([], "--prompts needs the model's tokenizer"),
    (["--target", "h100"], "--prompts needs measuring on this machine"),
])
def test_tune_refuses_prompts_it_cannot_use_in_one_line(tiny_llama, tmp_path, extra, says):
    (tmp_path / "p.txt").write_text("hello\n", encoding="utf-8")
    r = run_cli("tune", str(tiny_llama), "--prompts", str(tmp_path / "p.txt"), *extra)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- the config
def test_prompt_lookup_in_the_config_dict():
    c = parse_config({"from_pretrained": {"dtype": "bfloat16"}, "generate": {"prompt_lookup_num_tokens": 10}})
    assert c.prompt_lookup == 10 and c.label() == "bfloat16 default-attn prompt-lookup-10"
    with pytest.raises(ConfigError) as e:
        parse_config({"from_pretrained": {"dtype": "bfloat16"}, "generate": {"prompt_lookup_num_tokens": "ten"}})
    assert str(e.value).startswith("generate.prompt_lookup_num_tokens: expected a whole number >= 1")


def test_load_applies_prompt_lookup_on_a_dynamic_cache_through_assisted_decoding(tiny_llama):
    import autotune
    from autotune import decode

    cfg = {"from_pretrained": {"dtype": "float32", "device_map": "cpu"}, "generate": {"prompt_lookup_num_tokens": 3},
           "runtime": {"decode_loop": "sync-free"}}
    m = autotune.load(tiny_llama, cfg)
    assert m.generation_config.prompt_lookup_num_tokens == 3
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    runs, fell = decode.stats["runs"], decode.stats["fallbacks"]
    out = m.generate(ids, do_sample=False, max_new_tokens=12)
    assert decode.stats["runs"] == runs and decode.stats["fallbacks"] == fell + 1  # no static cache: assisted decoding
    plain = m.generate(ids, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=None, custom_generate=None)
    assert torch.equal(out, plain)


def test_load_applies_the_tunes_prompt_lookup_pick_through_the_loop(tiny_llama):
    """The config the tune picks with --prompts on a GPU (static cache, the loop, prompt lookup):
    autotune.load's model runs it in the loop, with greedy decoding's tokens."""
    import autotune
    from autotune import decode

    cfg = {"from_pretrained": {"dtype": "float32", "device_map": "cpu"},
           "generate": {"cache_implementation": "static", "prompt_lookup_num_tokens": 10}, "runtime": {"decode_loop": "sync-free"}}
    m = autotune.load(tiny_llama, cfg)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    runs = decode.stats["runs"]
    out = m.generate(ids, do_sample=False, max_new_tokens=24)
    assert decode.stats["runs"] == runs + 1, decode.stats.get("last_fallback")
    plain = m.generate(ids, do_sample=False, max_new_tokens=24, prompt_lookup_num_tokens=None, custom_generate=None)
    assert torch.equal(out, plain)


def test_the_decode_loop_hands_prompt_lookup_on_a_dynamic_cache_to_assisted_decoding(tiny_llama):
    from transformers import AutoModelForCausalLM

    from autotune import decode

    m = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    fell = decode.stats["fallbacks"]
    got = m.generate(ids, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3, custom_generate=decode.generate)
    assert decode.stats["fallbacks"] == fell + 1 and "static cache" in decode.stats["last_fallback"]
    assert torch.equal(got, m.generate(ids, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3))
    # on the static cache the loop runs it itself (tests/test_decode.py checks its tokens and forwards)
    runs = decode.stats["runs"]
    same = m.generate(ids, do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3, cache_implementation="static",
                      custom_generate=decode.generate)
    assert decode.stats["runs"] == runs + 1 and torch.equal(same, got)


# ---------------------------------------------------------------------------- a candidate's process
def test_prompt_batches_are_left_padded_to_one_shape_and_filled_in_turn():
    from autotune.worker import prompt_batches

    b = prompt_batches(torch, [[1, 2, 3], [4, 5], [6]], {"batch_size": 2, "prompt_len": 4}, "cpu")
    assert len(b) == 2
    assert b[0][0].tolist() == [[0, 1, 2, 3], [0, 0, 4, 5]] and b[0][1].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert b[1][0].tolist() == [[0, 0, 0, 6], [0, 1, 2, 3]]  # the last batch is filled from the first prompt again


def _lookup_candidate(model, out, generate, runtime=None):
    """A prompt-lookup candidate's process on the CPU (N = 4), timed on two repeating prompts."""
    from autotune.worker import run_candidate

    cfg = {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa", "device_map": "cpu"},
           "generate": {"prompt_lookup_num_tokens": 4, **generate}, "runtime": runtime or {}}
    prompt = [[7, 8, 9, 10, 11] * 4, [30, 31, 32] * 5]
    spec = {"model": str(model), "label": "lookup", "config": cfg, "reps": 2, "min_reps": 2, "quality_steps": 2, "seed": 0,
            "prompt_ids": prompt, "workload": {"batch_size": 1, "prompt_len": 20, "new_tokens": 16, "padding": False, "task": "generate"}}
    res = run_candidate(spec, str(out))
    assert res["status"] == "ok", res.get("error")
    return res


def test_a_prompt_lookup_candidate_is_timed_per_verified_chunk_on_the_prompts(tiny_llama, tmp_path):
    res = _lookup_candidate(tiny_llama, tmp_path, {})
    pl = res["prompt_lookup"]
    assert pl["num_tokens"] == 4 and pl["prompts"] == "real" and len(pl["forwards"]) == 2  # one generate per prompt
    assert all(16 / 5 <= f <= 16 for f in pl["forwards"])  # each forward yields 1 to N+1 tokens
    assert pl["tokens_per_forward"] == pytest.approx(32 / sum(pl["forwards"]), abs=1e-3)
    assert pl["tokens_equal"] is True and pl["of"] == 16  # greedy: the tokens plain decoding gives
    assert res["decode_tok_s"] > 0 and "itl_p50_s" not in res  # chunks, not tokens, are clocked
    assert res["logits_finite"] and (tmp_path / "logits.pt").is_file()


def test_a_prompt_lookup_candidate_with_the_sync_free_loop_counts_its_own_forwards(tiny_llama, tmp_path):
    res = _lookup_candidate(tiny_llama, tmp_path, {"cache_implementation": "static"}, {"decode_loop": "sync-free"})
    pl = res["prompt_lookup"]
    assert pl["num_tokens"] == 4 and pl["prompts"] == "real" and len(pl["forwards"]) == 2
    assert all(16 / 5 <= f <= 16 for f in pl["forwards"])  # the loop's own count: 1 to N+1 tokens a forward
    assert pl["tokens_equal"] is True and pl["of"] == 16 and "uncompiled" in pl["against"]  # the loop's token check
    assert res["decode_loop"]["tokens_equal"] is True
    assert res["logits_finite"] and (tmp_path / "logits.pt").is_file()


# ---------------------------------------------------------------------------- the search
LOOKUP_GAIN = {2: 1.3, 10: 1.6}  # this fake's gain of each prompt_lookup_num_tokens over the same config without it


class LookupRunner(RegimeRunner):
    def speed(self, cfg: dict[str, Any]) -> float:
        n = (cfg.get("generate") or {}).get("prompt_lookup_num_tokens")
        return super().speed(cfg) * (LOOKUP_GAIN[n] if n else 1.0)


PROMPTS = prompts_mod.Prompts(ids=((5, 6, 7, 8, 5, 6, 7),), source="p.jsonl", total=1, truncated=0)


def tuned(llama, runner, target, *, batch=1, prompts=PROMPTS, **kw):
    w = Workload(batch_size=batch, prompt_len=7, new_tokens=8, prompts=prompts.describe() if prompts else None)
    return Tuner(llama, facts=load_target(target), workload=w, runner=runner, check_capacity=False, prompts=prompts, **kw).run()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), dtype="bfloat16")


def lookups(r):
    return [t for t in r.trials if t.stage == "prompt lookup"]


def test_on_the_cpu_prompt_lookup_extends_the_fastest_dynamic_candidate_and_only_it_sees_the_prompts(llama):
    runner = LookupRunner()
    r = tuned(llama, runner, "cpu")
    found = lookups(r)
    assert sorted(parse_config(t.config).prompt_lookup for t in found) == sorted(PROMPT_LOOKUP_TOKENS)
    measured = [t for t in r.trials if t.stage in ("attention", "dtype") and t.status == "ok"]
    fastest = key(max(measured, key=lambda t: DYNAMIC[key(t.config)]).config)
    assert all(key(t.config) == fastest and not t.config["generate"].get("cache_implementation") for t in found)
    assert parse_config(r.pick.config).prompt_lookup == 10, r.pick.label  # the fake's faster one
    for s in runner.specs:
        looks = bool((s["config"].get("generate") or {}).get("prompt_lookup_num_tokens"))
        assert ("prompt_ids" in s) == looks, s["label"]  # random rows for every other candidate: same speed, any text
    assert r.capacity.get("max_batch_size") in (None, 1)


def test_on_a_gpu_prompt_lookup_is_measured_on_both_caches(llama):
    r = tuned(llama, LookupRunner(), "h100-80gb")
    found = lookups(r)
    assert len(found) == 4 and all(t.status == "ok" for t in found), [(t.label, t.status, t.reason) for t in found]
    dynamic = [t for t in found if not t.config["generate"].get("cache_implementation")]  # transformers' assisted decoding
    looped = [t for t in found if t.config["runtime"].get("decode_loop") == "sync-free"]  # the loop's own, compiled
    assert len(dynamic) == 2 and len(looped) == 2
    compiled = [t.config for t in r.trials if t.status == "ok" and t.config["runtime"].get("decode_loop") == "sync-free" and t not in looped]

    def without(c):
        return {**c, "generate": {k: v for k, v in c["generate"].items() if k != "prompt_lookup_num_tokens"}}

    assert all(without(t.config) == without(looped[0].config) for t in looped)
    assert without(looped[0].config) in compiled  # a measured compiled loop, lookup added
    # the fake's 1.6x of the compiled loop wins; of a launch-bound dynamic-cache run it would not
    assert parse_config(r.pick.config).prompt_lookup == 10 and r.pick.config["runtime"].get("decode_loop") == "sync-free"


def test_the_lookup_candidates_compile_side_by_side_and_are_timed_alone(llama):
    from .test_search import LaunchingRunner

    class Launching(LaunchingRunner, LookupRunner):
        pass

    runner = Launching()
    r = tuned(llama, runner, "h100-80gb")
    names = {t.label for t in lookups(r)}
    ev = [e for e in runner.events if e[1] in names]
    assert {lb for what, lb in ev if what == "launch"} == names, ev  # all four launched (none run the plain way)
    first_release = next(i for i, e in enumerate(ev) if e[0] == "release")
    assert all(i < first_release for i, e in enumerate(ev) if e[0] in ("launch", "warm")), "all warm before any is timed"
    assert [lb for what, lb in ev if what == "release"] == [t.label for t in lookups(r)], "then each is timed in turn"
    assert all(t.status == "ok" for t in lookups(r))


def test_batched_prompt_lookup_is_dropped_by_the_rule(llama):
    r = tuned(llama, LookupRunner(), "cpu", batch=4)
    found = lookups(r)
    assert found and all(t.status == "dropped" and t.reason.startswith("PROMPT-LOOKUP-BATCH") for t in found)


def test_without_prompts_prompt_lookup_is_not_measured_and_the_note_says_how(llama):
    r = tuned(llama, LookupRunner(), "cpu", prompts=None)
    assert not lookups(r)
    assert any("prompt-lookup decoding not measured" in n and "--prompts FILE" in n for n in r.notes)


# ---------------------------------------------------------------------------- for real, on a trained model
@pytest.mark.slow
def test_tune_with_prompts_measures_prompt_lookup_on_a_trained_model(tmp_path_factory):
    """A model trained here on the stdlib's sources, prompts from its held-out files: prompt lookup
    runs, yields more than one token per forward on real code, and keeps greedy's tokens."""
    from autotune import textmodel
    from autotune.tuner import tune

    folder = tmp_path_factory.mktemp("trained")
    textmodel.train(folder, shape=textmodel.TINY, vocab_size=512, seq_len=64, batch_size=16, seconds=8, limit_files=200, lr=2e-3)
    path = folder / "prompts.jsonl"
    textmodel.heldout_prompts(folder, path, count=2, tokens=48)
    r = tune(folder, prompts=path, prompt_len=48, new_tokens=24, reps=2, use_cache=False, report=True)
    found = lookups(r)
    assert len(found) == 2 and all(t.status == "ok" for t in found), [(t.label, t.status, t.reason) for t in found]
    for t in found:
        pl = t.metric("prompt_lookup")
        assert pl["prompts"] == "real" and len(pl["forwards"]) == 2
        assert pl["tokens_per_forward"] > 1.0, pl  # code repeats itself: some proposed tokens are accepted
        assert pl["agree_tokens"] >= 1
    assert r.config["autotune"]["workload"]["prompts"].startswith("prompts.jsonl: 2 prompts")
    assert r.config["autotune"]["workload"]["prompt_len"] == 48


def test_the_static_cache_overrun_that_prompt_lookup_static_cache_overrun_states():
    """On transformers >= 5.24 (CI's informational pass on the newest releases), the failure
    PROMPT-LOOKUP-STATIC-CACHE-OVERRUN cites: if a release fixes it, this fails and the rule goes."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, LlamaConfig

    if Version(transformers.__version__) < Version("5.24"):
        with pytest.raises(ValueError, match="not supported with Static cache"):  # PROMPT-LOOKUP-STATIC-CACHE
            _static_lookup(AutoModelForCausalLM, LlamaConfig)
        return
    with pytest.raises(IndexError, match="out of bounds"):
        _static_lookup(AutoModelForCausalLM, LlamaConfig)


def _static_lookup(auto, llama_config):
    torch.manual_seed(0)
    cfg = llama_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024)
    m = auto.from_config(cfg).eval()
    ids = torch.randint(3, 300, (1, 200))
    ids[0, -6:] = ids[0, :6]
    m.generate(ids, do_sample=False, max_new_tokens=128, prompt_lookup_num_tokens=10, cache_implementation="static")
