"""The sync-free loop's own CUDA graphs (``decode.GRAPH_STEPS`` steps a replay) against
torch.compile's (one replay a step) and transformers' compiled loop, in one process on one
model, batch 1, prompt 512, 128 new tokens, greedy.

    PYTHONPATH=. python3 benchmarks/gpu_graphs.py --shape 1.1b --out DIR
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_graphs.py --shape 7b --quant torchao-int4wo --out DIR   # torchao as a wheel
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_graphs.py --shape 7b --quant 'torchao-int4wo:{"group_size": 256}' --out DIR
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_graphs.py --shape 7b \
        --quant '{"_type": "UIntxWeightOnlyConfig", "_version": 1, "_data": {"bit_width": 4, "group_size": 128}}' --out DIR   # gemlite's kernels (its wheel too)
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_graphs.py --shape 7b --skip-transformers --steps 1 --fuse --sdpa-gqa --skip-unfused \
        --quant torchao-int4wo --out DIR   # bf16 and int4, each fused and with SDPA's GQA

Each row: warm-up calls (the first compiles), then the median of 5 timed generates; decode
tok/s from the first new token (a synchronised hook) to the end. Every row's tokens are
compared with the first row's on the same prompt. ``gpu_ms_per_token`` sums the
kernels the profiler saw in one more generate (what the GPU itself needs a token); the gap to
the wall time per token is host work the GPU waited for; ``top_kernels`` names the 12 kernels
that took most of it (counts and time per token, prefill included). Also: the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_tune import SHAPES, build, error_text  # noqa: E402


def copy_bandwidth(torch) -> float:
    """TB/s of a device-to-device copy, bytes read plus written (as ../shared/MEASURED.md counts)."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / 20
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / s / 1e12


