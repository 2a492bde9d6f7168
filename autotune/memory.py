"""Memory estimate: weights in the chosen dtype / quantization, KV cache, activations, overhead.

Weights come from safetensors headers when the model folder has them (exact bytes per
tensor), else from the shape in config.json. bitsandbytes and torchao leave embeddings and
``lm_head`` unquantized (transformers' ``get_keys_to_not_convert``), so they stay in the compute
dtype.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .config import TORCHAO_UINTX, Candidate
from .facts import UNKNOWN, Facts, parse_version
from .fuse import grouped_tensors
from .model import ModelSpec

GIB = 1024**3
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
CUDA_CONTEXT = int(0.5 * GIB)  # context + cuBLAS/cuDNN workspaces, as seen on an H100 with torch 2.11
# Fusing projections on a GPU (runtime.fuse_projections) holds the replaced parts' memory as well
# as the fused weights: transformers 5.17 carves every weight of a load out of one allocation
# (modeling_utils.caching_allocator_warmup, "one large call to Malloc"), so the freed parts are
# holes that torch.cuda.empty_cache cannot give back, and the fused weights, each larger than a
# part, take new memory. Measured on an H100 (docs/PERFORMANCE.md, issue 12 session 20): a
# 2-layer 7 B-wide Llama in bf16 reserved 0.52 GiB more after fusing, its fused weights' bytes,
# with or without empty_cache; the 7 B shape reserved 17.97 GiB fused against 12.83 GiB at its
# peak allocation (some holes reused), and 7 B tunes that warmed such processes up side by side
# ran out of memory. The estimate counts the fused weights' bytes on top: an upper bound.
FRAGMENTATION = 1.10  # the caching allocator's slack over live tensors


@dataclass(frozen=True)
class Estimate:
    load_dtype: str
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    fused_copies: int = 0  # what fusing projections holds beside the weights on a GPU (see above)

    @property
    def total(self) -> int:
        return int((self.weights + self.fused_copies + self.kv_cache + self.activations) * FRAGMENTATION) + self.overhead

    def gib(self, x: int) -> float:
        return round(x / GIB, 2)


def load_dtype(candidate: Candidate, model: ModelSpec | None, transformers: Any) -> Any:
    """The dtype weights end up in: the one asked for, else what the facts' transformers does
    by default (4.x: float32; 5.x: the checkpoint's dtype, like ``dtype="auto"``)."""
    d = candidate.dtype
    if d in (None, "auto"):
        parsed = parse_version(transformers)
        major = parsed.major if parsed else UNKNOWN
        if d is None and major is UNKNOWN:
            return UNKNOWN
        if d is None and major < 5:
            return "float32"
        if model is None:
            return UNKNOWN
        ck = model.checkpoint_dtype
        return ck if ck in BYTES else "float32"
    return d


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not any(s in name for s in ("embed", "lm_head", "wte", "wpe", "norm"))


def torchao_bytes(candidate: Candidate, shape: tuple[int, ...] | None = None) -> float | None:
    """Bytes of one Linear weight of ``shape`` (out, in) quantized by the candidate's torchao
    config; without a shape, bytes per weight, leaving out the row scales and int4's padding;
    None when it is no torchao config. From torchao 0.18.0's tensors:
    ``Int4TilePackedTo4dTensor`` pads ``in`` to a multiple of 1,024 and ``out`` to one of 8, then
    packs two 4-bit values per byte plus a bf16 scale and zero per group
    (``pack_tinygemm_scales_and_zeros``; group 128 by default); the ``plain`` int4 layout the same
    without padding; ``Int8Tensor`` one byte per value and per row an fp32 scale and an int8 zero
    point; ``Float8Tensor`` (PerRow) one byte per value and an fp32 scale per row; the
    gemlite-backed ``UIntxWeightOnlyConfig`` ``bit_width`` bits per value, a scale and a zero per
    group (fp16 or fp32: counted as 8 bytes). Other classes follow transformers 5.17's own guess
    (``TorchAoHfQuantizer.quantized_param_size``: half a byte where the class name says
    ``4weight``, else one) with 8 bytes per row for scales and zero points."""
    if candidate.quantization != "torchao":
        return None
    kind = str(candidate.torchao_type or "")
    group = candidate.torchao_group_size if isinstance(candidate.torchao_group_size, int) else 128
    out, inp = (shape[0], shape[-1]) if shape else (1, 1)
    if kind == "Int4WeightOnlyConfig":
        if shape and candidate.torchao_packing_format == "tile_packed_to_4d":
            out, inp = -(-out // 8) * 8, -(-inp // 1024) * 1024
        per, row = 0.5 + 4 / group, 0
    elif kind in TORCHAO_UINTX:
        bits = candidate.torchao_bit_width if candidate.torchao_bit_width in (4, 8) else 4
        per, row = bits / 8 + 8 / group, 0
    elif kind in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
        per, row = 1.0, 5
    elif kind in ("Float8WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig"):
        per, row = 1.0, 4
    else:
        per, row = (0.5 if re.search(r"4weight", kind.lower()) else 1.0), 8
    if not shape:
        return per
    return out * inp * per + out * row


def torchao_skips(candidate: Candidate, shape: tuple[int, ...]) -> str | None:
    """Why the candidate's torchao config leaves a Linear weight of ``shape`` (out, in) as loaded
    (None: it quantizes it). torchao 0.18.0 returns such a weight unchanged and says so only in
    an INFO log: ``Int4WeightOnlyConfig`` where ``in`` is not a multiple of its group size
    (``_int4_weight_only_quantize_tensor``), ``Float8DynamicActivationFloat8WeightConfig``
    where either dimension is not a multiple of 16 (``_fp8_mm_compat``: ``torch._scaled_mm``'s
    requirement). int8 weight-only and the others quantize every shape."""
    if candidate.quantization != "torchao" or len(shape) != 2:
        return None
    out, inp = shape
    if candidate.torchao_type == "Int4WeightOnlyConfig":
        group = candidate.torchao_group_size if isinstance(candidate.torchao_group_size, int) else 128
        return f"input size {inp} not a multiple of group_size {group}" if inp % group else None
    if candidate.torchao_type == "Float8DynamicActivationFloat8WeightConfig" and (inp % 16 or out % 16):  # both, for _scaled_mm
        return "a size not a multiple of 16"
    return None


_LLAMA_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FIRST_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.0\.(.+)\.weight$")


def decoder_linears(model: ModelSpec) -> list[tuple[str, int, int]] | Any:
    """(name, out, in) of the first decoder layer's 2-D weights: from the checkpoint's tensors
    where the folder has safetensors (``model.layers.0.self_attn.q_proj.weight`` of shape (out,
    in) is ``("q_proj", out, in)``), else as config.json gives the sizes of a Llama-style layer
    (q/k/v/o, gate/up/down); UNKNOWN where neither says."""
    found = [(m.group(1).rsplit(".", 1)[-1], t.shape[0], t.shape[1]) for t in model.tensors
             if len(t.shape) == 2 and _quantized(t.name, t.shape) and (m := _FIRST_LAYER.search(t.name))]
    if found:  # in a layer's order where the names are Llama's (the headers list them alphabetically)
        return sorted(found, key=lambda x: (_LLAMA_ORDER.index(x[0]) if x[0] in _LLAMA_ORDER else len(_LLAMA_ORDER), x[0]))
    need = (model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads, model.head_dim)
    if not all(isinstance(x, int) and x > 0 for x in need):
        return UNKNOWN
    hidden, inter, heads, kv, hd = need
    return [("q_proj", heads * hd, hidden), ("k_proj", kv * hd, hidden), ("v_proj", kv * hd, hidden), ("o_proj", hidden, heads * hd),
            ("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)]


def int4_groups_that_fit(model: ModelSpec) -> list[int] | Any:
    """The int4 weight-only group sizes torchao offers (256, 128, 64, 32) that divide every decoder
    projection's input size (:func:`decoder_linears`), so that int4 quantizes them all; UNKNOWN
    where neither the checkpoint nor config.json gives the sizes."""
    linears = decoder_linears(model)
    if linears is UNKNOWN:
        return UNKNOWN
    return [g for g in (256, 128, 64, 32) if all(inp % g == 0 for _, _, inp in linears)]


def torchao_unquantized(candidate: Candidate, model: ModelSpec) -> tuple[list[str], float] | Any:
    """The decoder projections the candidate's torchao config leaves as loaded, each with why
    (``["q_proj, k_proj, v_proj, gate_proj, up_proj (input size 576 not a multiple of group_size
    128)"]``), and their share of a layer's projection weights; UNKNOWN where config.json lacks
    the sizes; ([], 0.0) for a config that is no torchao one or quantizes them all."""
    if candidate.quantization != "torchao":
        return [], 0.0
    linears = decoder_linears(model)
    if linears is UNKNOWN:
        return UNKNOWN
    why: dict[str, list[str]] = {}
    skipped = 0
    for name, out, inp in linears:
        reason = torchao_skips(candidate, (out, inp))
        if reason:
            why.setdefault(reason, []).append(name)
            skipped += out * inp
    total = sum(out * inp for _, out, inp in linears)
    return [f"{', '.join(names)} ({reason})" for reason, names in why.items()], skipped / total


def int4_padding(candidate: Candidate, model: ModelSpec) -> tuple[float, list[str]] | Any:
    """The share of the tile-packed int4 weights' elements that is padding, and the projections
    padded (``["q_proj, ... (input 576 to 1024)"]``): ``Int4TilePackedTo4dTensor.from_hp`` (torchao
    0.18.0) pads a weight's input size to a multiple of 1,024 and its output size to one of 8, and
    tinygemm reads the padding every token. (0.0, []) for any other config; UNKNOWN where
    config.json lacks the sizes."""
    if candidate.torchao_type != "Int4WeightOnlyConfig" or candidate.torchao_packing_format != "tile_packed_to_4d":
        return 0.0, []
    linears = decoder_linears(model)
    if linears is UNKNOWN:
        return UNKNOWN
    padded = real = 0
    names: dict[str, list[str]] = {}
    for name, out, inp in linears:
        if torchao_skips(candidate, (out, inp)):
            continue
        p_out, p_in = -(-out // 8) * 8, -(-inp // 1024) * 1024
        padded, real = padded + p_out * p_in, real + out * inp
        if p_in != inp:
            names.setdefault(f"input {inp} to {p_in}", []).append(name)
    return (1 - real / padded if padded else 0.0), [f"{', '.join(n)} ({how})" for how, n in names.items()]


def estimate(candidate: Candidate, model: ModelSpec, facts: Facts, *, on_gpu: bool = True) -> Estimate | Any:
    dtype = load_dtype(candidate, model, facts.package("transformers"))
    if dtype is UNKNOWN:
        return UNKNOWN
    compute = candidate.bnb_4bit_compute_dtype or dtype if candidate.quantization == "bnb-4bit" else dtype
    if candidate.quantization.startswith("bnb") and candidate.dtype in (None, "auto") and dtype == "float32":
        compute = "float16"  # transformers loads bnb models' other modules in fp16 when no dtype is given
    b = BYTES[compute]
    ao = torchao_bytes(candidate)
    weights = fused = 0
    if model.tensors:
        grouped = grouped_tensors([t.name for t in model.tensors]) if candidate.fuse_projections and on_gpu else set()
        for t in model.tensors:
            if ao is not None and _quantized(t.name, t.shape) and not torchao_skips(candidate, t.shape):
                n = int(torchao_bytes(candidate, t.shape) or 0)  # transformers quantizes every nn.Linear but the lm_head
            elif candidate.quantization == "bnb-8bit" and _quantized(t.name, t.shape):
                n = t.numel + t.shape[0] * 4  # int8 + one fp32 scale per row
            elif candidate.quantization == "bnb-4bit" and _quantized(t.name, t.shape):
                n = t.numel // 2 + (t.numel // 64) * 4  # 4 bits + an fp32 absmax per 64-block
            else:
                n = t.numel * b
            weights += n
            fused += n if t.name in grouped else 0
    else:
        if model.param_count is UNKNOWN or any(x is UNKNOWN for x in (model.vocab_size, model.hidden_size)):
            return UNKNOWN
        embed = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
        body = model.param_count - embed
        per = {"bnb-8bit": 1.0 + 4 / max(model.hidden_size, 1), "bnb-4bit": 0.5 + 4 / 64}.get(candidate.quantization, b)
        if ao is not None:
            unquantized = torchao_unquantized(candidate, model)  # the share torchao leaves as loaded, in the dtype
            share = unquantized[1] if unquantized is not UNKNOWN else 0.0
            per = ao * (1 - share) + b * share  # per weight, without the row scales or int4's padding
        weights = int(embed * b + body * per)
        if candidate.fuse_projections and on_gpu and not any(x is UNKNOWN for x in (model.num_layers, model.num_heads, model.num_kv_heads,
                                                                                      model.head_dim, model.intermediate_size)):
            # no tensor names to read: a Llama-like layer's q/k/v and gate/up
            per_layer = model.hidden_size * (model.num_heads + 2 * model.num_kv_heads) * model.head_dim + 2 * model.hidden_size * model.intermediate_size
            fused = int(model.num_layers * per_layer * per)
    need = (model.num_layers, model.num_kv_heads, model.head_dim, model.num_heads, model.hidden_size, model.vocab_size)
    if any(x is UNKNOWN for x in need):
        return UNKNOWN
    layers, kv, hd, heads, hidden, vocab = need
    w = candidate.workload
    kv_cache = 2 * layers * kv * hd * w.batch_size * w.seq_len * b
    inter = model.intermediate_size if model.intermediate_size is not UNKNOWN else 4 * hidden
    # prefill: the MLP's gate, up and product live together (3 x intermediate), the residual
    # stream and attention in/out (6 x hidden), RMSNorm upcasts to float32; logits only for the
    # last position. (Checked on an H100: 2 x intermediate underestimated batch-2205 prefill.)
    tokens = w.batch_size * w.prompt_len
    act = tokens * (6 * hidden + 3 * inter) * b + tokens * hidden * 4 + w.batch_size * vocab * 4
    if candidate.attn_implementation in ("eager",) or (candidate.attn_implementation in (None, "sdpa") and candidate.sdpa_backend == "math"):
        # scores in the dtype, softmax in float32, cast back: (2 x dtype + 4) bytes per score
        act += w.batch_size * heads * w.prompt_len * w.prompt_len * (2 * b + 4)
    return Estimate(load_dtype=dtype, weights=weights, kv_cache=kv_cache, activations=act, overhead=CUDA_CONTEXT if on_gpu else 0,
                    fused_copies=fused)


def gpu_budget(facts: Facts, index: int, candidate: Candidate) -> Any:
    """Bytes this candidate may use on GPU ``index``: its max_memory, else free, else total."""
    mm = candidate.max_memory or {}
    if str(index) in mm:
        return mm[str(index)]
    g = facts.gpu(index)
    if g is None:
        return UNKNOWN
    if isinstance(g.memory_free_gib, (int, float)):
        return int(g.memory_free_gib * GIB)
    if isinstance(g.memory_total_gib, (int, float)):
        return int(g.memory_total_gib * GIB)
    return UNKNOWN


def _weights_format(candidate: Candidate, load_dtype: Any) -> str:
    """How the weights are stored: the bitsandbytes or torchao format where the config quantizes
    (the layers it skips stay in the load dtype), else the load dtype."""
    q = {"bnb-8bit": "bitsandbytes 8-bit", "bnb-4bit": f"bitsandbytes 4-bit {candidate.bnb_4bit_quant_type or 'fp4'}",
         "torchao": f"torchao {candidate.torchao_type}"}.get(str(candidate.quantization))
    return f"{q} (the layers it skips in {load_dtype})" if q else str(load_dtype)


def fit(candidate: Candidate, model: ModelSpec, facts: Facts, gpus_used: list[int]) -> dict[str, Any]:
    """The ``mem.*`` facts the memory rules read."""
    est = estimate(candidate, model, facts, on_gpu=bool(gpus_used))
    if est is UNKNOWN:
        return {}
    out: dict[str, Any] = {
        "need_gib": est.gib(est.total),
        "weights_gib": est.gib(est.weights),
        "kv_cache_gib": est.gib(est.kv_cache),
        "load_dtype": est.load_dtype,
        # what the weights are stored as: the quantization where there is one, else the dtype
        "weights_format": _weights_format(candidate, est.load_dtype),
        "overhead_what": "the CUDA context" if gpus_used else "the runtime's own memory",
    }
    if est.fused_copies:
        out["fused_copies_gib"] = est.gib(est.fused_copies)  # the parts fusing replaced, still held
    if not gpus_used:
        host = facts.host if isinstance(facts.host, dict) else {}
        ram = host.get("ram_available_gib", host.get("ram_gib", UNKNOWN))
        cpu_budget = candidate.max_memory.get("cpu") if candidate.max_memory and "cpu" in candidate.max_memory else None
        budget = cpu_budget / GIB if cpu_budget is not None else ram
        out["budget_gib"] = UNKNOWN if budget is UNKNOWN else round(budget, 2)
        out["fits"] = UNKNOWN if budget is UNKNOWN else est.total / GIB <= budget
        out["spills"] = False
        out["where"] = "CPU RAM"
        return out
    mm = candidate.max_memory or {}
    strategy = candidate.device_map in ("auto", "balanced", "balanced_low_0", "sequential")
    # accelerate reads max_memory as the room for *weights* when it places a strategy's layers;
    # the KV cache, activations and the CUDA context come on top, in the GPUs' own memory
    budgets = [gpu_budget(facts, i, candidate if not strategy else dataclasses.replace(candidate, max_memory=None)) for i in gpus_used]
    if any(b is UNKNOWN for b in budgets):
        out.update(budget_gib=UNKNOWN, fits=UNKNOWN, spills=UNKNOWN, where="GPU")
        return out
    usable = sum(b - est.overhead for b in budgets)
    out["budget_gib"] = round(sum(budgets) / GIB, 2)
    out["where"] = ", ".join(f"GPU {i}" for i in gpus_used)
    on_gpus = est.total - est.overhead <= usable if len(gpus_used) > 1 else est.total <= budgets[0]
    if strategy and mm and all(str(i) in mm for i in gpus_used):
        on_gpus = on_gpus and est.weights * FRAGMENTATION <= sum(mm[str(i)] for i in gpus_used)
    # With a device_map strategy, accelerate puts what does not fit on the CPU (unless max_memory excludes it).
    can_spill = strategy and (not mm or "cpu" in mm)
    out["fits"] = on_gpus or can_spill
    out["spills"] = (not on_gpus) and can_spill
    if out["spills"]:
        out["spill_gib"] = round(max(est.total - est.overhead * len(gpus_used) - usable, est.weights * FRAGMENTATION - sum(mm.get(str(i), 0) for i in gpus_used) if mm else 0) / GIB, 2)
    return out
