"""Built-in target profiles (``--target NAME``) and single-fact overrides (``--set KEY=VALUE``).

A target is a profile name (``h100-80gb``), optionally with a GPU count (``4xh100-80gb``),
or several joined by ``+`` for a machine with mixed GPUs (``t4+a100-80gb``); the software
stack comes from the first part. Data: ``data/profiles.toml`` (``""`` there means "not
installed", as TOML has no null).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from packaging.version import InvalidVersion, Version

from .errors import UserError
from .facts import GPU, UNKNOWN, Facts, _norm


@lru_cache(maxsize=1)
def _profiles() -> dict[str, dict[str, Any]]:
    text = resources.files("autotune").joinpath("data/profiles.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def profile_names() -> list[str]:
    return list(_profiles())


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    profiles = _profiles()
    key = name.strip().lower()
    if key in profiles:
        return key, profiles[key]
    for real, prof in profiles.items():
        if key in prof.get("aliases", []):
            return real, prof
    raise UserError(f"unknown target {name!r}; known targets: {', '.join(profile_names())} (e.g. 2xh100-80gb, t4+a100-80gb)")


def load_target(spec: str) -> Facts:
    """Facts for a target such as ``a100-80gb``, ``2xh100`` or ``t4+a100-80gb``."""
    raw = spec.split("+")
    parts = [p for p in raw if p.strip()]
    if not parts:
        raise UserError("empty target name")
    if len(parts) != len(raw):
        raise UserError(f"target {spec!r}: an empty part around '+' (combine as t4+a100-80gb)")
    gpus: list[GPU] = []
    first: dict[str, Any] | None = None
    names = []
    for part in parts:
        m = re.fullmatch(r"\s*(?:(\d+)x)?(.+?)\s*", part)
        count = int(m.group(1)) if m and m.group(1) else 1
        if count < 1:
            raise UserError(f"target {spec!r}: {count}x names no GPU (use 1x or more)")
        real, prof = _resolve(m.group(2) if m else part)
        names.append(f"{count}x{real}" if count > 1 else real)
        first = first or prof
        for g in prof["gpu"]:
            for _ in range(count):
                gpus.append(GPU(index=len(gpus), **g))
    assert first is not None
    return Facts(
        source="profile:" + "+".join(names),
        gpus=tuple(gpus),
        links=UNKNOWN,
        driver=dict(first["driver"]) if first["driver"] else None,
        packages={_norm(k): (v or None) for k, v in first["packages"].items()},
        torch_cuda=first.get("torch_cuda") or None,
        host=dict(first["host"]),
    )


def describe_targets() -> list[tuple[str, str]]:
    return [(name, prof.get("description", "")) for name, prof in _profiles().items()]


# ---------------------------------------------------------------------------- --set
_GPU_KEYS = {f.name for f in dataclasses.fields(GPU)}


def apply_overrides(facts: Facts, overrides: Iterable[str]) -> Facts:
    """Apply ``KEY=VALUE`` overrides: ``packages.NAME=VERSION|null``, ``gpus.count=N``,
    ``gpus.N.FIELD=VALUE`` (or ``gpus.FIELD`` for every GPU), ``driver.cuda=12.4``,
    ``torch_cuda=12.8|null``, ``host.FIELD=VALUE``."""
    overrides = list(overrides)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. packages.flash-attn=2.8.3 or gpus.count=2")
        value: Any = None if raw.lower() in ("null", "none", "") else raw
        path = key.split(".")
        if path[0] == "packages" and len(path) == 2:
            if value is not None:
                try:
                    Version(value)
                except InvalidVersion:
                    raise UserError(f"--set {key}: {raw!r} is not a valid version") from None
            facts = facts.replace(packages={**facts.packages, _norm(path[1]): value})
        elif path == ["gpus", "count"]:
            facts = _set_gpu_count(facts, _int(key, raw))
        elif path[0] == "gpus" and len(path) in (2, 3):
            field = path[-1]
            if field not in _GPU_KEYS or field == "index":
                raise UserError(f"--set {key}: unknown GPU field {field!r}; known: {', '.join(sorted(_GPU_KEYS - {'index'}))}")
            if facts.gpus is UNKNOWN or not facts.gpus:
                raise UserError(f"--set {key}: these facts list no GPU to change (set gpus.count first)")
            which = None if len(path) == 2 else _int(key, path[1])
            if which is not None and facts.gpu(which) is None:
                raise UserError(f"--set {key}: there is no GPU {which} (GPUs: {len(facts.gpus)})")
            typed = _gpu_value(key, field, value)
            facts = facts.replace(
                gpus=tuple(
                    dataclasses.replace(g, **{field: typed}) if which is None or g.index == which else g for g in facts.gpus
                )
            )
        elif path[0] in ("driver", "host") and len(path) == 2:
            base = getattr(facts, path[0])
            base = {} if base in (UNKNOWN, None) else dict(base)
            if path == ["host", "cpu_flags"]:
                base[path[1]] = [] if value is None else [f.strip() for f in value.split(",") if f.strip()]
            elif path[0] == "host" and path[1] in ("cpu_count", "ram_gib", "ram_available_gib"):
                base[path[1]] = _scalar(value)
            else:
                base[path[1]] = value  # versions stay strings: "3.10" is not 3.1
            facts = facts.replace(**{path[0]: base})
        elif path == ["torch_cuda"]:
            facts = facts.replace(torch_cuda=value)
        else:
            raise UserError(
                f"--set {key}: unknown fact; use packages.NAME, gpus.count, gpus[.N].FIELD, driver.FIELD, host.FIELD or torch_cuda"
            )
    if overrides and not facts.source.endswith("+set"):
        facts = facts.replace(source=facts.source + "+set")
    return facts


def _int(key: str, raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise UserError(f"--set {key}: {raw!r} is not a whole number") from None
    if n < 0:
        raise UserError(f"--set {key}: {n} is negative")
    return n


def _scalar(value: Any) -> Any:
    if value is None:
        return None
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def _gpu_value(key: str, field: str, value: Any) -> Any:
    if field == "compute_capability":
        if value is None or not re.fullmatch(r"\d+\.\d+", value):
            raise UserError(f"--set {key}: expected a compute capability like 8.6, found {value!r}")
        return value
    if field.endswith("_gib"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"--set {key}: expected a number of GiB, found {value!r}") from None
    return _scalar(value)


def _set_gpu_count(facts: Facts, n: int) -> Facts:
    gpus = list(() if facts.gpus is UNKNOWN else facts.gpus)
    if n > len(gpus) and not gpus:
        raise UserError("--set gpus.count: these facts list no GPU to copy; pick a GPU target first (e.g. --target a100-80gb)")
    while len(gpus) < n:
        gpus.append(dataclasses.replace(gpus[-1], index=len(gpus), uuid=UNKNOWN, pci_bus_id=UNKNOWN))
    return facts.replace(gpus=tuple(gpus[:n]), links=UNKNOWN)
