"""Predictions for a machine autotune cannot measure (``--target`` / ``--facts``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .cache import cache_dir, model_fingerprint
from .config import Workload, launch_command, parse_config
from .errors import UserError
from .facts import Facts
from .model import read_model
from .space import Space, finish_config, first_gpu_name
from .trial import Trial


def predict(model_path: str | Path, facts: Facts, workload: Workload, objective: str = "throughput", *, cache_root: Path | None = None) -> Any:
    """The config the rules, the memory model and a documented preference order predict to be
    fastest on a machine autotune cannot measure (``--target`` / ``--facts``).

    Preference order (from docs/MEASURED.md and the rules): on CUDA, FlashAttention-3 on
    Hopper if installed, FlashAttention-2 on Ampere+ if installed, else SDPA; bf16 on Ampere+,
    else fp16; at batch 1 the compiled static cache (5.7x the default on an H100) when triton
    is there; no quantization unless the model does not fit; one GPU when it fits, else
    device_map="auto". On the CPU: SDPA, bf16 with AMX/AVX512-BF16 else fp32, dynamic cache.
    Earlier measurements of the same GPU model, stack, model and workload in the cache win.
    """
    from .tuner import TuneResult

    model = read_model(model_path)
    reasons: list[str] = []
    root = cache_root or cache_dir() / "results"
    if root.is_dir():
        gpu = first_gpu_name(facts)
        for f in sorted(root.glob("*.json")):
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            m = d.get("meta", {})
            if d.get("pick") and m.get("gpu") == gpu and m.get("torch") == facts.package("torch") and m.get("transformers") == facts.package("transformers") \
                    and m.get("model") == model_fingerprint(model) and m.get("workload") == dataclasses.asdict(workload):
                cfg = dict(d["pick"])
                cfg["autotune"] = {**cfg.get("autotune", {}), "measured": False, "reasons": [f"measured earlier on a {gpu} with the same stack (cache {f.name})"]}
                return TuneResult(config=cfg, trials=[], pick=None, baseline=None, facts=facts, model=model, workload=workload,
                                  objective=objective, wall_s=0.0, measured=False, notes=cfg["autotune"]["reasons"])
    space = Space(model, facts, workload)  # judges only: nothing is run
    device, half = space.device, space.half
    options: list[tuple[str, str]] = []
    if device == "cuda":
        options += [(half, attn) for attn in ("flash_attention_3", "flash_attention_2", "sdpa", "eager")]
    else:
        options += [(half, "sdpa"), ("float32", "sdpa")]
    chosen = None
    for dtype, attn in options:
        t = space.make("predict", dtype, attn)
        if t.status != "dropped":
            chosen = t
            reasons.append(f"attention: {attn} (the first of flash_attention_3 > flash_attention_2 > sdpa > eager that the rules allow here)")
            reasons.append(f"dtype: {dtype} ({'bf16 needs compute capability 8.0' if device == 'cuda' else 'CPU'})")
            break
        first, *rest = t.errors or [t.reason]  # the most fundamental first (space.judge orders them), whole
        reasons.append(f"not {attn} in {dtype}: {first}" + (f" (and {len(rest)} more: `autotune check` lists them)" if rest else ""))
    if chosen is None:
        raise UserError("no configuration passes the rules on these facts; run `autotune doctor` with them")
    cfg = chosen.config
    if device == "cuda" and workload.batch_size <= 8 and facts.package("triton"):
        trial = space.make("predict", cfg["from_pretrained"]["dtype"], cfg["from_pretrained"]["attn_implementation"], cache="static", compile_=True)
        if trial.status != "dropped":
            cfg = trial.config
            reasons.append("cache: static, compiled by transformers (5.7x / 3.2x the dynamic cache at batch 1 on an H100, docs/MEASURED.md)")
    dm = cfg["from_pretrained"].get("device_map")
    if dm == "auto":
        tp = _predict_tp(space, cfg)
        if tp is not None:
            cfg = tp.config
            reasons.append(f"placement: tensor parallel over {parse_config(cfg).tp_size} NVLink-connected GPUs (the model does not fit one GPU; "
                           "every GPU works on every token, where a device_map split leaves all but one idle)")
        else:
            reasons.append("placement: device_map=auto, the model does not fit one GPU by the memory estimate "
                           "(tensor parallel not predicted: it needs NVLink between the GPUs in the facts and head counts that divide)")
    if chosen.estimate_gib is not None:
        reasons.append(f"memory estimate: {chosen.estimate_gib} GiB")
    config = finish_config(cfg, facts, workload, objective, measured=False, reasons=reasons)
    return TuneResult(config=config, trials=[chosen], pick=chosen, baseline=None, facts=facts, model=model, workload=workload,
                      objective=objective, wall_s=0.0, measured=False, notes=reasons)


def _predict_tp(space: Space, cfg: dict[str, Any]) -> Trial | None:
    """The smallest tensor-parallel group that the rules allow, whose GPUs all have NVLink."""
    from .engine import Context

    fp = {k: v for k, v in cfg["from_pretrained"].items() if k not in ("device_map", "max_memory")}
    k = 2
    while k <= len(space.gpu_indexes()):
        t = space.trial("predict", {"from_pretrained": {**fp, "distributed_config": {"tp_plan": "auto", "tp_size": k}},
                                    "generate": dict(cfg["generate"]), "runtime": {**cfg["runtime"], "launch": launch_command(k)}})
        ctx = Context(space.facts, space.model, parse_config(t.config, workload=space.workload))
        if t.status != "dropped" and ctx.derived().get("tp_nvlink") is True and ctx.mem().get("fits") is True:
            return t
        k *= 2
    return None
