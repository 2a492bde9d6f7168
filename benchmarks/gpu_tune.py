"""The GPU measurements of docs/PERFORMANCE.md, one phase per device call.

    PYTHONPATH=. python3 benchmarks/gpu_tune.py --phase a --out DIR   # 1.1 B, batch 1: tune + exhaustive oracle
    PYTHONPATH=. python3 benchmarks/gpu_tune.py --phase b --out DIR   # 1.1 B batch 1 again (wall time), batch 8 tune, the pick re-run 3x
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_tune.py --phase c --out DIR   # memory objective with bitsandbytes (wheel)
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_tune.py --phase d --out DIR   # 1.1 B batch 1 (wall time, capacity check), memory objective on the dynamic cache
    PYTHONPATH=. python3 benchmarks/gpu_tune.py --phase e --out DIR   # 1.1 B batch 1 tune wall: first on the machine (cold compiles), then again (inductor's caches warm)
    PYTHONPATH=. python3 benchmarks/gpu_tune.py --phase f --out DIR   # 1.1 B batch 8 and 7 B batch 1 tunes (7 B built in /tmp/llama-7b)

The model is a random Llama of the 1.1 B shape (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000) saved in bf16, built locally on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


LLAMA_1_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
SHAPES = {"1.1b": LLAMA_1_1B, "7b": LLAMA_7B}


def llama_config(shape: dict | None = None):
    """The LlamaConfig of the benchmarks' random models: ``shape`` (default: the 1.1 B one), a
    32,000-token vocabulary, 4,096 positions."""
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 4096, **(shape or LLAMA_1_1B)})


def build(path: Path, shape: dict | None = None) -> Path:
    """A random Llama of ``shape`` (default: the 1.1 B one), initialised on the GPU (on the CPU
    where there is none), saved in bf16."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def error_text(e: BaseException, where: str = "") -> str:
    """An exception as one string for a result row: its start and its end (a Triton
    CompilationError names the failing line first and the reason last)."""
    s = f"{where}{type(e).__name__}: {e}"
    return s if len(s) <= 800 else s[:400] + " [...] " + s[-400:]


def prepare(out_dir: str, model: Path, shape: dict | None = None) -> tuple[Path, Path]:
    """The output folder, the result cache out of the way, and the model (built if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AUTOTUNE_CACHE_DIR", "/tmp/autotune-cache")
    t0 = time.perf_counter()
    path = build(model, shape)
    print(f"model {model.name} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return out, path


def cli(out: Path, name: str, *args: str) -> dict:
    """Run `autotune tune ... --json` as a user would; keep the report and the wall time."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "autotune", "tune", *args, "--json"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:], flush=True)
    report = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {"error": p.stderr[-2000:]}
    report["cli_wall_s"] = round(wall, 1)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(f"{name}: {wall:.1f} s wall, pick: {report.get('pick')}", flush=True)
    for t in report.get("trials", []):
        s = t.get("summary") or {}
        walls = [m.get("wall_s") for m in t.get("measurements", [])]
        if "seq_s" in s:  # an encoder's forward
            speed = f"{s['seq_s']} seq/s p50 {s.get('latency_p50_ms')} ms p99 {s.get('latency_p99_ms')} ms cos {(t.get('quality') or {}).get('cos_mean')}"
        else:
            speed = f"{s.get('decode_tok_s')} tok/s ttft {s.get('ttft_ms')} ms"
        print(f"  {t['label'][:58]:58} {t['status']:12} {speed} peak {s.get('gpu_peak_gib')} "
              f"est {t.get('estimate_gib')} runs {s.get('runs')} wall {walls} {t['reason'][:90]}", flush=True)
        if (t.get("screen") or {}).get("step_ms"):
            print(f"    screen {t['screen']['step_ms']:.3f} ms/step", flush=True)
    for row in report.get("timeline", []):
        print("  timeline", json.dumps(row), flush=True)
    print("  capacity", json.dumps(report.get("capacity")), flush=True)
    for n in report.get("notes", []):
        print("  note:", n[:200], flush=True)
    return report


