"""Issue 10: faults a user meets, each handled before it costs a tuning run, with one line and
the documented exit code; interrupts that leave no process behind and no unmarked config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune.errors import UserError
from autotune.model import known_model_types, load_problems, read_model, require_loadable

from .conftest import ROOT, run_cli, write_json


@pytest.fixture()
def model(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny Llama, to break."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    return dst


def _cfg(folder: Path, **changes) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def _ids(folder: Path, **kw) -> list[str]:
    return [p.id for p in load_problems(read_model(folder), **kw)]


def test_a_sound_model_has_no_problems(model):
    assert _ids(model, prompt_len=64, new_tokens=32) == []
    assert "llama" in known_model_types() and "gpt2" in known_model_types()


def test_no_weights(model):
    for f in model.glob("*.safetensors"):
        f.unlink()
    assert _ids(model) == ["MODEL-NO-WEIGHTS"]


def test_truncated_safetensors(model):
    (f,) = model.glob("*.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert _ids(model) == ["MODEL-TRUNCATED"]


def test_only_the_files_from_pretrained_loads_are_counted(model, tmp_path):
    """A Mistral repository holds its weights twice: the shards transformers loads and
    consolidated.safetensors (Mistral's own names), which it does not. The parameter count, the
    memory estimate and the truncation check read only the former."""
    import shutil

    from autotune.model import checkpoint_files

    one = read_model(model)
    (f,) = model.glob("*.safetensors")
    shutil.copy(f, model / "consolidated.safetensors")
    assert checkpoint_files(model) == [model / "model.safetensors"]
    assert read_model(model).param_count == one.param_count and len(read_model(model).tensors) == len(one.tensors)
    (model / "consolidated.safetensors").write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert _ids(model) == [], "a truncated file that from_pretrained does not read stops nothing"
    # sharded: the files the index maps, whatever else is there
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(model / "config.json", sharded / "config.json")
    shutil.copy(f, sharded / "model-00001-of-00001.safetensors")
    shutil.copy(f, sharded / "consolidated.safetensors")
    names = [t.name for t in one.tensors]
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert checkpoint_files(sharded) == [sharded / "model-00001-of-00001.safetensors"]
    assert read_model(sharded).param_count == one.param_count


def test_unknown_model_type_says_did_you_mean(model):
    _cfg(model, model_type="lama")
    (p,) = load_problems(read_model(model))
    assert p.id == "MODEL-UNKNOWN-TYPE" and "'llama'" in p.message


def test_zero_heads(model):
    _cfg(model, num_attention_heads=0)
    assert "MODEL-BAD-SHAPE" in _ids(model)


def test_remote_code_needs_consent(model):
    _cfg(model, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    assert _ids(model) == ["MODEL-REMOTE-CODE"]
    assert _ids(model, trust_remote_code=True) == []


def test_workload_beyond_the_positions(model):
    assert _ids(model, prompt_len=500, new_tokens=12) == []
    (p,) = load_problems(read_model(model), prompt_len=500, new_tokens=13)
    assert p.id == "WORKLOAD-TOO-LONG" and "513" in p.message and "512" in p.message
    with pytest.raises(UserError, match="WORKLOAD-TOO-LONG"):
        require_loadable(read_model(model), prompt_len=500, new_tokens=13)


@pytest.mark.parametrize("breakage", ["no-weights", "truncated", "unknown-type", "zero-heads", "remote-code", "too-long"])
def test_tune_stops_at_once_and_check_reports_an_error(model, tmp_path, breakage):
    args = ["--prompt-len", "16", "--new-tokens", "4"]
    if breakage == "no-weights":
        for f in model.glob("*.safetensors"):
            f.unlink()
    elif breakage == "truncated":
        (f,) = model.glob("*.safetensors")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # the header intact, the data cut (a cut header: exit 2, unreadable)
    elif breakage == "unknown-type":
        _cfg(model, model_type="no-such-model")
    elif breakage == "zero-heads":
        _cfg(model, num_attention_heads=0)
    elif breakage == "remote-code":
        _cfg(model, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    else:
        args = ["--prompt-len", "600", "--new-tokens", "4"]
    env = {"AUTOTUNE_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.perf_counter()
    r = run_cli("tune", str(model), *args, env=env)
    took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "cache" / "results").exists() or not any((tmp_path / "cache" / "results").rglob("*.json")), "nothing ran"
    assert took < 30, "stopped before any candidate (the CLI's own start-up is most of this)"
    cfg = write_json(tmp_path / "cfg.json", {"dtype": "float32"})
    extra = ["--prompt-len", "600", "--new-tokens", "4"] if breakage == "too-long" else []
    c = run_cli("check", str(cfg), "--model", str(model), "--json", *extra)
    report = json.loads(c.stdout)
    assert c.returncode == 1 and not report["ok"], c.stdout[-500:]
    assert any(f["rule"].startswith(("MODEL-", "WORKLOAD-")) and f["severity"] == "error" for f in report["findings"])


def test_trust_remote_code_is_passed_on_and_recorded(model):
    from autotune.tuner import Tuner

    class Runner:
        specs: list = []

        def run(self, spec):
            self.specs.append(spec)
            return {"label": spec["label"], "status": "error", "error": "not run in this test"}

        def close(self):
            pass

    _cfg(model, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    runner = Runner()
    from autotune.config import Workload

    Tuner(model, facts=_cpu_facts(), workload=Workload(1, 16, 4), runner=runner,
          check_capacity=False, trust_remote_code=True).run()
    assert runner.specs and all(s["config"]["from_pretrained"].get("trust_remote_code") is True for s in runner.specs if "config" in s)


def _cpu_facts():
    from autotune.machine import probe

    return probe()


def _autotune_pids(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``marker``."""
    from autotune._proc import carrying

    return carrying(marker)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_with_the_signals_code_marks_the_config_and_leaves_no_process(tiny_llama, tmp_path, sig, code):
    marker = f"AUTOTUNE_TEST_MARKER={tmp_path.name}-{sig}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), AUTOTUNE_CACHE_DIR=str(tmp_path / "cache"))
    env[marker.split("=")[0]] = marker.split("=")[1]
    out = tmp_path / "cfg.json"
    p = subprocess.Popen([sys.executable, "-m", "autotune", "tune", str(tiny_llama), "--prompt-len", "16", "--new-tokens", "256",
                          "--no-cache", "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until a candidate's process is running (a child of the runner, in its own session)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_autotune_pids(marker)) < 3:
        time.sleep(0.2)
    assert len(_autotune_pids(marker)) >= 3, "the tune, its fork server or interpreter, and a candidate"
    time.sleep(1.0)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err[-1000:]
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _autotune_pids(marker):
        time.sleep(0.2)
    assert _autotune_pids(marker) == [], "no child outlives the tune"
    if out.exists():
        assert json.loads(out.read_text())["autotune"]["interrupted"] is True


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_children_die_with_a_killed_parent(tiny_llama, tmp_path):
    marker = f"AUTOTUNE_TEST_MARKER={tmp_path.name}-kill"
    env = dict(os.environ, PYTHONPATH=str(ROOT), AUTOTUNE_CACHE_DIR=str(tmp_path / "cache"))
    env[marker.split("=")[0]] = marker.split("=")[1]
    p = subprocess.Popen([sys.executable, "-m", "autotune", "tune", str(tiny_llama), "--prompt-len", "16", "--new-tokens", "256", "--no-cache"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_autotune_pids(marker)) < 3:
        time.sleep(0.2)
    p.kill()  # SIGKILL, the moment the third process appears (it may still be starting): no handler runs in the parent
    p.wait()
    # a child still starting notices within its start-up (the pid check), a running one at once
    # (PDEATHSIG); the issue's orphan ran on for minutes
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _autotune_pids(marker):
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in _autotune_pids(marker)}
    assert not left, f"the parent's death takes its children with it: {left}"


@pytest.mark.parametrize("args", [
    ["--time-budget", "nan"], ["--timeout", "0"], ["--min-throughput", "-3"], ["--headroom", "inf"],
    ["-o", "/nonexistent/cfg.json"], ["--plot", "out.txt"], ["--plot", "/nonexistent/p.png"], ["-o", "."], ["--wait", "-1"], ["--wait", "nan"],
])
def test_bad_arguments_and_output_paths_are_refused_before_the_tune(tiny_llama, tmp_path, args):
    t0 = time.perf_counter()
    r = run_cli("tune", str(tiny_llama), "--prompt-len", "16", "--new-tokens", "4", *args, env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")}, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "internal error" not in r.stderr and time.perf_counter() - t0 < 30
    assert not (tmp_path / "c" / "results").exists(), "refused before anything ran"


def test_cache_dir_that_is_a_file_is_a_user_error(tiny_llama, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for env in ({"AUTOTUNE_CACHE_DIR": str(f)}, {"AUTOTUNE_CACHE_DIR": str(f / "sub")}):
        r = run_cli("tune", str(tiny_llama), "--prompt-len", "16", "--new-tokens", "4", env=env)
        assert r.returncode == 2 and "AUTOTUNE_CACHE_DIR" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_json_nested_too_deeply_and_a_byte_order_mark(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    r = run_cli("check", str(deep), "--target", "h100-80gb")
    assert r.returncode == 2 and "nested too deeply" in r.stderr, r.stderr
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"dtype": "bfloat16"}).encode())
    r = run_cli("check", str(bom), "--target", "h100-80gb")
    assert r.returncode in (0, 1), r.stderr


def test_check_strict_prints_the_verdict_its_exit_code_gives(tmp_path):
    cfg = write_json(tmp_path / "c.json", {"dtype": "bfloat16", "attn_implementation": "sdpa"})
    facts = json.loads(run_cli("probe", "--json").stdout)
    facts["packages"]["transformers"] = None  # rules that need it cannot be evaluated
    ff = write_json(tmp_path / "facts.json", facts)
    plain = run_cli("check", str(cfg), "--facts", str(ff), "--json")
    strict = run_cli("check", str(cfg), "--facts", str(ff), "--json", "--strict")
    rp, rs = json.loads(plain.stdout), json.loads(strict.stdout)
    assert rs["not_evaluated"], "the facts leave something unevaluated"
    assert (rp["ok"], plain.returncode == 0) == (True, True) or not rp["ok"]
    assert rs["ok"] is False and strict.returncode == 1 and rs["strict"] is True
    text = run_cli("check", str(cfg), "--facts", str(ff), "--strict")
    assert "FAILS" in text.stdout.splitlines()[0] and text.returncode == 1


@pytest.mark.slow
def test_a_second_tune_waits_for_the_first_or_refuses(tmp_path):
    """The lock, held by another process: with --wait 0 the second tune refuses in one line;
    with a wait it says why it waits, then gives up when the wait is over."""
    from autotune.lock import MeasureLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from autotune.lock import MeasureLock\n"
        "with MeasureLock(%r, 'cpu'):\n"
        "    print('held', flush=True); time.sleep(60)\n") % (str(ROOT), str(tmp_path))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {"AUTOTUNE_CACHE_DIR": str(tmp_path)}
        r = run_cli("tune", "--wait", "0", "--no-cache", env=env)
        assert r.returncode == 2 and "another tune" in r.stderr and f"pid {holder.pid}" in r.stderr, r.stderr
        said: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(UserError, match="another tune"):
            with MeasureLock(tmp_path, "cpu", wait_s=1.5, say=said.append):
                pass
        assert 1.5 <= time.monotonic() - t0 < 10 and said and "waiting for another tune" in said[0]
    finally:
        holder.kill()
        holder.wait()
    with MeasureLock(tmp_path, "cpu", wait_s=0) as lock:  # released with its holder's death
        assert lock.waited_s < 1


def test_a_run_on_a_busy_machine_is_not_cached(tiny_llama, tmp_path):
    from autotune.config import Workload
    from autotune.measure import Bench
    from autotune.trial import Trial

    class Busy:
        def run(self, spec):
            return {"label": spec["label"], "status": "ok", "runs": [{"decode_tok_s": 1.0}], "contention": "the CPU was busy (test)"}

    class Cache:
        puts: list = []

        def get(self, key):
            return None

        def put(self, key, result):
            self.puts.append(key)

        def trial_key(self, t, n):
            return f"{t.label}/{n}"

    cache = Cache()
    bench = Bench(str(tiny_llama), Workload(1, 16, 4), runner=Busy(), cache=cache)
    t = Trial(label="x", stage="s", config={"from_pretrained": {"dtype": "float32"}, "generate": {}, "runtime": {}})
    bench.measure(t)
    assert cache.puts == [] and bench.contended and "busy" in bench.contended[0]


@pytest.mark.slow
def test_max_memory_for_an_invisible_gpu_is_refused(tiny_llama, tmp_path):
    r = run_cli("tune", str(tiny_llama), "--prompt-len", "16", "--new-tokens", "4", "--max-memory", "0=20GiB",
                env={"AUTOTUNE_CACHE_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "no GPU is visible" in r.stderr, r.stderr


def test_max_memory_cpu_is_held_to(tiny_llama):
    from autotune.config import Workload, parse_max_memory
    from autotune.measure import Bench
    from autotune.trial import Trial

    class Ran:
        def run(self, spec):
            return {"label": spec["label"], "status": "ok", "runs": [{"decode_tok_s": 10.0}], "host_peak_gib": 0.6}

    for budget, ok in (("cpu=1KiB", False), ("cpu=64GiB", True)):
        bench = Bench(str(tiny_llama), Workload(1, 16, 4), runner=Ran(), max_memory=parse_max_memory(budget))
        t = Trial(label="x", stage="s", config={"from_pretrained": {"dtype": "float32"}, "generate": {}, "runtime": {}})
        bench.measure(t)
        assert (t.status == "ok") == ok, t.reason
        if not ok:
            assert "beyond --max-memory cpu=" in t.reason and t.reason.startswith("out of memory")


def test_progress_says_when_a_candidate_is_measured_again(tiny_llama):
    from autotune.config import Workload
    from autotune.measure import Bench
    from autotune.trial import Trial

    class Ran:
        def run(self, spec):
            return {"label": spec["label"], "status": "ok", "runs": [{"decode_tok_s": 10.0}]}

    shown: list[str] = []
    bench = Bench(str(tiny_llama), Workload(1, 16, 4), runner=Ran(), progress=lambda label, done, total: shown.append(label))
    t = Trial(label="x", stage="s", config={"from_pretrained": {"dtype": "float32"}, "generate": {}, "runtime": {}})
    for _ in range(3):  # the screen's finalists are measured again, interleaved
        bench.measure(t)
    assert shown == ["x", "x (again: run 2)", "x (again: run 3)"]
    assert [e["label"] for e in bench.timeline] == ["x"] * 3, "the timeline keeps the candidate's own label"


def test_load_takes_the_config_file_and_fails_fast_offline(tiny_llama, tmp_path):
    import autotune

    cfg = write_json(tmp_path / "tuned.json", {"from_pretrained": {"dtype": "float32", "device_map": "cpu"}, "generate": {}, "runtime": {}})
    m = autotune.load(tiny_llama, cfg)
    assert str(next(m.parameters()).dtype) == "torch.float32"
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="model folder not found: no-such-org/no-such-model"):
        autotune.load("no-such-org/no-such-model", cfg)
    assert time.perf_counter() - t0 < 20, "no hub retries"
    with pytest.raises(UserError, match="model folder not found"):
        autotune.load(str(tmp_path / "missing" / "dir"), cfg)


def test_mem_fit_names_the_weights_format_and_the_devices_overhead(tmp_path):
    from autotune.config import Workload
    from autotune.gate import check

    folder = tmp_path / "m70b"
    folder.mkdir()
    write_json(folder / "config.json", {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                                        "max_position_embeddings": 8192, "torch_dtype": "bfloat16"})
    spec = read_model(folder)
    r = check({"dtype": "bfloat16", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "device_map": {"": 0}}, target="t4", model=spec)
    msg = next(f["message"] for f in r["findings"] if f["rule"] == "MEM-FIT")
    assert "bitsandbytes 4-bit nf4" in msg and "CUDA context" in msg
    r = check({"dtype": "bfloat16", "device_map": "cpu"}, target="cpu", model=spec, workload=Workload(64, 8000, 100))
    msg = next(f["message"] for f in r["findings"] if f["rule"] == "MEM-FIT")
    assert "weights in bfloat16," in msg and "CUDA" not in msg and "CPU RAM" in msg


def test_prediction_reasons_are_whole_and_the_architecture_comes_first(tiny_llama):
    from autotune.profiles import load_target
    from autotune.tuner import tune

    r = tune(tiny_llama, facts=load_target("t4"), report=True, prompt_len=64, new_tokens=16)
    fa2 = next(n for n in r.notes if n.startswith("not flash_attention_2"))
    assert "ATTN-FA2-ARCH" in fa2 and "ATTN-FA2-MISSING" not in fa2 and "more: `autotune check` lists them" in fa2
    assert fa2.split("ATTN-FA2-ARCH: ")[1].split(" (and ")[0].endswith("."), "the message is whole, not cut mid-word"


@pytest.mark.slow
def test_doctor_deep_shows_its_findings_in_text():
    r = run_cli("doctor", "--deep")
    assert r.returncode in (0, 1), r.stderr
    assert "Deep checks (imports, in a subprocess)" in r.stdout and "SDPA backends on" in r.stdout and "torch " in r.stdout


def test_a_version_that_is_not_pep440_is_installed_version_unknown(tmp_path):
    facts = json.loads(run_cli("probe", "--json").stdout)
    facts["packages"]["torch"] = "main"
    facts["packages"]["transformers"] = "4.40.0.custom-build"
    ff = write_json(tmp_path / "facts.json", facts)
    cfg = write_json(tmp_path / "c.json", {"dtype": "bfloat16"})
    r = run_cli("check", str(cfg), "--facts", str(ff), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    info = next(f for f in report["findings"] if f["rule"] == "FACTS-VERSION-UNPARSED")
    assert info["severity"] == "info" and "torch 'main'" in info["message"]
    assert any("pkg.torch" in n["needs"] for n in report["not_evaluated"]), "version rules go unevaluated, not wrong"


@pytest.mark.parametrize("cfg", [{"from_pretrained": {"dtype": "bfloat16", "to_bettertransformer": True}},
                                 {"dtype": "bfloat16", "to_bettertransformer": True}])
def test_to_bettertransformer_is_seen_in_both_places(tmp_path, cfg):
    r = run_cli("check", str(write_json(tmp_path / "c.json", cfg)), "--target", "h100-80gb", "--json")
    rules = {f["rule"] for f in json.loads(r.stdout)["findings"]}
    assert "BT-TRANSFORMERS-5" in rules and "CFG-KEY-NOT-JUDGED" not in rules


@pytest.mark.parametrize("cfg,kind", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "encoder"),
    ({"model_type": "bert", "architectures": ["BertLMHeadModel"], "is_decoder": True}, "causal-lm"),
    ({"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"]}, "encoder"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "causal-lm"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "causal-lm"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "encoder-decoder"),
])
def test_model_kind_from_config(tmp_path, cfg, kind):
    from autotune.model import model_kind

    write_json(tmp_path / "config.json", cfg)
    assert model_kind(tmp_path) == kind


def test_tune_refuses_generation_lengths_for_an_encoder_in_one_line(tmp_path):
    """A random small BERT through the real save_pretrained: asked for a generation workload,
    tune stops at once instead of "tuning" a BertLMHeadModel with a random LM head; it tunes
    the encoder's forward when given --seq-len (tests/test_encoder.py)."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)).save_pretrained(tmp_path / "bert")
    r = run_cli("tune", str(tmp_path / "bert"), "--prompt-len", "16", "--new-tokens", "4", env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 2 and "encoder model (BertModel)" in r.stderr and "--seq-len" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_fork_server_answers_has_triton_without_touching_cuda(monkeypatch):
    """torchao 0.18 calls torch's has_triton() at import, which initialises CUDA (seen on the H100:
    the fork server refused to start with torchao installed); the server's stand-in reads NVML."""
    import torch

    from autotune import _forkserver

    def no(*a, **k):
        raise AssertionError("CUDA initialised")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no)
    monkeypatch.setattr(_forkserver, "_CAPS", None)
    assert _forkserver.has_triton_without_cuda() in (True, False)
    monkeypatch.setattr(_forkserver, "_CAPS", [(9, 0), (8, 6)])
    assert _forkserver.capability_without_cuda() == (9, 0)
    assert _forkserver.capability_without_cuda(1) == _forkserver.capability_without_cuda("cuda:1") == (8, 6)
    assert _forkserver.capability_without_cuda(torch.device("cuda", 1)) == (8, 6)
    with pytest.raises(RuntimeError):
        _forkserver.capability_without_cuda(2)
