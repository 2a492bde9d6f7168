"""The tuner on the CPU: a tiny random Llama tuned for real, injected faults, the cache, predictions."""

from __future__ import annotations

import json

import pytest

import autotune
from autotune.profiles import load_target
from autotune.tuner import tune

from .conftest import run_cli, save_tiny_llama
from .test_search import RegimeRunner

SMALL = dict(prompt_len=32, new_tokens=8, reps=2)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))


def statuses(result):
    return {t.label: t.status for t in result.trials}


def bf16_cpu_facts():
    """This machine's probe, its CPU said to have bf16 instructions: the search's order (bf16
    first on such a CPU, float32 first on one without) is then the same on every host."""
    from autotune.machine import host_info, probe

    host = host_info()
    return probe(host={**host, "cpu_flags": sorted(set(host.get("cpu_flags") or ()) | {"avx512_bf16"})})


@pytest.mark.slow
def test_tune_tiny_llama_for_real(tiny_llama):
    from autotune.machine import probe
    from autotune.space import preferred

    facts = probe()
    first = preferred(facts)[1]  # bfloat16 where the CPU has bf16 instructions (AMX, AVX512-BF16), else float32
    r = tune(tiny_llama, use_cache=False, report=True, facts=facts, **SMALL)
    ok = {(t.config["from_pretrained"].get("dtype"), t.config["from_pretrained"].get("attn_implementation")) for t in r.trials if t.status == "ok"}
    assert {(first, "sdpa"), (first, "eager")} <= ok, "stage 1: attention at the preferred dtype"
    assert {t.config["from_pretrained"]["dtype"] for t in r.trials if t.stage == "attention"} == {first}
    assert {d for d, _ in ok} >= {"float32", "float16", "bfloat16"}, "stage 2: every dtype with the best attention"
    assert any(t.stage == "cache" and t.status == "ok" for t in r.trials), "stage 3: the static cache"
    assert r.pick is not None and r.pick.status == "ok"
    for t in r.trials:
        if t.status == "ok":
            s = t.to_dict()["summary"]
            assert s["decode_tok_s"] > 0 and s["ttft_ms"] > 0 and s["runs"] >= 2
            assert t.quality["top1"] >= 0.5
            for m in t.results:
                assert all(run["total_s"] > 0 for run in m["runs"])
    cfg = r.config
    assert cfg["autotune"]["measured"] is True and cfg["autotune"]["workload"]["prompt_len"] == 32
    json.dumps(cfg)  # plain JSON


@pytest.mark.slow
def test_returned_config_loads(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tune(tiny_llama, use_cache=False, **SMALL)
    m = autotune.load(tiny_llama, cfg)
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, **cfg["from_pretrained"])
    assert str(plain.dtype).endswith(cfg["from_pretrained"]["dtype"])


def test_load_restores_integer_max_memory_keys(tiny_llama):
    cfg = {"from_pretrained": {"dtype": "float32", "device_map": "auto", "max_memory": {"cpu": "2GiB"}}, "generate": {"cache_implementation": "static"}}
    m = autotune.load(tiny_llama, json.loads(json.dumps(cfg)))
    assert m.generation_config.cache_implementation == "static"
    from autotune.config import from_pretrained_kwargs

    assert from_pretrained_kwargs({"from_pretrained": {"max_memory": {"0": "1GiB", "cpu": "2GiB"}}})["max_memory"] == {0: "1GiB", "cpu": "2GiB"}


