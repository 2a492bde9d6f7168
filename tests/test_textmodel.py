"""The trained model (autotune/textmodel.py): training on the stdlib's sources lowers held-out
perplexity, and quality figures of configs against a reference separate a lossless change from
a lossy one. The 1.1 B-shape model trained on the H100 is in docs/PERFORMANCE.md (issue 12)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from autotune import textmodel  # noqa: E402
from autotune.space import candidate_config  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    stats = textmodel.train(out, shape=textmodel.TINY, vocab_size=512, seq_len=64, batch_size=16, seconds=8, limit_files=200, lr=2e-3)
    return out, stats


def test_held_out_files_are_never_trained_on():
    train, held = textmodel.corpus_files()
    assert train and held and not set(train) & set(held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15  # one file in ten
    assert textmodel.corpus_files() == (train, held), "the split is fixed"


@pytest.mark.slow
def test_training_lowers_held_out_perplexity(trained):
    out, stats = trained
    assert stats["steps"] > 20 and json.loads((out / "autotune-train.json").read_text())["steps"] == stats["steps"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == stats["vocab"]
    ids = textmodel.heldout_windows(out, 64, 8)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    untrained = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    ppl, ppl0 = textmodel.perplexity(model, ids), textmodel.perplexity(untrained, ids)
    assert ppl < 0.5 * ppl0, (ppl, ppl0)  # an untrained model is near uniform (~512)


@pytest.mark.slow
def test_quality_figures_of_configs(trained):
    out, _ = trained
    cfgs = {"float32": candidate_config("float32", "sdpa"), "bfloat16": candidate_config("bfloat16", "sdpa"),
            "int8wo": candidate_config("bfloat16", "sdpa", quant="torchao-int8wo")}
    for c in cfgs.values():
        c["from_pretrained"]["device_map"] = "cpu"
    pytest.importorskip("torchao")
    q = textmodel.compare_configs(out, cfgs, reference="float32", length=64, count=8)
    assert q["float32"]["kl"] == 0.0 and q["float32"]["top1"] == 1.0
    for name in ("bfloat16", "int8wo"):
        assert 0 < q[name]["kl"] < 0.05 and q[name]["top1"] > 0.9, (name, q[name])
        assert abs(q[name]["ppl"] / q["float32"]["ppl"] - 1) < 0.05
