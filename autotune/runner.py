"""Isolated, cheap candidate runs: a warm fork server, a fresh child per candidate.

The fork server (``_forkserver.py``, its own process) imports torch and transformers once
and never touches CUDA. Each candidate is a child forked from it: imports cost nothing, and
allocator caches, CUDA-graph pools, dynamo's recompile limit, global backend flags and
sticky CUDA errors die with the child. A crash, hang (timeout) or OOM in one candidate is a
result, never the end of the tune; if the server itself dies it is started again.

Two other ways in, with the same timeout, result files and failure reports:

* while the server is still importing (15-25 s on a GPU machine), the first candidate runs in
  a fresh interpreter beside it (``python -m autotune.worker``) instead of waiting; its timed
  runs wait until the server is ready, so the two never overlap with a measurement;
* a tensor-parallel candidate (``spec["nproc"] > 1``) is started with torchrun, one fresh
  process per GPU; the ranks' results are merged (rank 0's timings, every rank's GPU peak).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ._proc import kill_group


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
        self._tmp = tempfile.TemporaryDirectory(prefix="autotune-run-")
        self.workdir = Path(workdir or self._tmp.name)  # may be changed before the first run
        self.count = 0  # the last run folder's number
        self.runs = 0
        self.proc: subprocess.Popen | None = None
        self.server_start_s: float | None = None
        self.fresh_first = True  # the first candidate may run in a fresh interpreter while the server imports
        self._hello: threading.Thread | None = None
        self._hello_line: str | None = None
        self._ready_flag = Path(self._tmp.name) / "server-ready"
        self._current: Path | None = None  # the run folder of the candidate the server is running

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start(self) -> None:
        """Start the fork server now, without waiting for it (it imports for 15-25 s on a GPU
        machine): call this first, and do the CPU-side work of the tune meanwhile."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._ready_flag.unlink(missing_ok=True)
        self._t0 = time.perf_counter()
        # the server's parent pid: it exits at once if this process is already gone when it asks
        # Linux to end it with its parent (a tune killed while the server was still starting)
        env = {**self._env(), "AUTOTUNE_SERVER_PARENT": str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "autotune._forkserver", *self.preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)

        def hello() -> None:
            self._hello_line = self._read(180)
            self.server_start_s = time.perf_counter() - self._t0
            self._ready_flag.touch()  # also on failure: nothing waits for a server that will not come

        self._hello = threading.Thread(target=hello, daemon=True)
        self._hello.start()

    def _server_ready(self) -> bool:
        return self._hello is not None and not self._hello.is_alive()

    def _server(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None and self._server_ready():
            return self.proc
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self._hello is not None and self.proc is not None
        self._hello.join()
        hello = self._hello_line
        if not hello or not json.loads(hello).get("ready"):
            self.close_server()
            raise RuntimeError("the fork server did not start (is torch importable?)")
        if json.loads(hello).get("cuda_initialized"):  # children would inherit a CUDA context
            self.close_server()
            raise RuntimeError("the fork server initialised CUDA while importing; candidates cannot be forked from it")
        return self.proc

    def _process(self, cmd: list[str], spec: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
        """Run ``cmd`` (a fresh interpreter or torchrun) in its own session; kill it on timeout."""
        (out / "spec.json").write_text(json.dumps(spec))
        with open(out / "log.txt", "wb") as log:
            proc = subprocess.Popen(cmd + [str(out / "spec.json"), str(out)], stdout=log, stderr=subprocess.STDOUT,
                                    env=self._env(), start_new_session=True)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait()
                return {"exit": None, "signal": signal.SIGKILL, "timed_out": True}
            except BaseException:  # an interrupt: the run's whole session ends with it
                kill_group(proc.pid)
                proc.wait()
                raise
        if code < 0:
            return {"exit": None, "signal": -code, "timed_out": False}
        return {"exit": code, "signal": None, "timed_out": False}

    def _read(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:  # a fresh folder: earlier runs' folders hold logits that cached results point to
            self.count += 1
            out = self.workdir / f"{self.count:03d}"
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        self.runs += 1
        timeout = float(spec.get("timeout_s") or self.timeout_s)
        t0 = time.perf_counter()
        nproc = int(spec.get("nproc") or 1)
        how = "forked"
        if nproc > 1:
            how = "torchrun"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "autotune.worker"]
            reply = self._process(cmd, spec, out, timeout)
        elif self.fresh_first and self.runs == 1 and self.proc is not None and not self._server_ready():
            how = "fresh interpreter (the fork server was still importing)"
            reply = self._process([sys.executable, "-m", "autotune.worker"], {**spec, "wait_for": str(self._ready_flag), "parent_pid": os.getpid()},
                                  out, timeout)
        else:
            proc = self._server()
            assert proc.stdin is not None
            self._current = out
            proc.stdin.write(json.dumps({"spec": spec, "out_dir": str(out), "timeout": timeout}) + "\n")
            proc.stdin.flush()
            try:
                line = self._read(timeout + 60)
            except BaseException:  # an interrupt: end the candidate (its own session) and the server now
                self.close_server()
                raise
            self._current = None
            reply = json.loads(line) if line else {"exit": None, "signal": None, "timed_out": True, "server_lost": True}
            if line is None:
                self.close_server()
        wall = time.perf_counter() - t0
        if reply.get("timed_out"):
            result = {"label": spec["label"], "status": "timeout", "error": f"no result after {timeout:.0f} s (hung?); killed"}
        elif (out / "result.json").is_file():
            result = _merge_ranks(out)
        else:
            how = f"killed by signal {signal.Signals(reply['signal']).name}" if reply.get("signal") else f"exit code {reply.get('exit')}"
            result = {"label": spec["label"], "status": "crashed", "error": f"the candidate's process died ({how}): {_tail(out / 'log.txt')}"}
        result["wall_s"] = round(wall, 2)
        result["dir"] = str(out)
        result["process"] = how
        return result

    def close_server(self) -> None:
        if self._current is not None:  # a candidate still running: the server wrote its pid
            try:
                kill_group(int((self._current / "child.pid").read_text()))
            except (OSError, ValueError):
                pass
            self._current = None
        if self.proc is not None:
            kill_group(self.proc.pid)
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
        self._tmp.cleanup()


def _merge_ranks(out: Path) -> dict[str, Any]:
    """Rank 0's result, with every rank's own GPU peak and the first failing rank's error."""
    result = json.loads((out / "result.json").read_text())
    for f in sorted(out.glob("result.rank*.json")):
        try:
            other = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in ("gpu_peak_gib", "gpu_reserved_gib"):
            if isinstance(other.get(key), dict):
                result.setdefault(key, {}).update(other[key])
        result["host_peak_gib"] = round(max(result.get("host_peak_gib") or 0, other.get("host_peak_gib") or 0), 3)
        if other.get("status") != "ok" and result.get("status") == "ok":
            result.update(status=other.get("status", "error"), error=f"{f.stem}: {other.get('error', '')}", oom=other.get("oom", False))
    return result


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:])[-400:] or "no output"
