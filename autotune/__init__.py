"""autotune: a compatibility checker and auto-tuner for Hugging Face transformers inference.

The public API is imported lazily, so ``import autotune`` (and ``autotune doctor``) never
imports torch or transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "probe": ("autotune.machine", "probe"),
    "Facts": ("autotune.facts", "Facts"),
    "load_facts": ("autotune.facts", "load_facts"),
    "load_target": ("autotune.profiles", "load_target"),
    "check": ("autotune.gate", "check"),
    "doctor": ("autotune.diagnosis", "doctor"),
    "load": ("autotune.config", "load"),
    "parse_config": ("autotune.config", "parse_config"),
    "read_model": ("autotune.model", "read_model"),
    "UserError": ("autotune.errors", "UserError"),
    "tune": ("autotune.tuner", "tune"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
