"""What fusing leaves reserved on CUDA: a 7 B-wide, 2-layer Llama in bf16, loaded as the tune loads it
(through ``from_pretrained``, whose caching_allocator_warmup puts every weight in one allocation), then
fused (``autotune.fuse``), once as is and once followed by ``torch.cuda.empty_cache()``; beside the
memory estimate's weights and fused copies (``autotune.memory``).

    PYTHONPATH=. python3 benchmarks/fuse_memory.py --out DIR   # writes DIR/fuse-memory.json

Session 20 on an H100 (docs/gpu/h100-s20-fuse-memory.json) ran the same two loads through a version
that called ``empty_cache`` inside the fuse; both reserved 1.770 GiB after fusing, against 1.246.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from autotune.config import Workload, load, parse_config
    from autotune.fuse import fuse_projections
    from autotune.machine import probe
    from autotune.memory import estimate
    from autotune.model import read_model

    gib = 2**30

    def now() -> dict[str, float]:
        return {"allocated_gib": torch.cuda.memory_allocated() / gib, "reserved_gib": torch.cuda.memory_reserved() / gib}

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp)
        fused_cfg = {"from_pretrained": {"dtype": "bfloat16"}, "runtime": {"fuse_projections": True}}
        est = estimate(parse_config(fused_cfg, workload=Workload(batch_size=1, prompt_len=8, new_tokens=4)), read_model(tmp), probe())
        for name, release in (("fused", False), ("fused, then empty_cache", True)):
            torch.cuda.empty_cache()
            model = load(tmp, {"from_pretrained": {"dtype": "bfloat16", "device_map": {"": 0}}, "generate": {}, "runtime": {}})
            before = now()
            report = fuse_projections(model)
            if release:
                torch.cuda.empty_cache()
            rows[name] = {"groups_fused": len(report["fused"]), "loaded": before, "after": now()}
            del model
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "estimate_gib": {"weights": est.weights / gib, "fused_copies": est.fused_copies / gib}}
    (args.out / "fuse-memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
