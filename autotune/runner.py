"""Isolated, cheap candidate runs: a warm fork server, a fresh child per candidate.

The fork server (``_forkserver.py``, its own process) imports torch and transformers once
and never touches CUDA. Each candidate is a child forked from it: imports cost nothing, and
allocator caches, CUDA-graph pools, dynamo's recompile limit, global backend flags and
sticky CUDA errors die with the child. A crash, hang (timeout) or OOM in one candidate is a
result, never the end of the tune; if the server itself dies it is started again.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol


class CandidateRunner(Protocol):
    def run(self, spec: dict[str, Any]) -> dict[str, Any]: ...
    def close(self) -> None: ...


class ForkRunner:
    """Runs each candidate in a child of a warm fork server, with a timeout."""

    def __init__(self, *, timeout_s: float = 600.0, workdir: str | Path | None = None, preload_model_type: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.preload = ["torch", "transformers", "transformers.generation.utils", "autotune.worker"]
        if preload_model_type:
            mt = preload_model_type.replace("-", "_")
            self.preload.append(f"transformers.models.{mt}.modeling_{mt}")
        self._tmp = tempfile.TemporaryDirectory(prefix="autotune-run-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc: subprocess.Popen | None = None
        self.server_start_s: float | None = None

    def _server(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "autotune._forkserver", *self.preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
        hello = self._read(120)
        if not hello or not json.loads(hello).get("ready"):
            raise RuntimeError("the fork server did not start (is torch importable?)")
        if json.loads(hello).get("cuda_initialized"):  # children would inherit a CUDA context
            self.close_server()
            raise RuntimeError("the fork server initialised CUDA while importing; candidates cannot be forked from it")
        self.server_start_s = time.perf_counter() - t0
        return self.proc

    def _read(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        out = self.workdir / f"{self.count:03d}"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("result.json", "logits.pt"):
            (out / name).unlink(missing_ok=True)
        timeout = float(spec.get("timeout_s") or self.timeout_s)
        t0 = time.perf_counter()
        proc = self._server()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"spec": spec, "out_dir": str(out), "timeout": timeout}) + "\n")
        proc.stdin.flush()
        line = self._read(timeout + 60)
        wall = time.perf_counter() - t0
        reply = json.loads(line) if line else {"exit": None, "signal": None, "timed_out": True, "server_lost": True}
        if line is None:
            self.close_server()
        if reply.get("timed_out"):
            result = {"label": spec["label"], "status": "timeout", "error": f"no result after {timeout:.0f} s (hung?); killed"}
        elif (out / "result.json").is_file():
            result = json.loads((out / "result.json").read_text())
        else:
            how = f"killed by signal {signal.Signals(reply['signal']).name}" if reply.get("signal") else f"exit code {reply.get('exit')}"
            result = {"label": spec["label"], "status": "crashed", "error": f"the candidate's process died ({how}): {_tail(out / 'log.txt')}"}
        result["wall_s"] = round(wall, 2)
        result["dir"] = str(out)
        return result

    def close_server(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.close_server()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:])[-400:] or "no output"
