"""Several GPUs: placement candidates, tensor parallel through torchrun, launch commands.

The tuner is driven with multi-GPU facts (2x and 4x H100, a T4 next to an A100, 8x A100 on
NVLink) and a runner that answers without running anything: what is under test is which
placements are generated, dropped or skipped, what each process is asked to enforce, and what
config comes out. Tensor parallel itself runs for real on the CPU (torchrun, gloo, 2 ranks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import autotune
from autotune.config import from_pretrained_kwargs, launch_nproc, parse_config, parse_max_memory
from autotune.errors import ConfigError, UserError
from autotune.facts import load_facts
from autotune.profiles import load_target
from autotune.tuner import Tuner, predict
from autotune.config import Workload
from tests.conftest import run_cli, save_tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
WORKLOAD = Workload(batch_size=1, prompt_len=32, new_tokens=8)


class FakeRunner:
    """Answers every candidate with made-up, plausible measurements; records the specs.
    ``speed(config)`` gives tokens/s; a config it returns None for fails as an error."""

    def __init__(self, speed=None):
        self.specs: list[dict[str, Any]] = []
        self.speed = speed or (lambda cfg: 100.0)

    def run(self, spec):
        self.specs.append(spec)
        if spec.get("screen"):  # the proxy: GPU time per decode step, from the same speeds
            rows = [{"label": s["label"], "status": "ok", "step_ms": 1000 / (self.speed(s["config"]) or 1e-3)} for s in spec["screen"]]
            return {"label": spec["label"], "status": "ok", "screen": rows}
        tok_s = self.speed(spec["config"])
        if tok_s is None:
            return {"label": spec["label"], "status": "error", "error": "RuntimeError: injected"}
        if spec.get("capacity"):
            limit = getattr(self, "max_batch", 10**9)
            budget = getattr(self, "budget_gib", 80.0)  # reserved peaks grow linearly with the batch and reach the budget at the limit
            share = getattr(self, "allocated_share", None)  # allocated peaks this share of reserved (None: reports allocated only)
            checks = []
            for s in spec["capacity"]:
                held = 1.0 + (budget - 1.0) * s["batch_size"] / limit
                peaks = {"gpu_peak_gib": {"0": held}} if share is None else {"gpu_peak_gib": {"0": held * share}, "gpu_reserved_gib": {"0": held}}
                checks.append({**s, "fits": s["batch_size"] <= limit, **peaks})
            return {"label": spec["label"], "status": "ok", "capacity_checks": checks}
        runs = [{"decode_tok_s": tok_s * f, "ttft_s": 0.02, "total_s": 8 / tok_s} for f in (0.99, 1.0, 1.01)]
        nproc = spec.get("nproc", 1)
        peaks = {str(i): 1.0 for i in range(nproc)}
        return {"label": spec["label"], "status": "ok", "runs": runs, "load_s": 0.1, "gpu_peak_gib": peaks}


def _tuner(model, facts, runner, **kw):
    return Tuner(model, facts=facts, workload=WORKLOAD, runner=runner, check_capacity=False, **kw)


def _by_label(result):
    return {t.label: t for t in result.trials}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), dtype="bfloat16")  # 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama8"), dtype="bfloat16", num_attention_heads=8, num_key_value_heads=8)


def test_two_h100_placements(llama):
    runner = FakeRunner()
    r = _tuner(llama, load_target("2xh100-80gb"), runner).run()
    trials = _by_label(r)
    placed = {label: t for label, t in trials.items() if t.stage == "placement"}
    auto = next(t for label, t in placed.items() if label.endswith("device_map=auto"))
    assert auto.status == "ok" and set(auto.config["from_pretrained"]["max_memory"]) == {"0", "1"}, "no CPU key: offload is the last resort"
    balanced = next(t for label, t in placed.items() if "device_map=balanced" in label)
    assert balanced.status == "not measured" and "get_balanced_memory" in balanced.reason
    seq = next(t for label, t in placed.items() if "device_map=sequential" in label)
    assert seq.status == "not measured" and "same placement as one GPU" in seq.reason
    tp = next(t for label, t in placed.items() if "tensor-parallel x2" in label)
    assert tp.status == "ok"
    assert tp.config["runtime"]["launch"] == "torchrun --nproc-per-node 2 your_script.py"
    assert tp.config["from_pretrained"]["distributed_config"] == {"tp_plan": "auto", "tp_size": 2}
    assert "device_map" not in tp.config["from_pretrained"]
    tp_specs = [s for s in runner.specs if s["label"] == tp.label]
    assert tp_specs and all(s["nproc"] == 2 for s in tp_specs), "tensor parallel runs as one process per GPU"
    assert all(s["nproc"] == 1 for s in runner.specs if s["label"] != tp.label)
    assert any("CPU offload not measured" in n for n in r.notes)


def test_four_h100_tp_sizes_follow_the_heads(llama, llama8):
    r = _tuner(llama, load_target("4xh100-80gb"), FakeRunner()).run()
    trials = _by_label(r)
    x2 = next(t for label, t in trials.items() if "tensor-parallel x2" in label)
    x4 = next(t for label, t in trials.items() if "tensor-parallel x4" in label)
    assert x2.status == "ok"
    assert x4.status == "dropped" and "PLACE-TP-HEADS" in x4.reason and "2 KV heads" in x4.reason
    r8 = _tuner(llama8, load_target("4xh100-80gb"), FakeRunner()).run()
    assert next(t for label, t in _by_label(r8).items() if "tensor-parallel x4" in label).status == "ok"


def test_eight_a100_nvlink(llama8):
    facts = load_facts(FIXTURES / "8xa100-nvlink.json")
    r = _tuner(llama8, facts, FakeRunner()).run()
    sizes = {t.label.rsplit("x", 1)[-1]: t for t in r.trials if "tensor-parallel" in t.label}
    assert set(sizes) == {"2", "4", "8"} and all(t.status == "ok" for t in sizes.values())
    assert not any("PLACE-TP-NO-NVLINK" in w for t in sizes.values() for w in t.warnings)
    # the same GPUs joined by PCIe only: tensor parallel is still measured, with a warning
    pcie = facts.replace(links=tuple(dataclass_replace(link, nvlink_links=0) for link in facts.links))
    r2 = _tuner(llama8, pcie, FakeRunner()).run()
    tp2 = next(t for t in r2.trials if "tensor-parallel x2" in t.label)
    assert any("PLACE-TP-NO-NVLINK" in w for w in tp2.warnings)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_t4_next_to_a100_is_judged_per_gpu(llama):
    r = _tuner(llama, load_target("t4+a100-80gb"), FakeRunner()).run()
    trials = _by_label(r)
    assert r.pick is not None and r.pick.config["from_pretrained"]["dtype"] == "float16", "bf16 is not for the T4 (GPU 0)"
    bf16 = [t for t in r.trials if t.config["from_pretrained"].get("dtype") == "bfloat16"]
    assert bf16 and all(any("DTYPE-BF16-ARCH" in w and "Tesla T4" in w for w in t.warnings) for t in bf16), "emulated on the T4: a warning"
    tp = next(t for label, t in trials.items() if "tensor-parallel x2" in label)
    assert any("PLACE-MIXED-GPUS" in w for w in tp.warnings)


def test_budget_makes_a_small_model_behave_like_a_large_one(tmp_path):
    """--max-memory below what one GPU needs: one GPU is dropped, the splits and TP are
    measured, and every process is handed the budget to enforce."""
    from autotune.memory import estimate

    model = save_tiny_llama(tmp_path / "m", dtype="bfloat16", hidden_size=128, intermediate_size=256, vocab_size=32000)
    facts = load_target("2xh100-80gb")
    probe = _tuner(model, facts, FakeRunner())
    est = estimate(parse_config({"from_pretrained": {"dtype": "bfloat16"}}, workload=WORKLOAD), probe.model, facts)
    per_gpu = est.overhead + int(0.65 * (est.total - est.overhead))  # one GPU cannot hold it, two can
    budget = {"0": per_gpu, "1": per_gpu}
    runner = FakeRunner()
    r = _tuner(model, facts, runner, max_memory=budget, headroom_gib=0.0).run()
    trials = _by_label(r)
    single = [t for t in r.trials if t.stage in ("compiled", "attention", "placement") and t.config["from_pretrained"].get("device_map") == {"": 0}]
    assert [t.status for t in single] == ["dropped"] and "MEM-FIT" in single[0].reason, "one GPU: dropped before loading, with the reason"
    auto = next(t for label, t in trials.items() if label.endswith("device_map=auto") and t.status == "ok")
    assert auto.status == "ok"
    seq = next(t for label, t in trials.items() if "device_map=sequential" in label)
    assert seq.status == "ok", "sequential differs from one GPU when the model does not fit GPU 0"
    assert next(t for label, t in trials.items() if "tensor-parallel x2" in label).status == "ok"
    assert runner.specs and all(s["memory_budget"] == budget for s in runner.specs)
    mm = auto.config["from_pretrained"]["max_memory"]
    assert set(mm) == {"0", "1"} and all(parse_max_memory({k: v})[k] < budget[k] for k, v in mm.items()), "KV cache and CUDA context kept back"


def test_tp_pick_config_launch_and_check(llama):
    fast_tp = FakeRunner(lambda cfg: 300.0 if "distributed_config" in cfg["from_pretrained"] else 100.0)
    r = _tuner(llama, load_target("2xh100-80gb"), fast_tp).run()
    cfg = r.config
    assert "tensor-parallel" in r.pick.label
    assert cfg["runtime"]["launch"] == "torchrun --nproc-per-node 2 your_script.py"
    assert launch_nproc(cfg["runtime"]["launch"]) == 2
    assert autotune.check(cfg, target="2xh100-80gb")["ok"]
    one = autotune.check(cfg, target="h100-80gb")
    assert not one["ok"] and {f["rule"] for f in one["findings"] if f["severity"] == "error"} >= {"PLACE-TP-ONE-GPU", "PLACE-TP-SIZE"}
    with pytest.raises(UserError, match="torchrun --nproc-per-node 2"):
        autotune.load(llama, cfg)
    from autotune.render import tune_text

    text = tune_text(r)
    assert "torchrun --nproc-per-node 2 your_script.py" in text and "GPU 1:" in text


def test_split_pick_loads_with_integer_max_memory_keys(llama):
    fast_split = FakeRunner(lambda cfg: 300.0 if cfg["from_pretrained"].get("device_map") == "auto" else 100.0)
    r = _tuner(llama, load_target("2xh100-80gb"), fast_split).run()
    cfg = json.loads(json.dumps(r.config))  # as written to disk
    assert cfg["from_pretrained"]["device_map"] == "auto" and r.config["runtime"]["launch"] is None
    kw = from_pretrained_kwargs(cfg)
    assert set(kw["max_memory"]) == {0, 1}
    assert autotune.check(cfg, target="2xh100-80gb")["ok"]


def test_failed_compiled_placement_falls_back_to_the_dynamic_cache(llama):
    def speed(cfg):
        static = bool(cfg["generate"].get("cache_implementation"))
        if "distributed_config" in cfg["from_pretrained"] and static:
            return None  # a compiled static cache that does not run sharded
        return 300.0 if static else 100.0

    r = _tuner(llama, load_target("2xh100-80gb"), FakeRunner(speed)).run()
    tps = [t for t in r.trials if "tensor-parallel" in t.label]
    assert {t.status for t in tps} == {"error", "ok"}
    assert next(t for t in tps if t.status == "ok").config["generate"] == {}


def test_prediction_for_a_model_too_big_for_one_gpu(tmp_path):
    big = tmp_path / "llama-70b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "tie_word_embeddings": False}))
    facts = load_facts(FIXTURES / "8xa100-nvlink.json")
    r = predict(big, facts, Workload(batch_size=1, prompt_len=512, new_tokens=128))
    cfg = r.config
    n = parse_config(cfg).tp_size
    assert cfg["autotune"]["measured"] is False and n in (2, 4, 8)
    assert cfg["runtime"]["launch"] == f"torchrun --nproc-per-node {n} your_script.py"
    assert autotune.check(cfg, facts_file=str(FIXTURES / "8xa100-nvlink.json"))["ok"]
    # without NVLink in the facts: a device_map split, not tensor parallel
    pcie = facts.replace(links=tuple(dataclass_replace(link, nvlink_links=0) for link in facts.links))
    cfg2 = predict(big, pcie, Workload(batch_size=1, prompt_len=512, new_tokens=128)).config
    assert cfg2["from_pretrained"]["device_map"] == "auto" and cfg2["runtime"]["launch"] is None


@pytest.mark.parametrize("text, match", [
    ("0=20GiB,1=lots", "cannot parse memory size"),
    ("0=20GiB,0=10GiB", "twice"),
    ("gpu0=20GiB", "not a GPU ordinal"),
    ("0=-5GiB", "cannot parse memory size"),
])
def test_max_memory_bad_values(text, match):
    with pytest.raises((ConfigError, UserError), match=match):
        parse_max_memory(text)


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB,1=20GiB") == {"0": 20 * 2**30, "1": 20 * 2**30}
    assert parse_max_memory("0=20GB, cpu=64GiB") == {"0": 20 * 10**9, "cpu": 64 * 2**30}


def test_cli_headroom_must_not_be_negative(tmp_path):
    out = run_cli("tune", "--headroom", "-1", cwd=tmp_path, env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 2 and "headroom" in out.stderr and "Traceback" not in out.stderr


def test_launch_nproc_spellings():
    assert launch_nproc("torchrun --nproc-per-node 4 serve.py") == 4
    assert launch_nproc("torchrun --nproc_per_node=8 serve.py") == 8
    assert launch_nproc("python serve.py") is None
    with pytest.raises(ConfigError, match="runtime.launch"):
        parse_config({"from_pretrained": {}, "runtime": {"launch": 2}})


@pytest.mark.slow
def test_tensor_parallel_runs_for_real_under_torchrun(llama, tmp_path):
    """Two CPU ranks (gloo), started by the runner through torchrun: rank 0's timings, both
    ranks' results merged, logits equal to one process's within the fp32 noise."""
    from autotune.quality import compare, load_logits
    from autotune.runner import ForkRunner

    runner = ForkRunner(timeout_s=240, workdir=tmp_path / "runs")
    base = {"model": str(llama), "workload": {"batch_size": 2, "prompt_len": 16, "new_tokens": 6, "padding": True},
            "reps": 2, "min_reps": 2, "quality_steps": 3, "seed": 0, "memory_budget": None, "fault": None}
    try:
        tp = runner.run({**base, "label": "tp", "nproc": 2,
                         "config": {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa",
                                                        "distributed_config": {"tp_plan": "auto", "tp_size": 2}},
                                    "generate": {}, "runtime": {"launch": "torchrun --nproc-per-node 2 x.py"}}})
        one = runner.run({**base, "label": "one", "config": {"from_pretrained": {"dtype": "float32", "attn_implementation": "sdpa"},
                                                              "generate": {}, "runtime": {}}})
    finally:
        runner.close()
    assert tp["status"] == "ok", tp.get("error")
    assert tp["process"] == "torchrun" and tp["world_size"] == 2
    assert len(tp["runs"]) == 2 and all(r["decode_tok_s"] > 0 for r in tp["runs"])
    assert (Path(tp["dir"]) / "result.rank1.json").is_file()
    m = compare(load_logits(one["dir"]), load_logits(tp["dir"]))
    assert m["top1"] == 1.0 and m["kl"] < 1e-4 and not math.isnan(m["kl"])


@pytest.mark.slow
def test_failing_rank_ends_the_launch_without_waiting_for_the_timeout(llama, tmp_path):
    from autotune.runner import ForkRunner

    runner = ForkRunner(timeout_s=240, workdir=tmp_path / "runs")
    try:
        r = runner.run({"model": str(llama), "label": "tp-bad", "nproc": 2, "workload": {"batch_size": 1, "prompt_len": 8, "new_tokens": 2},
                        "reps": 1, "seed": 0, "memory_budget": None, "fault": None, "quality_steps": 1,
                        "config": {"from_pretrained": {"dtype": "float32", "distributed_config": {"tp_plan": "auto", "tp_size": 3}},
                                   "generate": {}, "runtime": {}}})
    finally:
        runner.close()
    # transformers 5.17: "tp_size (3) * fsdp_size (1) is not equal to world_size (2)"; 5.23: "The parallel mesh requires 3 processes, but world_size is 2."
    assert r["status"] == "error" and "world_size" in r["error"]
    assert r["wall_s"] < 200


@pytest.mark.parametrize("limit_factor,allocated_share", [(1.0, None), (0.95, None), (0.5, None), (0.1, None), (0.5, 0.8), (0.1, 0.8)])
def test_capacity_ends_with_a_figure_that_ran(llama, limit_factor, allocated_share):
    """The estimate's largest batch is run; if it does not fit, real runs search down (90 %
    first, then bisection, a bounded number of runs); what is reported is the largest that ran.
    With ``allocated_share`` the checks report allocated peaks below the reserved ones, and it is
    reserved memory that reaches the budget (as on a GPU: the caching allocator's blocks)."""
    from autotune.capacity import MAX_SEARCH_RUNS

    plain = Tuner(llama, facts=load_target("h100-80gb"), workload=WORKLOAD, runner=FakeRunner(), check_capacity=False).run()
    estimated = plain.capacity["max_batch_size"]
    assert plain.capacity["checked"] is False and estimated > 1
    runner = FakeRunner()
    limit = runner.max_batch = int(estimated * limit_factor)
    runner.budget_gib = plain.capacity["budget_gib"]
    runner.allocated_share = allocated_share
    r = Tuner(llama, facts=load_target("h100-80gb"), workload=WORKLOAD, runner=runner).run()
    checks = [s for s in runner.specs if s.get("capacity")]
    assert checks[0]["capacity"][0] == {"batch_size": estimated, "prompt_len": WORKLOAD.prompt_len}
    assert 1 <= len(checks) <= 1 + MAX_SEARCH_RUNS and r.capacity["runs"] == len(checks)
    assert r.capacity["checked"] is True
    got = r.capacity["max_batch_size"]
    ran = {c["batch_size"] for s in checks for c in s["capacity"] if c["batch_size"] <= limit}
    assert got in ran and got <= limit, "the figure is one that ran and fitted"
    if limit_factor == 1.0:
        assert len(checks) == 1 and got == estimated and "calibration_from_check" not in r.capacity
    else:
        assert got >= 0.8 * limit, f"the search ends near the real limit ({got} of {limit})"
        assert r.capacity["calibration_from_check"] > r.capacity["calibration"], "calibrated by the runs, the memory model counts more per estimated byte"
    assert r.capacity["max_prompt_len"] == plain.capacity["max_prompt_len"], "the prompt check passed the first time"