def run(torch, model, x, kw, loop: dict | None, warm: int, reps: int, trace: Path | None = None) -> dict:
    from autotune import decode
    from autotune.worker import _ChunkClock

    def once():
        first = {}
        if loop is None:  # the worker's streamer clock: put() gets each token on the host
            clock = _ChunkClock()
            extra = {"streamer": clock}
        else:
            extra = {"custom_generate": decode.generate, "first_token_hook": lambda: (torch.cuda.synchronize(), first.setdefault("t", time.perf_counter())), **loop}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(x, **kw, **extra)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tf = clock.times[0] if loop is None else first["t"]
        n = out.shape[1] - x.shape[1]
        return out, {"ttft_s": tf - t0, "decode_tok_s": (n - 1) * x.shape[0] / (t1 - tf), "total_s": t1 - t0}

    t = time.perf_counter()
    for _ in range(warm):
        out, _ = once()
    warm_s = time.perf_counter() - t
    runs = [once()[1] for _ in range(reps)]
    row = {"warm_s": round(warm_s, 1), "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
           "runs": [round(r["decode_tok_s"], 1) for r in runs], "ttft_ms": round(1e3 * statistics.median(r["ttft_s"] for r in runs), 2)}
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
        with profile(activities=acts) as prof:
            once()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in averages)
        # what the GPU spends a token on, by kernel (e.g. whether q/k/v became one matmul)
        top = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: e.self_device_time_total, reverse=True)[:12]
        row["top_kernels"] = [{"name": e.key[:90], "per_token": round(e.count / kw["max_new_tokens"], 2),
                               "us_per_token": round(e.self_device_time_total / kw["max_new_tokens"], 2)} for e in top]
        if trace:
            prof.export_chrome_trace(str(trace))
        # the gaps between kernels: what the GPU waited for
        ks = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
        gaps = [b[0] - a[1] for a, b in zip(ks, ks[1:]) if b[0] > a[1]]
        row["kernels_per_token"] = round(len(ks) / kw["max_new_tokens"], 1)
        row["gap_ms_per_token"] = round(sum(gaps) / 1e3 / kw["max_new_tokens"], 3)
        row["gaps_over_20us"] = sum(1 for g in gaps if g > 20)
        row["gpu_ms_per_token"] = round(kernel_us / 1e3 / (kw["max_new_tokens"] * 1.0), 3)
        row["wall_ms_per_token"] = round(1e3 / (row["decode_tok_s"] / x.shape[0]), 3)
    except Exception as e:  # the profiler is a diagnosis, not the measurement
        row["profiler_error"] = f"{type(e).__name__}: {e}"[:200]
    return row, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--quant", action="append", default=[], metavar="KIND[:JSON]",
                    help="torchao kinds (space.TORCHAO_KINDS, e.g. torchao-int4wo) to run with the loop; JSON after a colon "
                         "overrides the kind's config fields, e.g. 'torchao-int4wo:{\"group_size\": 256}'; or a whole torchao config "
                         "in TorchAoConfig's JSON form, '{\"_type\": ..., \"_version\": ..., \"_data\": {...}}'")
    ap.add_argument("--options-for", choices=["all", "quant"], default="all", help="which models get the --options rows")
    ap.add_argument("--steps", default="1,0", help="graph_steps values for bf16 (0: torch.compile's CUDA graphs)")
    ap.add_argument("--quant-steps", default="1", help="graph_steps values for each --quant")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                    help="the model's dtype in every row (gemlite's 4-bit GEMM wants float16: torchao's HQQ scales are float16)")
    ap.add_argument("--budget-s", type=float, default=480, help="skip what is left after this long")
    ap.add_argument("--skip-transformers", action="store_true", help="no row for transformers' own compiled loop")
    ap.add_argument("--trace", action="store_true", help="save a profiler trace of each row (DIR/trace-*.json)")
    ap.add_argument("--options", action="append", default=[], metavar="JSON",
                    help="more loop rows (graph_steps=1; bf16 and each --quant), each compiled with these inductor options as "
                         "generate.compile_config.options, e.g. '{\"freezing\": true}' (triton.cudagraphs is added: the loop's own graph)")
    ap.add_argument("--fuse", action="store_true",
                    help="run the bf16 rows a second time on the model with q/k/v and gate/up fused (runtime.fuse_projections); "
                         "each --quant also (torchao's groups quantized whole from the checkpoint)")
    ap.add_argument("--skip-unfused", action="store_true", help="with --fuse: no rows of the model as loaded (nor of each --quant unfused)")
    ap.add_argument("--backend", action="append", default=[], metavar="NAME",
                    help="run the bf16 rows again with SDPA forced to this backend (runtime.sdpa_backend: cudnn, efficient, math, "
                         "flash), on the fused model where --fuse is given")
    ap.add_argument("--sdpa-gqa", action="store_true",
                    help="run the bf16 rows again with runtime.sdpa_gqa (SDPA's enable_gqa instead of repeat_kv, autotune.gqa), "
                         "on the fused model where --fuse is given; each --quant also")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    T0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = build(Path(f"/tmp/llama-{args.shape}"), SHAPES[args.shape])
    import torch

    from autotune.config import load, reset_runtime
    from autotune.space import candidate_config

    res = {"shape": args.shape, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "copy_tb_s": round(copy_bandwidth(torch), 3),
           "build_s": round(time.perf_counter() - T0, 1), "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 32000, (1, 512), generator=g).cuda()
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=128, min_new_tokens=128)

    first_tokens = None  # the first variant's first row's

    def save():
        (out / f"graphs-{args.shape}.json").write_text(json.dumps(res, indent=1))

    def variant(name, quant, rows, fuse=False, backend=None, gqa=False):
        nonlocal first_tokens
        raw = (quant or "").startswith("{")  # a torchao config of no candidate kind, e.g. a prototype's
        kind, _, fields = ("", "", "") if raw else (quant or "").partition(":")
        cfg = candidate_config(args.dtype, "sdpa", quant=kind or None, backend=backend)
        if raw:
            cfg["from_pretrained"]["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": json.loads(quant)}}
        if fields:  # e.g. another int4 group size than the candidate's
            data = cfg["from_pretrained"]["quantization_config"]["quant_type"]["default"]["_data"]
            data.update(json.loads(fields))
        cfg["from_pretrained"]["device_map"] = {"": 0}
        if gqa:
            cfg["runtime"]["sdpa_gqa"] = True
        if fuse:
            cfg["runtime"]["fuse_projections"] = True
        cfg["generate"] = {"cache_implementation": "static"}
        t = time.perf_counter()
        reset_runtime()  # every SDPA backend enabled again; load applies this variant's
        # and nothing compiled for an earlier variant is replayed: dynamo does not guard on the SDPA
        # backend flags (session 16's "math" row replayed the cuDNN row's graph, warm-up 0.5 s), and
        # the loop keys its captured graphs by id(model), which a new model can reuse
        from autotune import decode

        torch._dynamo.reset()  # the loop's compiled step recompiles on its next call
        decode.release()
        try:
            model = load(path, cfg)
        except Exception as e:  # e.g. a torchao prototype whose kernel package does not match: the other rows still run
            res["rows"].append({"label": name, "error": error_text(e, "load: ")})
            print(json.dumps(res["rows"][-1]), flush=True)
            save()
            return
        if fuse:
            from autotune.fuse import classes

            res.setdefault("fused_groups", {})[name] = sum(isinstance(m, classes()[0]) for m in model.modules())  # per variant: torchao's may fuse fewer
        load_s = time.perf_counter() - t
        ref = None
        for label, loop in rows:
            if time.perf_counter() - T0 > args.budget_s:
                res["rows"].append({"label": f"{name} {label}", "skipped": "budget"})
                continue
            try:
                tr = out / f"trace-{len(res['rows'])}.json" if args.trace else None
                row, toks = run(torch, model, x, kw, loop, warm=3 if loop is None else 2, reps=5, trace=tr)
            except Exception as e:
                row, toks = {"error": error_text(e)}, None
            row = {"label": f"{name} {label}", "load_s": round(load_s, 1), **row}
            if toks is not None:
                if ref is None:
                    ref = toks
                if first_tokens is None:
                    first_tokens = toks
                row["tokens_equal_first_row"] = bool(torch.equal(toks, ref))
                row["tokens_equal_first_variant"] = bool(torch.equal(toks, first_tokens))  # e.g. sdpa-gqa against the copies
                row["agree_first_row"] = int((toks[0, 512:] == ref[0, 512:]).sum())
                weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9 if not quant else None
                row["weight_gb"] = weight_gb and round(weight_gb, 3)
                if "decode_tok_s" in row and weight_gb:
                    row["copy_share"] = round(row["decode_tok_s"] * weight_gb / res["copy_tb_s"] / 1e3, 3)
            row["elapsed_s"] = round(time.perf_counter() - T0, 1)
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
            save()
        del model
        torch.cuda.empty_cache()

    steps = [int(s) for s in args.steps.split(",") if s != ""]
    first = [] if args.skip_transformers else [("transformers' compiled loop", None)]
    from transformers import CompileConfig

    more = [(f"sync-free graph_steps=1 options={o}", {"graph_steps": 1, "compile_config": CompileConfig(options={**json.loads(o), "triton.cudagraphs": True})})
            for o in args.options]
    plain_rows = [(f"sync-free graph_steps={k}", {"graph_steps": k}) for k in steps] + (more if args.options_for == "all" else [])
    if not (args.fuse and args.skip_unfused):
        variant(f"{args.dtype} sdpa", None, first + plain_rows)
    if args.fuse:
        variant(f"{args.dtype} sdpa fused", None, plain_rows, fuse=True)
    if args.sdpa_gqa:
        variant(f"{args.dtype} sdpa sdpa-gqa" + (" fused" if args.fuse else ""), None, plain_rows, fuse=args.fuse, gqa=True)
    for b in args.backend:
        variant(f"{args.dtype} sdpa:{b}" + (" fused" if args.fuse else ""), None, plain_rows, fuse=args.fuse, backend=b)
    for q in args.quant:
        qs = [int(s) for s in args.quant_steps.split(",") if s != ""]
        q_rows = [(f"sync-free graph_steps={k}", {"graph_steps": k}) for k in qs] + more
        if not (args.fuse and args.skip_unfused):
            variant(f"{args.dtype} sdpa {q}", q, q_rows)
        if args.fuse or args.sdpa_gqa:  # torchao's groups fused from the checkpoint (autotune.fuse), as the bf16 rows
            variant(f"{args.dtype} sdpa {q}" + (" sdpa-gqa" if args.sdpa_gqa else "") + (" fused" if args.fuse else ""), q, q_rows,
                    fuse=args.fuse, gqa=args.sdpa_gqa)
    from autotune import decode

    res["decode_stats"] = dict(decode.stats)
    res["total_s"] = round(time.perf_counter() - T0, 1)
    save()
    print(json.dumps({"total_s": res["total_s"], "decode_stats": res["decode_stats"]}), flush=True)


if __name__ == "__main__":
    main()
