"""Facts: what a machine is. Frozen dataclasses, read from and written to the facts file.

A key left out of a facts file means *unknown*; ``null`` means *absent* (a package that is
not installed). The two are kept apart everywhere: :data:`UNKNOWN` stands for the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from packaging.version import InvalidVersion, Version

from .errors import FactsError, read_json_file

SCHEMA = 1


class _Unknown:
    """The value of a fact nobody measured. Falsy, and distinct from ``None`` (absent)."""

    _instance: "_Unknown | None" = None

    def __new__(cls) -> "_Unknown":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()

# Distributions whose versions the probe reads (package metadata, never an import).
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "optimum",
    "bitsandbytes",
    "torchao",
    "gemlite",
    "flash-attn",
    "flash-attn-3",
    "flash-attn-4",
    "kernels",
    "triton",
    "nvidia-ml-py",
    "safetensors",
    "huggingface-hub",
)

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Capability:
    """A compute capability, e.g. ``Capability(8, 6)``. Compare with specifiers via ``str``."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> "Capability":
        try:
            major, minor = str(text).split(".")
            return cls(int(major), int(minor))
        except ValueError:
            raise FactsError(f"compute capability {text!r} is not of the form 'major.minor' (e.g. '8.6')") from None

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)


@dataclass(frozen=True)
class GPU:
    index: Any = UNKNOWN
    uuid: Any = UNKNOWN
    pci_bus_id: Any = UNKNOWN
    name: Any = UNKNOWN
    compute_capability: Any = UNKNOWN
    memory_total_gib: Any = UNKNOWN
    memory_free_gib: Any = UNKNOWN
    mig_mode: Any = UNKNOWN
    nvml_index: Any = UNKNOWN
    # health: memory held by other processes, clock-event reasons, uncorrected ECC errors
    other_processes: Any = UNKNOWN
    memory_used_by_others_gib: Any = UNKNOWN
    clock_event_reasons: Any = UNKNOWN
    ecc_uncorrected: Any = UNKNOWN

    @property
    def capability(self) -> Capability | None:
        if not isinstance(self.compute_capability, str):
            return None
        return Capability.parse(self.compute_capability)

    def label(self) -> str:
        idx = "?" if self.index is UNKNOWN else self.index
        name = "unknown GPU" if self.name is UNKNOWN else self.name
        return f"GPU {idx} ({name})"


@dataclass(frozen=True)
class Link:
    """How two GPUs (by CUDA ordinal) talk: NVLink link count, P2P, and NVML's topology level."""

    a: int
    b: int
    nvlink_links: Any = UNKNOWN
    p2p: Any = UNKNOWN
    topology: Any = UNKNOWN


@dataclass(frozen=True)
class Problem:
    """A broken installation: what is wrong, what was found, and the exact command that mends it."""

    id: str
    message: str
    fix: str
    severity: str = "error"


@dataclass(frozen=True)
class Facts:
    schema: int = SCHEMA
    source: str = "file"
    taken_at: Any = UNKNOWN
    gpus: Any = UNKNOWN  # tuple[GPU, ...] | UNKNOWN
    links: Any = UNKNOWN  # tuple[Link, ...] | UNKNOWN
    driver: Any = UNKNOWN  # {"version": ..., "cuda": ...}
    packages: Mapping[str, Any] = field(default_factory=dict)  # absent key = unknown
    torch_cuda: Any = UNKNOWN
    host: Any = UNKNOWN  # dict
    env: Any = UNKNOWN  # dict of the variables in ENV_VARS (None = unset)
    nvml: Any = UNKNOWN  # {"status": "ok" | "no-library" | "error", "message": ...}
    problems: tuple[Problem, ...] = ()
    deep: Any = UNKNOWN  # what --deep found (a dict), or UNKNOWN

    # ---- questions the rules and reports ask -------------------------------------------
    def package(self, name: str) -> Any:
        """The version string, ``None`` if not installed, or ``UNKNOWN``."""
        return self.packages.get(name, UNKNOWN)

    def package_version(self, name: str) -> Version | None | Any:
        v = self.package(name)
        if v is None or v is UNKNOWN:
            return v
        parsed = parse_version(v)
        return UNKNOWN if parsed is None else parsed

    def unparsed_versions(self) -> list[str]:
        """Installed packages whose version text is not PEP 440 ("name 'text'")."""
        return [f"{k} {v!r}" for k, v in sorted(self.packages.items()) if isinstance(v, str) and parse_version(v) is None]

    @property
    def gpu_count(self) -> Any:
        return UNKNOWN if self.gpus is UNKNOWN else len(self.gpus)

    def gpu(self, index: int) -> GPU | None:
        if self.gpus is UNKNOWN:
            return None
        for g in self.gpus:
            if g.index == index:
                return g
        return None

    def fingerprint(self) -> str:
        """What makes two machines the same for tuning: GPUs (model, memory), driver, packages."""
        stable = {
            "gpus": None
            if self.gpus is UNKNOWN
            else [[g.name, g.compute_capability, _round(g.memory_total_gib)] for g in self.gpus],
            "driver": None if self.driver is UNKNOWN else self.driver,
            "packages": dict(sorted(self.packages.items())),
            "torch_cuda": None if self.torch_cuda is UNKNOWN else self.torch_cuda,
        }
        blob = json.dumps(stable, sort_keys=True, default=str).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> "Facts":
        return dataclasses.replace(self, **changes)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.schema, "source": self.source}
        if self.taken_at is not UNKNOWN:
            out["taken_at"] = self.taken_at
        if self.gpus is not UNKNOWN:
            out["gpus"] = [_known(dataclasses.asdict(g)) for g in self.gpus]
        if self.links is not UNKNOWN:
            out["links"] = [_known(dataclasses.asdict(link)) for link in self.links]
        for key in ("driver",):
            if getattr(self, key) is not UNKNOWN:
                out[key] = getattr(self, key)
        out["packages"] = dict(self.packages)
        for key in ("torch_cuda", "host", "env", "nvml"):
            if getattr(self, key) is not UNKNOWN:
                out[key] = getattr(self, key)
        if self.problems:
            out["problems"] = [dataclasses.asdict(p) for p in self.problems]
        if self.deep is not UNKNOWN:
            out["deep"] = self.deep
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "facts") -> "Facts":
        if not isinstance(data, dict):
            raise FactsError(f"{where}: expected a JSON object, found {type(data).__name__}")
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise FactsError(f"{where}: schema {schema!r} is not supported (this autotune reads schema {SCHEMA})")
        kw: dict[str, Any] = {"schema": SCHEMA, "source": _typed(data, "source", str, where, default="file")}
        if "taken_at" in data:
            kw["taken_at"] = data["taken_at"]
        if "gpus" in data:
            gpus = _typed(data, "gpus", list, where)
            kw["gpus"] = tuple(_gpu_from(g, f"{where}: gpus[{i}]", i) for i, g in enumerate(gpus))
        if "links" in data:
            links = _typed(data, "links", list, where)
            kw["links"] = tuple(_link_from(x, f"{where}: links[{i}]") for i, x in enumerate(links))
        if "driver" in data:  # null: no NVIDIA driver
            kw["driver"] = None if data["driver"] is None else _typed(data, "driver", dict, where)
        packages = _typed(data, "packages", dict, where, default={})
        for name, ver in packages.items():
            if ver is not None and not isinstance(ver, str):
                raise FactsError(f"{where}: packages.{name}: expected a version string or null, found {ver!r}")
            # a version that is not PEP 440 (a source build's own label) is kept as written:
            # installed, version unknown (rule FACTS-VERSION-UNPARSED says so; version rules go unevaluated)
        kw["packages"] = {_norm(k): v for k, v in packages.items()}
        if "torch_cuda" in data:
            tc = data["torch_cuda"]
            if tc is not None and not isinstance(tc, str):
                raise FactsError(f"{where}: torch_cuda: expected a string like '12.4' or null, found {tc!r}")
            kw["torch_cuda"] = tc
        for key in ("host", "env", "nvml", "deep"):
            if key in data:
                kw[key] = _typed(data, key, dict, where)
        if "problems" in data:
            probs = _typed(data, "problems", list, where)
            try:
                kw["problems"] = tuple(Problem(**p) for p in probs)
            except TypeError as e:
                raise FactsError(f"{where}: problems: {e}") from None
        return cls(**kw)


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _round(x: Any) -> Any:
    return round(x) if isinstance(x, (int, float)) else None


