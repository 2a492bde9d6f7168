"""The config dict (DESIGN.md): parse it into a :class:`Candidate`, and apply it with :func:`load`.

``parse_config`` reads the full config dict, a bare ``from_pretrained`` kwargs dict, and the
legacy spellings of older guides (``torch_dtype``, ``use_flash_attention_2``,
``load_in_8bit`` / ``load_in_4bit``, ``"to_bettertransformer": true``, ``tp_plan``), records
which legacy spellings were used, and raises :class:`ConfigError` (one line) for values it
cannot parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, UserError, read_json_file

DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "torch.float32": "float32", "torch.float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16", "torch.half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "auto": "auto",
}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "offloaded", "offloaded_static", "sliding_window", "hybrid", "quantized")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# from_pretrained keys autotune reads; anything else is reported as "not judged" (info)
_JUDGED = {
    "dtype", "torch_dtype", "attn_implementation", "use_flash_attention_2", "quantization_config", "load_in_8bit",
    "load_in_4bit", "device_map", "max_memory", "tp_plan", "tp_size", "distributed_config",
    "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "llm_int8_enable_fp32_cpu_offload",
}
_FULL_KEYS = {"from_pretrained", "generate", "runtime", "autotune"}


@dataclass(frozen=True)
class Workload:
    batch_size: int = 1
    prompt_len: int = 512  # for task "encode": the sequence length
    new_tokens: int = 128  # for task "encode": 0
    padding: bool = False
    task: str = "generate"  # "generate": a causal LM's generate; "encode": one forward of an encoder (embeddings)
    # the real prompts (--prompts FILE) text-dependent options are measured on, as "<file>: N prompts,
    # sha256:<digest of their token ids>"; None: random tokens (what every other option's speed depends on)
    prompts: str | None = None

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclass(frozen=True)
class Candidate:
    """One combination of options, as the rules see it."""

    dtype: Any = None  # float32 / float16 / bfloat16 / auto / None (not given)
    dtype_key: Any = None  # the spelling used: "dtype" or "torch_dtype"
    attn_implementation: Any = None  # None: transformers' default
    sdpa_backend: Any = None
    quantization: str = "none"  # none / bnb-8bit / bnb-4bit / torchao / other:<method>
    torchao_type: Any = None  # torchao's config class (quant_type's "_type"), e.g. "Int4WeightOnlyConfig"
    torchao_sets_inductor_config: Any = None  # its _data.set_inductor_config (torchao's default: true)
    torchao_bit_width: Any = None  # _data.bit_width of torchao's gemlite-backed UIntx configs (their default: 4)
    torchao_group_size: Any = None  # _data.group_size where given (the weight bytes of its scales; None: the class default)
    torchao_packing_format: Any = None  # _data.int4_packing_format where given, e.g. "tile_packed_to_4d" (it pads the weights)
    torchao_config_version: Any = None  # quant_type's "_version" (absent: 1, torchao's config_from_dict default)
    torchao_granularity: Any = None  # the weights' granularity (_data.granularity's "_type", the second of a pair) where given, e.g. "PerRow"
    bnb_4bit_quant_type: Any = None
    bnb_4bit_compute_dtype: Any = None
    fp32_cpu_offload: bool = False
    device_map: Any = None
    max_memory: Any = None  # {"0": bytes, "cpu": bytes}
    cache_implementation: Any = None
    disable_compile: bool = False
    tp_plan: Any = None
    distributed_config: bool = False
    tp_size: Any = None  # processes in the tensor-parallel group: distributed_config.tp_size, else the launch's --nproc-per-node
    launch: Any = None
    to_bettertransformer: bool = False
    legacy: tuple[str, ...] = ()
    unjudged: tuple[str, ...] = ()
    workload: Workload = field(default_factory=Workload)
    tuned_on: Any = None
    model_class: Any = None  # runtime.model_class: the transformers Auto class to load with (None: AutoModelForCausalLM)
    torch_compile: Any = None  # runtime.compile: torch.compile's mode ("default", "reduce-overhead", ...) or None
    compile_mode: Any = None  # generate.compile_config.mode (transformers' CompileConfig; None: its default, reduce-overhead)
    compile_options: tuple[str, ...] = ()  # generate.compile_config.options: the inductor options set (truthy), by name
    decode_loop: Any = None  # runtime.decode_loop: "sync-free" (autotune.decode through custom_generate) or None (transformers' own)
    prompt_lookup: Any = None  # generate.prompt_lookup_num_tokens: tokens proposed per step by prompt-lookup decoding (None: off)
    fuse_projections: bool = False  # runtime.fuse_projections: q/k/v and gate/up as one matmul each (autotune.fuse)
    sdpa_gqa: bool = False  # runtime.sdpa_gqa: SDPA's enable_gqa instead of transformers' repeat_kv copies (autotune.gqa)

    @property
    def tensor_parallel(self) -> bool:
        """tp_plan= (transformers 4.50-5.x) or distributed_config= (5.0+)."""
        return self.tp_plan is not None or self.distributed_config

    @property
    def compile(self) -> bool:
        """transformers 5.x compiles the forward automatically for a static cache (on CUDA)."""
        return self.cache_implementation in ("static", "offloaded_static") and not self.disable_compile

    def label(self) -> str:
        parts = [self.dtype or "default-dtype", self.attn_implementation or "default-attn"]
        if self.sdpa_backend:
            parts.append(f"sdpa:{self.sdpa_backend}")
        if self.sdpa_gqa:
            parts.append("sdpa-gqa")
        if self.quantization != "none":
            q = self.quantization
            if q == "bnb-4bit":
                q += f"-{self.bnb_4bit_quant_type or 'fp4'}"
            if q == "torchao":
                q += f"-{TORCHAO_SHORT.get(self.torchao_type, self.torchao_type)}"
                if self.torchao_type == "Int4WeightOnlyConfig" and self.torchao_group_size not in (None, 128):
                    q += f"-g{self.torchao_group_size}"  # another group size than torchao's default
            parts.append(q)
        if self.cache_implementation:
            mode = f"({self.compile_mode})" if self.compile and self.compile_mode not in (None, "reduce-overhead") else ""
            shown = [o.replace("_", "-") for o in self.compile_options if o != "triton.cudagraphs"]  # the loop's own graph
            mode = f"({','.join(shown)})" if self.compile and shown else mode
            parts.append(f"{self.cache_implementation}-cache" + (f"+compile{mode}" if self.compile else ""))
        if self.decode_loop:
            parts.append(f"{self.decode_loop}-loop")
        if self.fuse_projections:
            parts.append("fused-projections")
        if self.prompt_lookup:
            parts.append(f"prompt-lookup-{self.prompt_lookup}")
        if self.torch_compile:
            parts.append("torch.compile" + ("" if self.torch_compile == "default" else f"({self.torch_compile})"))
        if self.device_map not in (None, {"": 0}, "cuda", 0):
            parts.append(f"device_map={self.device_map if isinstance(self.device_map, str) else 'custom'}")
            if isinstance(self.max_memory, dict) and "cpu" in self.max_memory:
                parts.append("+cpu-offload")
        if self.tensor_parallel:
            parts.append(f"tensor-parallel x{self.tp_size}" if self.tp_size else "tensor-parallel")
        return " ".join(parts)


def parse_dtype(value: Any, where: str) -> str:
    if value is None:
        return None  # type: ignore[return-value]
    text = str(value).strip().lower()
    if text not in _DTYPE_ALIASES:
        raise ConfigError(f"{where}: unknown dtype {value!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return _DTYPE_ALIASES[text]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string like '20GiB' / '20GB' (accelerate's units: GB = 10^9)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size such as '20GiB', found {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{where}: a memory size cannot be negative ({value})")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{where}: cannot parse memory size {value!r}; write e.g. '20GiB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def parse_max_memory(value: Any, where: str = "max_memory") -> dict[str, int]:
    """``{0: "20GiB", "cpu": "64GiB"}`` -> ``{"0": bytes, "cpu": bytes}`` (keys as strings)."""
    if isinstance(value, str):  # the CLI form 0=20GiB,1=20GiB,cpu=64GiB
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, size = part.partition("=")
            if not sep:
                raise ConfigError(f"{where}: expected DEVICE=SIZE pairs like 0=20GiB,cpu=64GiB; found {part!r}")
            if key.strip() in items:
                raise ConfigError(f"{where}: device {key.strip()!r} is given twice")
            items[key.strip()] = size.strip()
        value = items
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: expected a mapping of device to size, e.g. {{\"0\": \"20GiB\", \"cpu\": \"64GiB\"}}")
    out: dict[str, int] = {}
    for key, size in value.items():
        k = str(key).strip()
        if k.startswith("cuda:"):
            k = k[5:]
        if not (k.isdigit() or k in ("cpu", "disk", "mps")):
            raise ConfigError(f"{where}: key {key!r} is not a GPU ordinal, 'cpu' or 'disk'")
        if k in out:
            raise ConfigError(f"{where}: device {k!r} is given twice")
        out[k] = parse_size(size, f"{where}[{key!r}]")
    return out


def _device_map(value: Any, where: str) -> Any:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip()
        if v in DEVICE_MAP_STRATEGIES or v in ("cpu", "cuda", "disk", "meta") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ConfigError(f"{where}: unknown device_map {value!r}; use auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:N or a mapping")
    if isinstance(value, Mapping):
        for k, dev in value.items():
            ok = isinstance(dev, int) and not isinstance(dev, bool) or isinstance(dev, str) and re.fullmatch(r"cpu|disk|cuda(:\d+)?|\d+", dev)
            if not ok:
                raise ConfigError(f"{where}[{k!r}]: {dev!r} is not a device (GPU ordinal, 'cpu' or 'disk')")
        return dict(value)
    raise ConfigError(f"{where}: expected a string or a mapping, found {type(value).__name__}")


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, found {value!r}")
    return value


def _int(value: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: expected a whole number >= {minimum}, found {value!r}")
    return value


def parse_config(cfg: Any, *, workload: Workload | None = None) -> Candidate:
    """A config dict (full, bare kwargs, or legacy) -> Candidate. Raises ConfigError."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a JSON object, found {type(cfg).__name__}")
    full = "from_pretrained" in cfg
    if full:
        extra = set(cfg) - _FULL_KEYS
        if extra:
            raise ConfigError(f"unknown top-level key {sorted(extra)[0]!r}; a config dict holds {', '.join(sorted(_FULL_KEYS))}")
        fp = cfg["from_pretrained"]
        if not isinstance(fp, Mapping):
            raise ConfigError("from_pretrained: expected an object of from_pretrained keyword arguments")
        # the seeds' legacy flag, written where users put everything else (not a from_pretrained keyword)
        fp_tb = fp.get("to_bettertransformer", False)
        fp = {k: v for k, v in fp.items() if k != "to_bettertransformer"}
        gen = cfg.get("generate") or {}
        rt = cfg.get("runtime") or {}
        meta = cfg.get("autotune") or {}
        for name, part in (("generate", gen), ("runtime", rt), ("autotune", meta)):
            if not isinstance(part, Mapping):
                raise ConfigError(f"{name}: expected an object")
    else:
        fp = {k: v for k, v in cfg.items() if k not in ("to_bettertransformer",)}
        gen, rt, meta = {}, {}, {}
        fp_tb = False
    legacy: list[str] = []
    kw: dict[str, Any] = {}

    # dtype
    if "dtype" in fp:
        kw["dtype"] = parse_dtype(fp["dtype"], "dtype")
        kw["dtype_key"] = "dtype"
    if "torch_dtype" in fp:
        legacy.append("torch_dtype")
        kw.setdefault("dtype", parse_dtype(fp["torch_dtype"], "torch_dtype"))
        kw.setdefault("dtype_key", "torch_dtype")

    # attention
    if "attn_implementation" in fp and fp["attn_implementation"] is not None:
        attn = fp["attn_implementation"]
        if not isinstance(attn, str):
            raise ConfigError(f"attn_implementation: expected a string, found {attn!r}")
        base = attn.split("|", 1)[1] if attn.startswith("paged|") else attn
        if base not in ATTN_IMPLEMENTATIONS and not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w]+)?", base):
            raise ConfigError(f"attn_implementation: unknown value {attn!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        kw["attn_implementation"] = attn
    if "use_flash_attention_2" in fp:
        legacy.append("use_flash_attention_2")
        if _bool(fp["use_flash_attention_2"], "use_flash_attention_2"):
            kw.setdefault("attn_implementation", "flash_attention_2")

    # quantization
    q = fp.get("quantization_config")
    if q is not None:
        if not isinstance(q, Mapping):
            raise ConfigError("quantization_config: expected an object such as {\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true}")
        method = str(q.get("quant_method", "bitsandbytes" if ("load_in_4bit" in q or "load_in_8bit" in q) else "")).lower()
        if not method:
            raise ConfigError("quantization_config: quant_method is missing")
        if method == "bitsandbytes":
            b4 = _bool(q.get("load_in_4bit", False), "quantization_config.load_in_4bit")
            b8 = _bool(q.get("load_in_8bit", False), "quantization_config.load_in_8bit")
            if b4 == b8:
                raise ConfigError("quantization_config: set exactly one of load_in_4bit or load_in_8bit to true")
            kw["quantization"] = "bnb-4bit" if b4 else "bnb-8bit"
            _bnb_options(q, kw, "quantization_config.")
        elif method == "torchao":
            kw["quantization"] = "torchao"
            kw["torchao_type"] = torchao_type(q)
            version = q["quant_type"]["default"].get("_version", 1)  # torchao.core.config._DEFAULT_VERSION where absent
            kw["torchao_config_version"] = version if isinstance(version, int) and not isinstance(version, bool) else str(version)
            data = q["quant_type"]["default"].get("_data")
            data = data if isinstance(data, Mapping) else {}  # no _data: the class defaults
            kw["torchao_sets_inductor_config"] = bool(data.get("set_inductor_config", True))
            if kw["torchao_type"] in TORCHAO_UINTX:
                kw["torchao_bit_width"] = data.get("bit_width", 4)
            if isinstance(data.get("group_size"), int) and data["group_size"] > 0:
                kw["torchao_group_size"] = data["group_size"]
            if isinstance(data.get("int4_packing_format"), str):
                kw["torchao_packing_format"] = data["int4_packing_format"]
            g = data.get("granularity")  # one for activations and weights, or a pair [activations, weights]
            g = g[-1] if isinstance(g, list) and g else g
            if isinstance(g, Mapping) and isinstance(g.get("_type"), str):
                kw["torchao_granularity"] = g["_type"]
        else:
            kw["quantization"] = f"other:{method}"
    for key in ("load_in_8bit", "load_in_4bit"):
        if key in fp:
            legacy.append(key)
            if _bool(fp[key], key):
                if kw.get("quantization", "none") not in ("none", "bnb-8bit" if key == "load_in_8bit" else "bnb-4bit"):
                    raise ConfigError(f"{key} conflicts with the quantization already given")
                kw["quantization"] = "bnb-8bit" if key == "load_in_8bit" else "bnb-4bit"
    if any(k in fp for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "llm_int8_enable_fp32_cpu_offload")):
        _bnb_options(fp, kw, "")

    # placement
    if "device_map" in fp:
        kw["device_map"] = _device_map(fp["device_map"], "device_map")
    if fp.get("max_memory") is not None:
        kw["max_memory"] = parse_max_memory(fp["max_memory"])
    if "tp_plan" in fp and fp["tp_plan"] is not None:
        legacy.append("tp_plan")
        kw["tp_plan"] = fp["tp_plan"]
    if fp.get("distributed_config") is not None:
        kw["distributed_config"] = True
        dc = fp["distributed_config"]
        if isinstance(dc, Mapping) and dc.get("tp_plan") is not None:
            kw["tp_plan"] = dc["tp_plan"]
        if isinstance(dc, Mapping) and dc.get("tp_size") is not None:
            kw["tp_size"] = _int(dc["tp_size"], "distributed_config.tp_size")
    if fp.get("tp_size") is not None:
        kw["tp_size"] = _int(fp["tp_size"], "tp_size")

    # generate and runtime
    if "cache_implementation" in gen and gen["cache_implementation"] is not None:
        if gen["cache_implementation"] not in CACHE_IMPLEMENTATIONS:
            raise ConfigError(f"generate.cache_implementation: unknown value {gen['cache_implementation']!r}; use one of {', '.join(CACHE_IMPLEMENTATIONS)}")
        kw["cache_implementation"] = gen["cache_implementation"]
    if "disable_compile" in gen:
        kw["disable_compile"] = _bool(gen["disable_compile"], "generate.disable_compile")
    if gen.get("compile_config") is not None:
        cc = gen["compile_config"]
        if not isinstance(cc, Mapping) or set(cc) - COMPILE_CONFIG_KEYS:
            raise ConfigError("generate.compile_config: expected an object of transformers' CompileConfig fields "
                              f"({', '.join(sorted(COMPILE_CONFIG_KEYS))}), e.g. {{\"mode\": \"max-autotune\"}}")
        mode = cc.get("mode", "reduce-overhead")
        if mode not in COMPILE_MODES:
            raise ConfigError(f"generate.compile_config.mode: unknown mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
        for key in ("fullgraph",):
            if key in cc:
                _bool(cc[key], f"generate.compile_config.{key}")
        if cc.get("options") is not None:
            if not isinstance(cc["options"], Mapping) or not all(isinstance(k, str) for k in cc["options"]):
                raise ConfigError("generate.compile_config.options: expected an object of inductor options, e.g. {\"coordinate_descent_tuning\": true}")
            if "mode" in cc:
                raise ConfigError("generate.compile_config: give mode or options, not both (torch.compile takes one of them)")
            if rt.get("decode_loop") != "sync-free":
                # transformers' generate (5.17 to 5.24 at least: modeling_utils.get_compiled_call) calls
                # torch.compile(**CompileConfig.to_dict()), which always holds a mode (default
                # reduce-overhead), and torch.compile refuses mode and options together
                raise ConfigError("generate.compile_config.options: only with runtime.decode_loop \"sync-free\": transformers' own generate "
                                  "passes CompileConfig's mode (default reduce-overhead) with them to torch.compile, which takes one of the two")
            kw["compile_options"] = tuple(sorted(k for k, v in cc["options"].items() if v))
        kw["compile_mode"] = mode
    if gen.get("prompt_lookup_num_tokens") is not None:
        kw["prompt_lookup"] = _int(gen["prompt_lookup_num_tokens"], "generate.prompt_lookup_num_tokens")
    backend = rt.get("sdpa_backend")
    if backend is not None:
        if backend not in SDPA_BACKENDS:
            raise ConfigError(f"runtime.sdpa_backend: unknown value {backend!r}; use one of {', '.join(SDPA_BACKENDS)}")
        kw["sdpa_backend"] = backend
    if rt.get("model_class") is not None:
        if not isinstance(rt["model_class"], str) or not re.fullmatch(r"Auto[A-Za-z0-9]+", rt["model_class"]):
            raise ConfigError(f"runtime.model_class: expected the name of a transformers Auto class such as \"AutoModel\", found {rt['model_class']!r}")
        kw["model_class"] = rt["model_class"]
    if rt.get("compile") not in (None, False):
        comp = rt["compile"]
        if comp is True:
            comp = {}
        if not isinstance(comp, Mapping) or set(comp) - {"mode", "dynamic", "fullgraph"}:
            raise ConfigError("runtime.compile: expected true or an object of torch.compile options (mode, dynamic, fullgraph)")
        mode = comp.get("mode") or "default"
        if mode not in COMPILE_MODES:
            raise ConfigError(f"runtime.compile.mode: unknown mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
        kw["torch_compile"] = mode
    if rt.get("decode_loop") is not None:
        if rt["decode_loop"] not in DECODE_LOOPS:
            raise ConfigError(f"runtime.decode_loop: unknown loop {rt['decode_loop']!r}; use one of {', '.join(DECODE_LOOPS)} "
                              "(or null for transformers' own)")
        kw["decode_loop"] = rt["decode_loop"]
    if rt.get("fuse_projections") is not None:
        kw["fuse_projections"] = _bool(rt["fuse_projections"], "runtime.fuse_projections")
    if rt.get("sdpa_gqa") is not None:
        kw["sdpa_gqa"] = _bool(rt["sdpa_gqa"], "runtime.sdpa_gqa")
    if rt.get("launch") is not None:
        if not isinstance(rt["launch"], str):
            raise ConfigError(f"runtime.launch: expected a command line (a string), found {rt['launch']!r}")
        kw["launch"] = rt["launch"]
        nproc = launch_nproc(rt["launch"])
        if nproc is not None:
            kw.setdefault("tp_size", nproc)
    tb = cfg.get("to_bettertransformer", rt.get("to_bettertransformer", fp_tb))
    if tb:
        legacy.append("to_bettertransformer")
        kw["to_bettertransformer"] = _bool(tb, "to_bettertransformer")

    # workload: the caller's, else the one the config was tuned for, else the default
    if workload is None:
        w = meta.get("workload") or {}
        if not isinstance(w, Mapping):
            raise ConfigError("autotune.workload: expected an object")
        task = w.get("task", "generate")
        if task not in TASKS:
            raise ConfigError(f"autotune.workload.task: unknown task {task!r}; use one of {', '.join(TASKS)}")
        workload = Workload(
            batch_size=_int(w.get("batch_size", 1), "autotune.workload.batch_size"),
            prompt_len=_int(w.get("prompt_len", 512), "autotune.workload.prompt_len"),
            # an encoder's forward generates nothing
            new_tokens=_int(w.get("new_tokens", 128), "autotune.workload.new_tokens", 0 if task == "encode" else 1),
            padding=_bool(w.get("padding", False), "autotune.workload.padding"),
            task=task,
            prompts=w["prompts"] if isinstance(w.get("prompts"), str) else None,
        )
    kw["workload"] = workload
    if meta.get("tuned_on") is not None:
        kw["tuned_on"] = meta["tuned_on"]
    kw["legacy"] = tuple(legacy)
    kw["unjudged"] = tuple(k for k in fp if k not in _JUDGED)
    return Candidate(**kw)


def launch_nproc(command: str) -> int | None:
    """The process count of a ``torchrun`` command line (``--nproc-per-node N`` / ``--nproc_per_node=N``)."""
    m = re.search(r"--nproc[-_]per[-_]node[= ](\d+)", command)
    return int(m.group(1)) if m else None


def launch_command(nproc: int, script: str = "your_script.py", gpus: list[int] | None = None) -> str:
    """The command that starts a tensor-parallel config: one process per GPU."""
    env = f"CUDA_VISIBLE_DEVICES={','.join(str(g) for g in gpus)} " if gpus is not None else ""
    return f"{env}torchrun --nproc-per-node {nproc} {script}"


def _bnb_options(q: Mapping[str, Any], kw: dict[str, Any], prefix: str) -> None:
    if q.get("bnb_4bit_quant_type") is not None:
        qt = q["bnb_4bit_quant_type"]
        if qt not in ("nf4", "fp4"):
            raise ConfigError(f"{prefix}bnb_4bit_quant_type: expected 'nf4' or 'fp4', found {qt!r}")
        kw["bnb_4bit_quant_type"] = qt
    if q.get("bnb_4bit_compute_dtype") is not None:
        kw["bnb_4bit_compute_dtype"] = parse_dtype(q["bnb_4bit_compute_dtype"], f"{prefix}bnb_4bit_compute_dtype")
    if "llm_int8_enable_fp32_cpu_offload" in q:
        kw["fp32_cpu_offload"] = _bool(q["llm_int8_enable_fp32_cpu_offload"], f"{prefix}llm_int8_enable_fp32_cpu_offload")


# torchao's config classes, as the config dict names them (quant_type's "_type") and as labels say them
# torchao's prototype configs on gemlite's Triton kernels (torchao/prototype/quantization/quant_api.py, 0.18.0)
TORCHAO_UINTX = frozenset({"UIntxWeightOnlyConfig", "Int8DynamicActivationUIntxWeightConfig"})
TORCHAO_SHORT = {"Int8WeightOnlyConfig": "int8wo", "Int4WeightOnlyConfig": "int4wo", "Float8WeightOnlyConfig": "float8wo",
                 "Float8DynamicActivationFloat8WeightConfig": "float8dq", "Int8DynamicActivationInt8WeightConfig": "int8dq"}


def torchao_type(q: Mapping[str, Any]) -> str:
    """The torchao config class a ``TorchAoConfig`` dict names: transformers' own JSON form
    (``TorchAoConfig.to_dict``: ``{"quant_type": {"default": {"_type": ..., "_data": ...}}}``)."""
    qt = q.get("quant_type")
    if isinstance(qt, str):
        raise ConfigError(f"quantization_config.quant_type: the string form {qt!r} was removed from transformers' TorchAoConfig (5.x "
                          "takes a torchao config object); write its JSON form, e.g. {\"default\": {\"_type\": \"Int8WeightOnlyConfig\", \"_version\": 2, \"_data\": {}}}")
    inner = qt.get("default") if isinstance(qt, Mapping) else None
    if not isinstance(inner, Mapping) or not isinstance(inner.get("_type"), str):
        raise ConfigError("quantization_config.quant_type: expected TorchAoConfig's JSON form {\"default\": {\"_type\": \"Int4WeightOnlyConfig\", "
                          "\"_version\": 2, \"_data\": {...}}}")
    return inner["_type"]


def read_config(path: str | Path) -> Any:
    """Read a config file (JSON); every problem with it is a ConfigError with one clear line."""
    return read_json_file(path, "config", ConfigError)


# ---------------------------------------------------------------------------- applying a config
TASKS = ("generate", "encode")
# torch.compile's modes (torch/__init__.py compile(): "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# transformers' CompileConfig fields (generation/configuration_utils.py, 5.17)
COMPILE_CONFIG_KEYS = frozenset({"fullgraph", "dynamic", "backend", "mode", "options"})
DECODE_LOOPS = ("sync-free",)


def compile_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """torch.compile's keyword arguments from ``runtime.compile`` (None: not compiled)."""
    comp = (cfg.get("runtime") or {}).get("compile")
    if comp in (None, False):
        return None
    comp = {} if comp is True else dict(comp)
    if comp.get("mode") in (None, "default"):
        comp.pop("mode", None)
    return comp


def model_class_of(cfg: Mapping[str, Any]) -> Any:
    """The transformers Auto class ``runtime.model_class`` names (AutoModelForCausalLM when none)."""
    import transformers

    name = (cfg.get("runtime") or {}).get("model_class") or "AutoModelForCausalLM"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UserError(f"runtime.model_class: transformers {transformers.__version__} has no {name}")
    return cls


def from_pretrained_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` part, made ready for transformers: integer ``max_memory`` keys
    (JSON makes them strings and accelerate rejects ``"0"``) and a ``BitsAndBytesConfig``."""
    fp = dict(cfg.get("from_pretrained", cfg))
    if isinstance(fp.get("max_memory"), Mapping):
        fp["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in fp["max_memory"].items()}
    if isinstance(fp.get("device_map"), Mapping):
        fp["device_map"] = {k: (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in fp["device_map"].items()}
    q = fp.get("quantization_config")
    if isinstance(q, Mapping) and str(q.get("quant_method", "bitsandbytes")).lower() == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        fp["quantization_config"] = BitsAndBytesConfig(**{k: v for k, v in q.items() if k != "quant_method"})
    elif isinstance(q, Mapping) and str(q.get("quant_method")).lower() == "torchao":
        from transformers import TorchAoConfig

        fp["quantization_config"] = TorchAoConfig.from_dict({k: v for k, v in q.items() if k != "quant_method"})
    if isinstance(fp.get("distributed_config"), Mapping):
        from transformers import DistributedConfig

        fp["distributed_config"] = DistributedConfig(**fp["distributed_config"])
    return fp


def generate_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    gen = dict(cfg.get("generate") or {})
    if isinstance(gen.get("compile_config"), Mapping):
        from transformers import CompileConfig

        gen["compile_config"] = CompileConfig(**gen["compile_config"])
    return gen


def _sdpa_toggles() -> dict[str, Any]:
    import torch

    return {
        "flash": torch.backends.cuda.enable_flash_sdp,
        "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
        "cudnn": torch.backends.cuda.enable_cudnn_sdp,
        "math": torch.backends.cuda.enable_math_sdp,
    }


def apply_runtime(cfg: Mapping[str, Any]) -> None:
    """Process-wide settings: the SDPA backend (only the chosen one stays enabled)."""
    backend = (cfg.get("runtime") or {}).get("sdpa_backend")
    if not backend:
        return
    for name, toggle in _sdpa_toggles().items():
        toggle(name == backend)


def reset_runtime() -> None:
    """Undo :func:`apply_runtime`: every SDPA backend enabled (a process that loads several
    configs in turn, as the tuner's screen does)."""
    for toggle in _sdpa_toggles().values():
        toggle(True)


def load(model: str | Path, cfg: Mapping[str, Any] | str | Path, *, model_class: Any = None) -> Any:
    """Load ``model`` with every part of ``cfg`` (a config dict, or the JSON file ``tune -o``
    wrote) applied; returns the model.

    ``generate`` options go into ``model.generation_config`` so a plain ``model.generate``
    uses them. ``runtime.model_class`` names the Auto class (``AutoModel`` for an encoder's
    config; ``AutoModelForCausalLM`` when absent) and ``runtime.compile`` compiles the model
    in place with ``torch.compile``'s options. ``runtime.decode_loop: "sync-free"`` makes
    ``model.generate`` decode with :func:`autotune.decode.generate` (transformers'
    ``custom_generate`` hook; pass ``custom_generate=None`` to a call for transformers' own
    loop). A ``torchao`` ``quantization_config`` (``TorchAoConfig.to_dict``'s JSON form) is
    rebuilt with ``TorchAoConfig.from_dict``. ``runtime.fuse_projections: true`` fuses sibling
    projections (q/k/v, gate/up) into one matmul each after loading (:mod:`autotune.fuse`);
    ``runtime.sdpa_gqa: true`` gives SDPA grouped-query attention itself (:mod:`autotune.gqa`). A config whose ``runtime.launch`` names a multi-process launch raises
    :class:`UserError` with the command, unless this process is one of those it starts. A
    model that is neither a local folder nor reachable on the hub fails in seconds
    (:class:`UserError`), not after transformers' retries.
    """
    import os

    if isinstance(cfg, (str, Path)):
        cfg = read_config(cfg)
    parse_config(cfg)  # validates, raises ConfigError with one line
    if not Path(str(model)).exists():
        hub_reachable(str(model))
    launch = (cfg.get("runtime") or {}).get("launch")
    if launch and "WORLD_SIZE" not in os.environ:
        raise UserError(f"this config runs as several processes; start it with: {launch}")
    if model_class is None:
        model_class = model_class_of(cfg)
    apply_runtime(cfg)
    m = model_class.from_pretrained(str(model), **from_pretrained_kwargs(cfg))
    apply_model_transforms(m, cfg)
    if getattr(m, "generation_config", None) is not None:
        for key, value in generate_kwargs(cfg).items():
            setattr(m.generation_config, key, value)
    comp = compile_kwargs(cfg)
    if comp is not None:  # in place (nn.Module.compile): the model keeps its class and methods
        m.eval()
        m.compile(**comp)
    loop = decode_loop_of(cfg)
    if loop is not None:
        use_decode_loop(m, loop)
    return m


def apply_model_transforms(model: Any, cfg: Mapping[str, Any], *, strict: bool = False) -> None:
    """What the config changes in a loaded model: ``runtime.sdpa_gqa`` (:func:`autotune.gqa.use`)
    and ``runtime.fuse_projections`` (:func:`autotune.fuse.fuse_projections`). What does not apply
    (no grouped heads, nothing to fuse) leaves the model as loaded with one logged line saying why,
    or with ``strict`` (the tuner's worker: the candidate would be another one under its name)
    raises :class:`autotune.gqa.NotGrouped` / :class:`autotune.fuse.NothingToFuse`."""
    import logging

    rt = cfg.get("runtime") or {}
    if rt.get("sdpa_gqa"):
        from .gqa import NotGrouped, use

        try:
            use(model)
        except NotGrouped as e:
            if strict:
                raise
            logging.getLogger("autotune").warning("runtime.sdpa_gqa: %s; the model keeps transformers' attention", e)
    if not rt.get("fuse_projections"):
        return
    from .fuse import NothingToFuse, fuse_projections

    report = fuse_projections(model)
    if not report["fused"]:
        why = "; ".join(sorted(set(report["skipped"].values()))) or "no sibling q/k/v or gate/up projections"
        if strict:
            raise NothingToFuse(f"nothing to fuse in {type(model).__name__} ({why})")
        logging.getLogger("autotune").warning("runtime.fuse_projections: nothing fused in %s (%s)", type(model).__name__, why)


def decode_loop_of(cfg: Mapping[str, Any]) -> Any:
    """The decoding function ``runtime.decode_loop`` names (None: transformers' own loop)."""
    name = (cfg.get("runtime") or {}).get("decode_loop")
    if not name:
        return None
    from . import decode

    return decode.generate


def use_decode_loop(model: Any, loop: Any) -> None:
    """Make ``model.generate`` pass ``custom_generate=loop`` unless the caller passes its own
    (``custom_generate=None`` restores transformers' loop for one call) or a streamer, an
    assistant model or synced GPUs: transformers 5.17 hands a callable ``custom_generate`` only
    the keywords its signature adds to ``_sample``'s (``_extract_generation_mode_kwargs``), so
    a streamer would be dropped silently; those calls keep transformers' loop. Prompt lookup
    (in the call or the model's generation config) goes to the loop, which runs it on a static
    cache and hands it to transformers' assisted decoding otherwise."""
    import functools

    plain = model.generate

    @functools.wraps(plain)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if not any(kwargs.get(k) is not None for k in ("streamer", "assistant_model", "synced_gpus")):
            kwargs.setdefault("custom_generate", loop)
        return plain(*args, **kwargs)

    model.generate = generate


def hub_id(name: str, *, org_required: bool = False) -> None:
    """A :class:`UserError` ("model folder not found") unless ``name`` (not a local folder)
    could be looked up on the hub: a hub id (``org/name``, or a bare name unless
    ``org_required``) and HF_HUB_OFFLINE not set."""
    import os
    import re

    if not re.fullmatch(r"[\w.-]+/[\w.-]+" if org_required else r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"model folder not found: {name}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model folder not found: {name} (and HF_HUB_OFFLINE is set, so it is not looked up on the hub)")


def hub_reachable(name: str, timeout_s: float = 5.0) -> None:
    """A :class:`UserError` unless ``name`` looks like a hub id and the hub answers for it within
    ``timeout_s`` (offline, transformers would spend about 50 s in retries before failing)."""
    hub_id(name)
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: one line
        raise UserError(f"model folder not found: {name}, and the hub did not answer for it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
