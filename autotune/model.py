"""ModelSpec: what a model is, from ``config.json`` and safetensors headers, without weights.

Attention capabilities (``_supports_sdpa``, flash, flex) are read from the *installed*
transformers' modeling source as text (no import), and the spec records which version
that was, so a finding can say when the facts describe another transformers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .facts import UNKNOWN

# bytes per element of safetensors dtypes
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ST_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class ModelSpec:
    path: str
    model_type: Any = UNKNOWN
    architectures: tuple[str, ...] = ()
    hidden_size: Any = UNKNOWN
    intermediate_size: Any = UNKNOWN
    num_layers: Any = UNKNOWN
    num_heads: Any = UNKNOWN
    num_kv_heads: Any = UNKNOWN
    head_dim: Any = UNKNOWN
    vocab_size: Any = UNKNOWN
    max_positions: Any = UNKNOWN
    checkpoint_dtype: Any = UNKNOWN  # "bfloat16", ... as written in config.json / the tensors
    tie_word_embeddings: bool = False
    quantization: Any = None  # a quantization_config already in config.json
    tensors: tuple[Tensor, ...] = ()  # from safetensors headers; empty if none were found
    param_count: Any = UNKNOWN
    param_count_exact: bool = False
    supports: Mapping[str, Any] = field(default_factory=dict)  # sdpa / flash_attn / flex_attn -> bool
    supports_source: Any = UNKNOWN  # "transformers 5.17.0 models/llama/modeling_llama.py"
    supports_transformers: Any = UNKNOWN  # the version the capabilities were read from

    @property
    def gqa(self) -> Any:
        if self.num_heads is UNKNOWN or self.num_kv_heads is UNKNOWN:
            return UNKNOWN
        return self.num_kv_heads < self.num_heads

    def get(self, name: str) -> Any:
        if name.startswith("supports."):
            return self.supports.get(name.split(".", 1)[1], UNKNOWN)
        if name == "gqa":
            return self.gqa
        if name == "architecture":
            return self.architectures[0] if self.architectures else UNKNOWN
        if name == "quant_method":  # how the checkpoint was saved quantized (config.json); None: not quantized
            q = self.quantization
            return str(q.get("quant_method", "unknown")).lower() if isinstance(q, dict) else None
        if name in ("torchao_type", "torchao_config_version"):  # a torchao checkpoint's quant_type (TorchAoConfig.to_dict)
            q = self.quantization
            qt = q.get("quant_type") if isinstance(q, dict) and str(q.get("quant_method")).lower() == "torchao" else None
            d = qt.get("default") if isinstance(qt, dict) else None
            if not isinstance(d, dict):
                return None
            return d.get("_type") if name == "torchao_type" else d.get("_version", 1)
        return getattr(self, name, UNKNOWN)


def read_model(path: str | Path, *, transformers_root: Path | None | Any = UNKNOWN) -> ModelSpec:
    """Read a local model folder. Raises :class:`UserError` for a missing or malformed one."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not p.exists():
        raise UserError(f"model folder not found: {p}")
    if not cfg_path.is_file():
        raise UserError(f"{p} has no config.json (is it a model folder?)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    g = lambda *keys: next((c[k] for k in keys for c in (cfg, text_cfg) if isinstance(c.get(k), int)), UNKNOWN)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model", "dim")
    heads = g("num_attention_heads", "n_head", "num_heads", "n_heads")
    kv = g("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
    if kv is UNKNOWN and heads is not UNKNOWN:
        kv = 1 if cfg.get("multi_query") else heads
    head_dim = g("head_dim")
    if head_dim is UNKNOWN and hidden is not UNKNOWN and heads not in (UNKNOWN, 0):
        head_dim = hidden // heads
    ckpt_dtype = cfg.get("dtype", cfg.get("torch_dtype", UNKNOWN))
    tensors = _read_safetensors(p, cfg)
    if tensors and ckpt_dtype is UNKNOWN:
        floats = [t.dtype for t in tensors if t.dtype in _ST_DTYPE]
        if floats:
            ckpt_dtype = _ST_DTYPE[max(set(floats), key=floats.count)]
    spec = ModelSpec(
        path=str(p),
        model_type=cfg.get("model_type", UNKNOWN),
        architectures=tuple(cfg.get("architectures") or ()),
        hidden_size=hidden,
        intermediate_size=g("intermediate_size", "n_inner", "ffn_dim"),
        num_layers=g("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=g("vocab_size"),
        max_positions=g("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
        checkpoint_dtype=ckpt_dtype,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        quantization=cfg.get("quantization_config"),
        tensors=tuple(tensors),
    )
    count, exact = (sum(t.numel for t in tensors), True) if tensors else (_estimate_params(spec), False)
    caps, source, tver = model_capabilities(spec.model_type, transformers_root=transformers_root)
    return _replace(spec, param_count=count, param_count_exact=exact, supports=caps, supports_source=source, supports_transformers=tver)


def _replace(spec: ModelSpec, **kw: Any) -> ModelSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)


def _safetensors_header(f: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file; OSError, ValueError or struct.error when
    it cannot be read."""
    with f.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100_000_000:
            raise ValueError("header too large")
        return n, json.loads(fh.read(n))


def checkpoint_files(folder: Path, config: dict[str, Any] | None = None) -> list[Path]:
    """The safetensors files ``from_pretrained`` loads from a local folder, as transformers 5.17
    picks them (``modeling_utils._get_resolved_checkpoint_files``): the file config.json's
    ``transformers_weights`` names (or its index's shards), else ``model.safetensors``, else the
    shards ``model.safetensors.index.json`` maps; other ``*.safetensors`` beside them (a Mistral
    repository's ``consolidated.safetensors``, the same weights under other names) are not
    loaded. A folder with none of those: every ``*.safetensors`` in it."""
    def shards(index: Path) -> list[Path]:
        try:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            return []  # load_problems reports the bad index
        return sorted({folder / v for v in wm.values() if isinstance(v, str) and (folder / v).is_file()})

    explicit = (config or {}).get("transformers_weights")
    if isinstance(explicit, str) and (folder / explicit).is_file():
        return shards(folder / explicit) if explicit.endswith(".safetensors.index.json") else [folder / explicit]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        return shards(folder / "model.safetensors.index.json")
    return sorted(folder.glob("*.safetensors"))


def _read_safetensors(folder: Path, config: dict[str, Any] | None = None) -> list[Tensor]:
    files = checkpoint_files(folder, config)
    out: list[Tensor] = []
    for f in files:
        try:
            _, header = _safetensors_header(f)
        except (OSError, ValueError, struct.error) as e:
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out.append(Tensor(name=name, shape=tuple(meta["shape"]), dtype=meta["dtype"]))
    return out


def _estimate_params(spec: ModelSpec) -> Any:
    """A decoder's parameter count from its shape (used when no safetensors are there)."""
    need = (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size)
    if any(x is UNKNOWN for x in need):
        return UNKNOWN
    h, n_layers, heads, kv, hd, vocab = need
    inter = spec.intermediate_size if spec.intermediate_size is not UNKNOWN else 4 * h
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * inter if spec.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3") else 2 * h * inter
    total = vocab * h + n_layers * (attn + mlp + 2 * h) + h
    if not spec.tie_word_embeddings:
        total += vocab * h
    return total


_CAP_ATTRS = {"sdpa": "_supports_sdpa", "flash_attn": "_supports_flash_attn", "flex_attn": "_supports_flex_attn"}


def model_capabilities(model_type: Any, *, transformers_root: Path | None | Any = UNKNOWN) -> tuple[dict[str, Any], Any, Any]:
    """Which attention implementations the installed transformers declares for ``model_type``.

    Read from ``transformers/models/<type>/modeling_<type>.py`` as text: a class attribute
    ``_supports_sdpa = True`` (etc.) on the model's PreTrainedModel. No import, so it is fast
    and works without torch. Returns ({}, UNKNOWN, UNKNOWN) when it cannot tell.
    """
    if not isinstance(model_type, str):
        return {}, UNKNOWN, UNKNOWN
    if transformers_root is UNKNOWN:
        spec = importlib.util.find_spec("transformers")
        transformers_root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if transformers_root is None:
        return {}, UNKNOWN, UNKNOWN
    try:
        tver = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tver = UNKNOWN
    folder = model_type.replace("-", "_")
    f = Path(transformers_root) / "models" / folder / f"modeling_{folder}.py"
    if not f.is_file():
        return {}, UNKNOWN, tver
    text = f.read_text(encoding="utf-8", errors="replace")
    caps = {}
    for key, attr in _CAP_ATTRS.items():
        values = re.findall(rf"^\s+{attr}\s*=\s*(True|False)\b", text, re.M)
        caps[key] = "True" in values  # absent: PreTrainedModel's default, False
    return caps, f"transformers {tver} models/{folder}/modeling_{folder}.py", tver


# ---------------------------------------------------------------------------- can it load at all
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5")
_SOURCE = "transformers PreTrainedModel.from_pretrained / AutoConfig.for_model (modeling_utils.py, configuration_auto.py)"


@dataclass(frozen=True)
class Problem:
    """A reason the model folder cannot be loaded (or the workload cannot run on it), found
    before any candidate runs. ``id`` is stable; ``trust`` marks the one --trust-remote-code lifts."""

    id: str
    message: str
    fix: str
    trust: bool = False

    def to_finding(self) -> dict[str, Any]:
        return {"rule": self.id, "severity": "error", "option": "model", "message": self.message, "fix": self.fix, "source": _SOURCE}


def known_model_types() -> set[str] | None:
    """The model types the installed transformers knows, read as text (importing its auto
    classes takes 2 s): the ``"type": "SomeConfig"`` entries of ``CONFIG_MAPPING_NAMES``
    (``models/auto/auto_mappings.py`` in 5.x, ``configuration_auto.py`` before) and the
    folders under ``models/``. None when transformers is not installed."""
    spec = importlib.util.find_spec("transformers")
    if not spec or not spec.submodule_search_locations:
        return None
    models = Path(spec.submodule_search_locations[0]) / "models"
    types = {d.name for d in models.iterdir() if d.is_dir() and not d.name.startswith("_")} if models.is_dir() else set()
    for name in ("auto_mappings.py", "configuration_auto.py"):
        try:
            text = (models / "auto" / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        types.update(re.findall(r'\(\s*"([\w.-]+)",\s*"\w+Config"\s*\)', text))
        types.update(re.findall(r'"([\w.-]+)"\s*:\s*"\w+Config"', text))
    return types or None


# model types that are encoders only (no causal LM of their own, or one that needs is_decoder)
_ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
    "camembert", "flaubert", "xlm", "ernie", "nomic_bert", "modernbert", "mobilebert", "squeezebert", "funnel", "longformer",
    "rembert", "megatron-bert", "convbert", "luke", "layoutlm", "data2vec-text", "roformer", "nezha", "ibert", "canine", "esm",
}
_ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def model_kind(folder: str | Path) -> str:
    """What the model is, from its config.json: "causal-lm" (what ``generate`` serves token by
    token), "encoder" (BERT-class: embeddings, classification), or "encoder-decoder" (T5, BART)."""
    return _kind(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8-sig")))


def _kind(cfg: Mapping[str, Any]) -> str:
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if cfg.get("is_encoder_decoder"):
        return "encoder-decoder"
    if cfg.get("is_decoder") or any(a.endswith(("ForCausalLM", "LMHeadModel")) and not a.startswith("Bert") for a in archs):
        return "causal-lm"
    if cfg.get("model_type") in _ENCODER_TYPES or (archs and all(a.endswith(_ENCODER_HEADS) for a in archs)):
        return "encoder"
    return "causal-lm"


def load_problems(spec: ModelSpec, *, prompt_len: int | None = None, new_tokens: int | None = None,
                  trust_remote_code: bool = False, known_types: set[str] | None | Any = UNKNOWN,
                  for_generation: bool = False) -> list[Problem]:
    """What stops ``from_pretrained`` on this folder, read from its files in milliseconds:
    no weights, a truncated or missing shard, an unknown ``model_type``, impossible shapes,
    custom code (``auto_map``) without ``trust_remote_code``; and a prompt plus new tokens
    beyond the model's positions."""
    p = Path(spec.path)
    out: list[Problem] = []
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8-sig"))
    remote = isinstance(cfg.get("auto_map"), dict) and bool(cfg["auto_map"])
    if remote and not trust_remote_code:
        out.append(Problem("MODEL-REMOTE-CODE", f"config.json has an auto_map ({', '.join(sorted(cfg['auto_map']))}): the model needs "
                           "its own Python code from the folder or the hub, which autotune does not run unless told to",
                           "read that code, then pass --trust-remote-code (trust_remote_code=True); it is recorded in the config", trust=True))
    if for_generation:
        kind = _kind(cfg)
        if kind != "causal-lm":
            arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
            out.append(Problem("MODEL-NOT-CAUSAL-LM", f"this is an {kind} model ({arch}): autotune tunes a causal LM's generate (token "
                               "by token) and an encoder's forward (embeddings, --seq-len); an encoder-decoder's generate is not what "
                               "it measures, and loading it as a causal LM would add a randomly initialised LM head",
                               "`autotune check CONFIG --model DIR` still judges its options (dtype, attention, memory); tuning "
                               "encoder-decoder models is not built yet"))
    weights = [f for g in _WEIGHT_GLOBS for f in p.glob(g)]
    if not weights:
        out.append(Problem("MODEL-NO-WEIGHTS", f"{p} has config.json but no weight files ({', '.join(_WEIGHT_GLOBS[:3])}, ...)",
                           "download or copy the weights into the folder (save_pretrained writes model.safetensors)"))
    for f in checkpoint_files(p, cfg):  # the files from_pretrained reads (a stray copy beside them is not loaded)
        try:
            size = f.stat().st_size
            n, header = _safetensors_header(f)
            end = max((int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue  # read_model already refused an unreadable header
        if 8 + n + end > size:
            out.append(Problem("MODEL-TRUNCATED", f"{f.name} is truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}",
                               "download the file again (an interrupted copy or download leaves it short)"))
    for index in sorted(p.glob("*.index.json")):
        try:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            out.append(Problem("MODEL-BAD-INDEX", f"{index.name} is not a valid shard index", "download the index file again"))
            continue
        missing = sorted({v for v in wm.values() if isinstance(v, str) and not (p / v).is_file()})
        if missing:
            out.append(Problem("MODEL-MISSING-SHARD", f"{index.name} names {len(missing)} shard(s) that are not in the folder: {', '.join(missing[:3])}",
                               "download the missing shards"))
    mt = cfg.get("model_type")
    types = known_model_types() if known_types is UNKNOWN else known_types
    if not isinstance(mt, str) or not mt:
        if not remote:
            out.append(Problem("MODEL-UNKNOWN-TYPE", "config.json has no model_type", "a transformers config.json names its model_type (e.g. \"llama\")"))
    elif types is not None and mt not in types and not remote:
        import difflib

        near = difflib.get_close_matches(mt, sorted(types), n=1)
        out.append(Problem("MODEL-UNKNOWN-TYPE", f"model_type {mt!r} is not known to the installed transformers" + (f" (did you mean {near[0]!r}?)" if near else ""),
                           "upgrade transformers (pip install -U transformers), or fix model_type in config.json"))
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in ("num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size", "num_key_value_heads", "intermediate_size"):
        v = cfg.get(key, text_cfg.get(key))
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            out.append(Problem("MODEL-BAD-SHAPE", f"config.json: {key} is {v!r}; it must be a whole number >= 1", "fix config.json"))
    heads, hidden = spec.num_heads, spec.hidden_size
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden > 0 and "head_dim" not in cfg and hidden % heads:
        out.append(Problem("MODEL-BAD-SHAPE", f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}", "fix config.json"))
    kv = spec.num_kv_heads
    if isinstance(heads, int) and isinstance(kv, int) and heads > 0 and kv > 0 and heads % kv:
        out.append(Problem("MODEL-BAD-SHAPE", f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}", "fix config.json"))
    if prompt_len is not None and new_tokens is not None and isinstance(spec.max_positions, int) and prompt_len + new_tokens > spec.max_positions:
        out.append(Problem("WORKLOAD-TOO-LONG", f"prompt {prompt_len} + {new_tokens} new tokens = {prompt_len + new_tokens} positions, "
                           f"beyond the model's {spec.max_positions} (max_position_embeddings)",
                           f"ask for at most {spec.max_positions} positions in all (e.g. --prompt-len {max(1, spec.max_positions - new_tokens)})"))
    return out


def require_loadable(spec: ModelSpec, **kw: Any) -> None:
    """``load_problems`` as one :class:`UserError` line (the first problem, and how many more)."""
    problems = load_problems(spec, **kw)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): `autotune check` lists them)" if len(problems) > 1 else ""
        raise UserError(f"{first.id}: {first.message}; fix: {first.fix}{more}")
