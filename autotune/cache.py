"""The result cache: measurements keyed by machine, stack, model, workload, tune options and the code that measured them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import __version__
from .config import Workload
from .facts import Facts
from .model import ModelSpec
from .space import first_gpu_name
from .trial import STATUS_OK, Trial


@functools.cache
def code_fingerprint() -> str:
    """A hash of the code and the rules that measure and judge: autotune's own sources and rule
    files. The version string alone did not move when a source checkout (or a release that
    kept it) changed how a candidate is loaded or timed, so results measured by other code
    were reused; this keys them apart. Read once a process, about a megabyte."""
    from .rules import rules_dir

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in [*sorted(pkg.rglob("*.py")), *sorted(rules_dir().glob("*.toml"))]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class ResultCache:
    """Measurements keyed by facts fingerprint, model, workload, objective, autotune version and
    :func:`code_fingerprint`.

    One JSON file per tune key; each trial's result is written as it finishes (atomic
    replace), so Ctrl-C or a spent time budget keeps what was measured and a rerun resumes.
    """

    def __init__(self, root: str | Path, facts: Facts, model: ModelSpec, workload: Workload, extra: str = "") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"facts": facts.fingerprint(), "model": model_fingerprint(model), "workload": dataclasses.asdict(workload),
                           "version": __version__, "code": code_fingerprint(), "extra": extra}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.path = self.root / f"{self.key}.json"
        self.meta = {"gpu": first_gpu_name(facts),
                     "torch": facts.package("torch"), "transformers": facts.package("transformers"),
                     "model": model_fingerprint(model), "workload": dataclasses.asdict(workload)}
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.data = {}
        self.data.setdefault("results", {})
        self.data["meta"] = self.meta
        self.hits = 0

    def trial_key(self, t: Trial, n: int) -> str:
        """The key of a trial's n-th measurement."""
        return self.key_of(t.config, n)

    def key_of(self, *parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, key: str) -> dict[str, Any] | None:
        r = self.data["results"].get(key)
        if r is not None and r.get("status") in (STATUS_OK,) and (not r.get("dir") or Path(r["dir"]).exists()):
            self.hits += 1
            return r
        return None

    def put(self, key: str, result: dict[str, Any]) -> None:
        self.data["results"][key] = result
        self._write()

    def save_pick(self, config: dict[str, Any]) -> None:
        self.data["pick"] = config
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one


def model_fingerprint(model: ModelSpec) -> str:
    blob = json.dumps({"type": model.model_type, "arch": model.architectures, "tensors": [(t.name, t.shape, t.dtype) for t in model.tensors],
                       "shape": [model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads, model.vocab_size]}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("AUTOTUNE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "autotune")
    return Path(base)


def usable_cache_dir() -> Path:
    """``cache_dir()``, created if missing; a :class:`UserError` (one line, exit 2) when it is a
    file, cannot be created, or cannot be written."""
    import tempfile

    from .errors import UserError

    root = cache_dir()
    why = "AUTOTUNE_CACHE_DIR" if os.environ.get("AUTOTUNE_CACHE_DIR") else "the cache folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{why} {root} is not a writable folder ({e.strerror or e}); point AUTOTUNE_CACHE_DIR at one") from None
    return root
