"""torchao groups fused from the checkpoint (autotune.fuse): what it costs to load, and whether
every group of a real shape fuses with each part's quantized rows unchanged. A random Llama of
the 1.1 B shape (bf16, saved with save_pretrained) loaded with torchao int8 weight-only as
loaded and fused, alternately; then one forward of both on the same tokens. Runs on the CPU
(int8 weight-only has CPU kernels; int4's tile-packed layout needs CUDA: pass --kind int4 there).

    python benchmarks/torchao_fuse_load.py --out docs/cpu/torchao-fuse-load-1.1b.json
    PYTHONPATH=/tmp/site:. python3 benchmarks/torchao_fuse_load.py --shape 7b --model /tmp/llama-7b --kind int4 --device cuda --out DIR/x.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.1b")
    ap.add_argument("--model", help="the model folder (built there at --shape if missing; default: a temporary one)")
    ap.add_argument("--kind", choices=["int8", "int4"], default="int8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import torchao
    import transformers

    from autotune.config import load
    from autotune.fuse import _same_quantized, classes
    from autotune.space import TORCHAO_KINDS
    from gpu_tune import SHAPES, build

    quant = {"quant_method": "torchao", "quant_type": {"default": TORCHAO_KINDS[f"torchao-{args.kind}wo"]}}
    dmap = "cpu" if args.device == "cpu" else {"": 0}
    res: dict = {"shape": args.shape, "kind": args.kind, "device": args.device, "torch": torch.__version__,
                 "transformers": transformers.__version__, "torchao": torchao.__version__, "cpu": platform.processor() or platform.machine(),
                 "threads": torch.get_num_threads(), "load_s": {"as loaded": [], "fused": []}}
    with tempfile.TemporaryDirectory() as d:
        path = Path(args.model) if args.model else Path(d) / "model"
        build(path, SHAPES[args.shape])
        models = {}
        for fuse in [False, True] * args.reps:
            name = "fused" if fuse else "as loaded"
            models.pop(name, None)
            cfg = {"from_pretrained": {"dtype": "bfloat16", "device_map": dmap, "quantization_config": quant}, "generate": {},
                   "runtime": {"fuse_projections": fuse}}
            t = time.perf_counter()
            models[name] = load(path, cfg)
            res["load_s"][name].append(round(time.perf_counter() - t, 2))
            print(name, res["load_s"][name][-1], "s", flush=True)
        plain, fused = models["as loaded"], models["fused"]
        FusedLinear = classes()[0]
        res["fused_groups"] = sum(isinstance(m, FusedLinear) for m in fused.modules())
        res["groups"] = 2 * len(plain.model.layers)
        same = 0
        for a, b in zip(plain.model.layers, fused.model.layers):
            for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
                pa, pb = getattr(a, parent), getattr(b, parent)
                same += all(_same_quantized(getattr(pb, n).weight, getattr(pa, n).weight.detach()) for n in names)
        res["groups_with_the_parts_rows"] = same
        ids = torch.randint(3, 32000, (1, 64), generator=torch.Generator().manual_seed(0)).to(next(plain.parameters()).device)
        with torch.inference_mode():
            la, lb = plain(ids).logits.float(), fused(ids).logits.float()
        res["logits_max_abs_diff"] = float((la - lb).abs().max())
        res["logits_max_abs"] = float(la.abs().max())
        res["argmax_equal"] = bool(torch.equal(la.argmax(-1), lb.argmax(-1)))
    res["load_s_median"] = {k: statistics.median(v) for k, v in res["load_s"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