def oracle(out: Path, model: Path, report: dict, factor: int = 5) -> None:
    """Every measured candidate again, five times longer, each in a fresh process."""
    from autotune.runner import ForkRunner

    runner = ForkRunner(timeout_s=900, preload_model_type="llama")
    rows = []
    try:
        for t in report["trials"]:
            if t["status"] != "ok" or t["stage"] == "baseline":
                continue
            spec = {"model": str(model), "label": t["label"], "config": t["config"], "workload": report["workload"],
                    "reps": 3 * factor, "quality_steps": 1, "seed": 0, "memory_budget": None, "fault": None}
            r = runner.run(spec)
            rows.append({"label": t["label"], "status": r.get("status"), "decode_tok_s": r.get("decode_tok_s"), "ttft_s": r.get("ttft_s"),
                         "tune_decode_tok_s": (t.get("summary") or {}).get("decode_tok_s"), "error": r.get("error")})
            print(f"oracle {t['label'][:50]:50} {r.get('status')} {r.get('decode_tok_s')}", flush=True)
    finally:
        runner.close()
    best = max((r for r in rows if r["decode_tok_s"]), key=lambda r: r["decode_tok_s"], default=None)
    pick = next((r for r in rows if r["label"] == report.get("pick")), None)
    verdict = {"oracle_best": best, "pick": pick,
               "pick_within_3pct": bool(best and pick and pick["decode_tok_s"] >= 0.97 * best["decode_tok_s"])}
    (out / "oracle-b1.json").write_text(json.dumps({"rows": rows, **verdict}, indent=1))
    print(json.dumps(verdict), flush=True)


def reruns(out: Path, model: Path, report: dict, n: int = 3) -> None:
    """The pick loads and generates, three times, in fresh processes (no OOM)."""
    from autotune.runner import ForkRunner

    runner = ForkRunner(timeout_s=900, preload_model_type="llama")
    pick = next(t for t in report["trials"] if t["label"] == report["pick"])
    res = []
    try:
        for _ in range(n):
            r = runner.run({"model": str(model), "label": pick["label"], "config": pick["config"], "workload": report["workload"],
                            "reps": 1, "quality_steps": 1, "seed": 0, "memory_budget": None, "fault": None})
            res.append({"status": r.get("status"), "decode_tok_s": r.get("decode_tok_s"), "gpu_peak_gib": r.get("gpu_peak_gib"), "error": r.get("error")})
    finally:
        runner.close()
    (out / "reruns-b8.json").write_text(json.dumps(res, indent=1))
    print("reruns", json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["a", "b", "c", "d", "e", "f"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/llama-1.1b")
    args = ap.parse_args()
    out, model = prepare(args.out, Path(args.model))
    if args.phase == "a":
        rep = cli(out, "tune-b1", str(model), "--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
        if rep.get("trials"):
            oracle(out, model, rep)
    elif args.phase == "b":
        cli(out, "tune-b1-again", str(model), "--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
        rep = cli(out, "tune-b8", str(model), "--batch-size", "8", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
        if rep.get("pick"):
            reruns(out, model, rep)
    elif args.phase == "e":
        b1 = [str(model), "--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache"]
        cli(out, "tune-b1-cold", *b1)
        cli(out, "tune-b1-warm", *b1)
        left = subprocess.run(["bash", "-c", "ps -eo pid,args | grep -E 'autotune[.](worker|_forkserver)|-m autotune ' || true"],
                              capture_output=True, text=True).stdout.strip()
        print(f"autotune processes left after the tunes: {left or 'none'}", flush=True)
    elif args.phase == "f":
        cli(out, "tune-b8", str(model), "--batch-size", "8", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
        big = build(Path("/tmp/llama-7b"), LLAMA_7B)
        cli(out, "tune-7b-b1", str(big), "--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
    elif args.phase == "d":
        cli(out, "tune-b1", str(model), "--batch-size", "1", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")
        cli(out, "tune-b1-memory", str(model), "--objective", "memory", "--quantization", "always", "--cache", "dynamic",
            "--prompt-len", "512", "--new-tokens", "128", "--no-cache", "--timeout", "240")
    else:
        cli(out, "tune-b1-memory", str(model), "--objective", "memory", "--quantization", "always", "--prompt-len", "512", "--new-tokens", "128", "--no-cache")


if __name__ == "__main__":
    main()