def _known(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not UNKNOWN}


def _typed(data: dict, key: str, typ: type, where: str, default: Any = UNKNOWN) -> Any:
    if key not in data:
        if default is UNKNOWN:
            raise FactsError(f"{where}: {key} is missing")
        return default
    value = data[key]
    if not isinstance(value, typ):
        raise FactsError(f"{where}: {key}: expected {typ.__name__}, found {type(value).__name__} {value!r}")
    return value


_GPU_FIELDS = {f.name for f in dataclasses.fields(GPU)}
_NUMERIC = ("memory_total_gib", "memory_free_gib", "memory_used_by_others_gib")


def _gpu_from(raw: Any, where: str, position: int) -> GPU:
    if not isinstance(raw, dict):
        raise FactsError(f"{where}: expected an object, found {raw!r}")
    unknown_keys = set(raw) - _GPU_FIELDS
    kw = {k: v for k, v in raw.items() if k in _GPU_FIELDS}
    kw.setdefault("index", position)
    if not isinstance(kw["index"], int) or isinstance(kw["index"], bool):
        raise FactsError(f"{where}: index: expected an integer CUDA ordinal, found {kw['index']!r}")
    if "compute_capability" in kw:
        cc = kw["compute_capability"]
        if isinstance(cc, (int, float)) and not isinstance(cc, bool):
            cc = f"{cc:.1f}"  # a hand-written 8.6 is read as "8.6"
        if not isinstance(cc, str):
            raise FactsError(f"{where}: compute_capability: expected a string like '8.6', found {cc!r}")
        kw["compute_capability"] = str(Capability.parse(cc))
    for key in _NUMERIC:
        if key in kw and kw[key] is not None and (not isinstance(kw[key], (int, float)) or isinstance(kw[key], bool)):
            raise FactsError(f"{where}: {key}: expected a number of GiB, found {kw[key]!r}")
    if "memory_free_gib" in kw and kw["memory_free_gib"] is None:
        kw["memory_free_gib"] = UNKNOWN
    del unknown_keys  # extra fields are welcome (DESIGN.md): ignored, not rejected
    return GPU(**kw)


def _link_from(raw: Any, where: str) -> Link:
    if not isinstance(raw, dict) or "a" not in raw or "b" not in raw:
        raise FactsError(f"{where}: expected an object with 'a' and 'b' (CUDA ordinals)")
    fields = {f.name for f in dataclasses.fields(Link)}
    return Link(**{k: v for k, v in raw.items() if k in fields})


def load_facts(path: str | Path) -> Facts:
    """Read a facts file. Every problem with it is a :class:`FactsError` with one clear line."""
    return Facts.from_dict(read_json_file(path, "facts", FactsError), where=str(path))


def parse_version(text: Any) -> Version | None:
    """``Version(text)``, or None when it is not PEP 440 (or not a string)."""
    if not isinstance(text, str):
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None
