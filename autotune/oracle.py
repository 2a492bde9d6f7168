"""The exhaustive oracle: every candidate of the full space measured longer, each in a fresh
process, to check a tune's pick against (``benchmarks/oracle.py`` runs it on a GPU)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Workload
from .facts import Facts
from .measure import Bench
from .model import read_model
from .fuse import may_fuse
from .space import TORCHAO_KINDS, Space, candidate_config, full_space, int4_group_size, regime, same_candidate
from .trial import STATUS_OK, Trial

# The tune takes 2 timed runs per candidate (3 when they disagree); the oracle five times that.
ORACLE_REPS = 10


def candidates(model_path: str, facts: Facts, workload: Workload, fixed: dict[str, str] | None = None, *, quant: bool = False) -> list[Any]:
    """Every unquantized one-device candidate the rules let through, placed as the tune places
    them (each compiled one also with fused projections where the checkpoint has siblings to
    fuse, and each compiled SDPA one also with SDPA's grouped-query attention where the model
    groups its heads); with ``quant``, also torchao's int8 / int4 / float8 of bfloat16 sdpa compiled (with
    either decode loop), the tune's weight-quantization candidates."""
    space = Space(read_model(model_path), facts, workload, fixed=fixed)
    cfgs = list(full_space(space.device, space.half, workload, space.fixed, fuse=may_fuse(space.model), gqa=space.model.gqa is True))
    if quant:
        group = int4_group_size(space.model)
        cfgs += [candidate_config("bfloat16", "sdpa", cache="static", quant=q, loop=loop, int4_group=group) for q in TORCHAO_KINDS
                 for loop in (None, "sync-free")]
    return [space.place("oracle", cfg) for cfg in cfgs]


def _spec(model_path: str, t: Any, workload: Workload, reps: int) -> dict[str, Any]:
    return {"model": model_path, "label": t.label, "config": t.config, "workload": dataclasses.asdict(workload),
            "reps": reps, "min_reps": reps, "quality_steps": 1, "seed": 0, "memory_budget": None, "fault": None, "nproc": 1}