@pytest.mark.slow
def test_bitsandbytes_4bit_on_cpu(tiny_llama):
    import importlib.metadata

    from packaging.version import Version

    if Version(importlib.metadata.version("bitsandbytes")) < Version("0.47.0"):
        pytest.skip("bitsandbytes < 0.47 has no 4-bit on the CPU")
    r = tune(tiny_llama, use_cache=False, report=True, quantization="always", **SMALL)
    (q,) = [t for t in r.trials if "bnb-4bit-nf4" in t.label]
    assert q.status == "ok", q.reason
    assert q.quality["kl"] < 1.0 and q.config["from_pretrained"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.slow
def test_injected_faults_are_reported_and_the_tune_completes(tiny_llama):
    faults = {"bfloat16 eager *": "crash", "float16 sdpa device_map=cpu": "hang", "float32 sdpa *": "oom", "* static-cache *": "corrupt"}
    r = tune(tiny_llama, use_cache=False, report=True, faults=faults, candidate_timeout=15, facts=bf16_cpu_facts(), **SMALL)
    st = statuses(r)
    assert st["bfloat16 eager device_map=cpu"] == "crashed"
    assert st["float16 sdpa device_map=cpu"] == "timeout"
    assert st["float32 sdpa device_map=cpu"] == "error"
    oom = [t for t in r.trials if t.label == "float32 sdpa device_map=cpu"][0]
    assert oom.reason.startswith("out of memory")
    corrupt = [t for t in r.trials if "static-cache" in t.label][0]
    assert corrupt.status == "wrong" and "disagree" in corrupt.reason
    assert r.pick is not None and r.pick.status == "ok" and r.pick is not corrupt


class CountingRunner(RegimeRunner):
    """Counts the runs and answers like tests/test_search.py's fake runner, without processes:
    these tests check the result cache and the interrupt path of a real tune(), not the runs
    (the real runner's tunes are the tests above)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.capacity_checks = 0

    def run(self, spec):
        self.calls += 1
        self.capacity_checks += bool(spec.get("capacity"))
        return super().run(spec)


def test_cache_hit_invalidation_and_resume(tmp_path):
    model = save_tiny_llama(tmp_path / "m")
    first = CountingRunner()
    r1 = tune(model, report=True, runner=first, **SMALL)
    assert first.calls >= 4
    again = CountingRunner()
    r2 = tune(model, report=True, runner=again, **SMALL)
    assert again.calls == 0, "every measurement comes from the cache"
    assert r2.config["from_pretrained"] == r1.config["from_pretrained"]
    other = CountingRunner()
    tune(model, report=True, runner=other, prompt_len=48, new_tokens=8, reps=2)
    assert other.calls >= 4, "another workload is another cache key"
    for r in (first, again, other):
        r.close()


def test_results_measured_by_other_code_or_rules_are_not_reused(tmp_path, monkeypatch):
    import autotune.cache as cache_mod
    import autotune.rules as rules_mod

    fingerprint = cache_mod.code_fingerprint.__wrapped__  # uncached: read the files each call
    model = save_tiny_llama(tmp_path / "m")
    first = CountingRunner()
    tune(model, runner=first, **SMALL)
    monkeypatch.setattr(cache_mod, "code_fingerprint", lambda: "another-checkout")  # same version string, other code
    edited = CountingRunner()
    tune(model, runner=edited, **SMALL)
    assert first.calls >= 4 and edited.calls == first.calls, "nothing measured by the other code was reused"
    # the fingerprint reads the rule files too: an edited rule is other code
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.toml").write_text("# one rule file\n")
    monkeypatch.setattr(rules_mod, "rules_dir", lambda: rules)
    before = fingerprint()
    assert fingerprint() == before, "the same files, the same fingerprint"
    (rules / "a.toml").write_text("# the same rule file, edited\n")
    assert fingerprint() != before
    for r in (first, edited):
        r.close()


def test_quantization_always_on_the_cpu_says_why_torchao_is_not_measured(tmp_path):
    # its kinds are variants of the compiled leader, and the CPU tune compiles nothing
    pytest.importorskip("torchao")
    model = save_tiny_llama(tmp_path / "m")
    runner = CountingRunner()
    facts = bf16_cpu_facts()  # this machine, measured
    r = tune(model, report=True, runner=runner, quantization="always", use_cache=False, facts=facts, **SMALL)
    assert any(n.startswith("torchao weight-only quantization not measured") and "CUDA GPUs only" in n for n in r.notes), r.notes
    assert not [t for t in r.trials if "torchao" in t.label]
    plain = tune(model, report=True, runner=runner, use_cache=False, facts=facts, **SMALL)
    assert not any(n.startswith("torchao weight-only quantization not measured") for n in plain.notes), "said only when asked for"
    runner.close()


def test_spent_time_budget_reports_what_was_not_measured(tmp_path):
    model = save_tiny_llama(tmp_path / "m")
    runner = CountingRunner()
    r = tune(model, report=True, runner=runner, time_budget=0.001, **SMALL)
    assert runner.calls == 0 and r.pick is None and r.config == {}
    assert all(t.status in ("not measured", "dropped") for t in r.trials)
    assert any("time budget" in t.reason for t in r.trials)
    runner.close()


class InterruptingRunner(CountingRunner):
    """Ctrl-C after two candidates."""

    def run(self, spec):
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().run(spec)


def test_ctrl_c_keeps_results_and_a_rerun_resumes(tmp_path):
    model = save_tiny_llama(tmp_path / "m")
    stopped = InterruptingRunner()
    r1 = tune(model, report=True, runner=stopped, **SMALL)
    assert r1.interrupted and any("interrupted" in n for n in r1.notes)
    assert stopped.calls == 2
    resume = CountingRunner()
    r2 = tune(model, report=True, runner=resume, **SMALL)
    assert r2.pick is not None
    done = sum(len(t.results) for t in r2.trials if t.stage != "baseline" or not t.reason)
    assert resume.calls - resume.capacity_checks == done - 2, "the two measurements made before Ctrl-C were reused"
    assert resume.capacity_checks == 0 and r2.capacity["checked"].startswith("not on the CPU")
    stopped.close()
    resume.close()


@pytest.mark.parametrize("target, dtype, cache", [("t4", "float16", "static"), ("h100", "bfloat16", "static"), ("cpu", None, None)])
def test_predicted_configs_for_targets(tiny_llama, target, dtype, cache):
    r = tune(tiny_llama, facts=load_target(target), report=True, **SMALL)
    cfg = r.config
    assert cfg["autotune"]["measured"] is False and cfg["autotune"]["reasons"]
    assert cfg["from_pretrained"]["attn_implementation"] == "sdpa"  # no flash-attn in these profiles' stacks
    if dtype:
        assert cfg["from_pretrained"]["dtype"] == dtype
    assert cfg["generate"].get("cache_implementation") == cache


def test_prediction_for_a100_with_flash_attn(tiny_llama):
    cfg = tune(tiny_llama, facts=load_target("a100-80gb"), **SMALL)
    assert cfg["from_pretrained"]["attn_implementation"] == "flash_attention_2"
    assert autotune.check(cfg, target="a100-80gb")["ok"]


@pytest.mark.slow
def test_cli_tune_json_and_output(tiny_llama, tmp_path):
    out = run_cli("tune", str(tiny_llama), "--prompt-len", "32", "--new-tokens", "8", "--reps", "2", "--json", "--no-cache", "-o", str(tmp_path / "cfg.json"), "--plot", str(tmp_path / "tune.png"),
                  env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["measured"] and report["pick"] and report["trials"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == report["config"]
    assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chk = run_cli("check", str(tmp_path / "cfg.json"), "--model", str(tiny_llama))
    assert chk.returncode == 0, chk.stdout


@pytest.mark.parametrize("args, match", [
    (["tune", "no-such-model"], "model folder not found"),
    (["tune", "--batch-size", "0"], "batch_size must be"),
    (["tune", "--max-memory", "0=lots"], "cannot parse memory size"),
    (["tune", "--objective", "speed"], "invalid choice"),
    (["tune", "--reps", "0"], "reps must be"),
    (["tune", "--attention", "fast"], "unknown value 'fast'"),
])
def test_cli_tune_bad_input(tmp_path, args, match):
    out = run_cli(*args, cwd=tmp_path, env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr


def test_quality_verdicts():
    import torch

    from autotune.quality import compare, verdict

    torch.manual_seed(0)
    ref = torch.randn(2, 4, 1000) * 0.1
    ref[..., 2] = float("-inf")  # EOS masked by min_new_tokens in both
    close = ref + torch.randn_like(ref) * 0.001
    assert verdict(compare(ref, close), floor=1e-6, quantized=False)[0]
    garbage = torch.randn_like(ref) * 10
    m = compare(ref, garbage)
    assert m["kl"] > 10
    assert not verdict(m, floor=1e-6, quantized=True)[0], "garbage fails even the quantized bound"
    nan = close.clone()
    nan[0, 0, 5] = float("nan")
    ok, why = verdict(compare(ref, nan), floor=1e-6, quantized=False)
    assert not ok and "NaN" in why


@pytest.mark.slow
def test_capacity_mode_runs_each_shape_in_the_worker(tiny_llama, tmp_path):
    """The check run itself (the tuner sends it on a GPU): one full generate per shape."""
    from autotune.runner import ForkRunner

    runner = ForkRunner(timeout_s=120, workdir=tmp_path / "runs")
    try:
        r = runner.run({"model": str(tiny_llama), "label": "cap", "workload": {"batch_size": 1, "prompt_len": 8, "new_tokens": 4},
                        "config": {"from_pretrained": {"dtype": "float32"}, "generate": {"cache_implementation": "static"}, "runtime": {}},
                        "capacity": [{"batch_size": 3, "prompt_len": 8}, {"batch_size": 1, "prompt_len": 40}], "seed": 0, "fault": None})
    finally:
        runner.close()
    assert r["status"] == "ok" and "runs" not in r
    assert [(c["batch_size"], c["prompt_len"], c["fits"]) for c in r["capacity_checks"]] == [(3, 8, True), (1, 40, True)]


@pytest.mark.slow
def test_launched_candidates_warm_up_together_and_are_timed_in_turn(tiny_llama, tmp_path):
    """Several candidates load and warm up at once, each held before its timed runs; released
    one at a time, their timed runs never overlap. A held one can be cancelled; plain runs go on."""
    from autotune.runner import ForkRunner

    def spec(label):
        return {"model": str(tiny_llama), "label": label, "workload": {"batch_size": 1, "prompt_len": 8, "new_tokens": 4},
                "config": {"from_pretrained": {"dtype": "float32"}, "generate": {}, "runtime": {}}, "reps": 2, "seed": 0, "fault": None}

    runner = ForkRunner(timeout_s=120, workdir=tmp_path / "runs")
    runner.start()
    try:
        a, b = runner.launch(spec("a")), runner.launch(spec("b"))  # while the server still imports
        a.wait_warm()
        b.wait_warm()
        assert (a.out / "warm").exists() and (b.out / "warm").exists()
        assert not (a.out / "result.json").exists() and not (b.out / "result.json").exists(), "held before the timed runs"
        b.release()
        rb = b.result()
        a.release()
        ra = a.result()
        c = runner.launch(spec("c"))
        c.wait_warm()
        c.cancel()
        rc = c.result()
        plain = runner.run(spec("d"))
    finally:
        runner.close()
    assert ra["status"] == rb["status"] == plain["status"] == "ok", (ra, rb, plain)
    assert rb["timed_window"][1] <= ra["timed_window"][0], "a's timed runs started after b's had ended"
    assert ra["warm_s"] is not None and ra["warm_s"] < ra["wall_s"]
    assert rc["status"] == "crashed" and "SIGKILL" in rc["error"]


def test_a_held_candidate_never_times_past_its_limit(tmp_path):
    from autotune.worker import _wait_for

    with pytest.raises(RuntimeError, match="not released"):
        _wait_for(str(tmp_path / "never"), 0.1)
    (tmp_path / "go").touch()
    _wait_for(str(tmp_path / "go"), 0.1)