def measure_all(model_path: str, trials: list[Any], workload: Workload, runner: Any, *, reps: int = ORACLE_REPS, procs: int = 1,
                on_row: Any = None, on_progress: Any = None, resume: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Every candidate in ``procs`` fresh processes, ``reps`` timed runs each (all of them: no
    early stop), in rounds: one process of each candidate per round, so a drift of the machine
    over minutes (seen on an H100: the same configuration's process medians rose from 265 to 334
    tok/s over 3 minutes, docs/gpu/h100-v5-noise-1.1b.json) reaches every candidate alike instead
    of favouring the ones measured last. A candidate's speed is the median of its processes'
    medians. ``on_row(row)`` is called as each candidate's last process ends, ``on_progress(row)``
    after each earlier one (to save a run that may be cut short; ``resume`` maps a label to the
    processes such a run finished, and the candidate continues from them)."""
    import statistics

    rows = {t.label: {"label": t.label, "config": t.config, "status": t.status, "reason": t.reason} for t in trials}
    for t in trials:  # processes of an earlier, cut-short run of the same candidates
        if t.status != "dropped" and (resume or {}).get(t.label):
            rows[t.label]["processes"] = list(resume[t.label])  # type: ignore[index]
    live = [t for t in trials if t.status != "dropped"]
    for t in trials:
        if t.status == "dropped" and on_row:
            on_row(rows[t.label])
    for rnd in range(procs):
        for t in list(live):
            row = rows[t.label]
            if len(row.get("processes", [])) > rnd:
                continue  # done before
            r = runner.run(_spec(model_path, t, workload, reps))
            row.setdefault("processes", []).append({"status": r.get("status"), "decode_tok_s": r.get("decode_tok_s"), "ttft_s": r.get("ttft_s"),
                                                    "compile_s": r.get("compile_s"), "wall_s": r.get("wall_s"), "error": r.get("error"),
                                                    "round": rnd, "runs": [x.get("decode_tok_s") for x in r.get("runs", [])],
                                                    "decode_loop": r.get("decode_loop"), "gpu_peak_gib": r.get("gpu_peak_gib")})
            if r.get("status") != STATUS_OK:
                row.update(status=r.get("status"), error=r.get("error"))
                live.remove(t)
            else:
                row.update(gpu_peak_gib=r.get("gpu_peak_gib"), ttft_s=r.get("ttft_s"))
                if rnd < procs - 1:
                    if on_progress:
                        on_progress(row)
                    continue
                per = [p["decode_tok_s"] for p in row["processes"]]
                row.update(status=STATUS_OK, decode_tok_s=statistics.median(per), process_medians=per)
            if on_row:
                on_row(row)
    return [rows[t.label] for t in trials]


def measure_one(model_path: str, t: Any, workload: Workload, runner: Any, *, reps: int = ORACLE_REPS, procs: int = 1) -> dict[str, Any]:
    """One candidate alone (see ``measure_all``)."""
    return measure_all(model_path, [t], workload, runner, reps=reps, procs=procs)[0]


def screen_rows(model_path: str, workload: Workload, runner: Any, rows: list[dict[str, Any]]) -> None:
    """The tune's GPU-time screen of every compiled candidate (one process), written into ``rows``."""
    compiled = [Trial(label=r["label"], stage="oracle", config=r["config"]) for r in rows
                if r.get("status") not in ("dropped", None) and regime(r["config"], "cuda") == "compiled"]
    if not compiled:
        return
    Bench(model_path, workload, runner=runner).screen(compiled)
    by_label = {t.label: t.screen for t in compiled}
    for row in rows:
        s = by_label.get(row["label"])
        if s:
            row["screen_step_ms"] = s.get("step_ms")
            row["screen_error"] = s.get("error")


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r.get("status") == STATUS_OK and r.get("decode_tok_s")]
    return max(ok, key=lambda r: r["decode_tok_s"]) if ok else None


def ratio(pick_config: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The pick's oracle speed over the oracle's best (the same candidate found by its config)."""
    top = best(rows)
    pick = next((r for r in rows if pick_config and same_candidate(r["config"], pick_config)), None) if pick_config else None
    out: dict[str, Any] = {"oracle_best": top and top["label"], "oracle_best_tok_s": top and top["decode_tok_s"],
                           "pick": pick and pick["label"], "pick_tok_s": pick and pick.get("decode_tok_s")}
    if top and pick and pick.get("decode_tok_s"):
        out["ratio"] = round(pick["decode_tok_s"] / top["decode_tok_s"], 3)
    else:
        out["ratio"] = None
        out["why"] = "the pick is not in the oracle's space (quantized or placed differently)" if pick_config and not pick else "no pick or no oracle best"
    return out


def rank_agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the screen (GPU time per decode step) order compiled candidates like their runs?
    Kendall's tau over the pairs, and whether the screen's best is within the margin of the runs' best."""
    pts = [(r["screen_step_ms"], r["decode_tok_s"], r["label"]) for r in rows
           if r.get("screen_step_ms") and r.get("decode_tok_s") and r.get("status") == STATUS_OK]
    if len(pts) < 2:
        return {"pairs": 0}
    agree = disagree = 0
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            s = (pts[i][0] - pts[j][0]) * (pts[j][1] - pts[i][1])  # faster step <-> more tok/s
            agree += s > 0
            disagree += s < 0
    by_screen = min(pts)
    by_runs = max(pts, key=lambda p: p[1])
    return {"pairs": agree + disagree, "kendall_tau": round((agree - disagree) / max(agree + disagree, 1), 3),
            "screen_best": by_screen[2], "runs_best": by_runs[2], "screen_best_over_runs_best": round(by_screen[1] / by_runs[1], 3)}
