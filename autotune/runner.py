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

Several candidates may also be *launched* at once (:meth:`ForkRunner.launch`): each loads and
warms up beside the others (a compiled static cache compiles there: 25-50 s, mostly host work,
on an H100), then waits before its timed runs until it is released; the caller releases them one
at a time, so no timed run shares the machine with another candidate's work.
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


class Launch:
    """A candidate started in the fork server and held before its timed runs (``spec["wait_for"]``)
    until :meth:`release`. Made by :meth:`ForkRunner.launch`; :meth:`result` once released."""

    def __init__(self, runner: "ForkRunner", spec: dict[str, Any], out: Path, timeout: float) -> None:
        self.runner, self.out, self.timeout = runner, out, timeout
        self.go, self.warm = out / "go", out / "warm"
        self.spec = {**spec, "wait_for": str(self.go), "warm_file": str(self.warm), "wait_limit_s": 2 * timeout}
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        self.warm_s: float | None = None  # from the launch to the end of its warm-up (or of the process)
        self._error: str | None = None
        self._reply: dict[str, Any] | None = None
        # the request waits for the fork server in a thread: a launch does not block its caller
        # while the server is still importing
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()

    def _send(self) -> None:
        try:
            self.runner._submit(self.spec, self.out, 3 * self.timeout)  # warm-up, its turn, timed runs
        except RuntimeError as e:
            self._error = str(e)

    def _ended(self) -> bool:
        if self._reply is None and not self._sender.is_alive() and self._error is None:
            self._reply = self.runner._await(self.out, 0)
        return self._error is not None or self._reply is not None

    def wait_warm(self) -> None:
        """Until it has warmed up (or ended); killed if that takes longer than its timeout."""
        end = self.t0 + self.timeout
        while not self.warm.exists() and not self._ended():
            if time.perf_counter() > end:
                self.cancel(timed_out=True)
                break
            time.sleep(0.05)
        if self.warm_s is None:  # when it got there, not when it was asked
            try:
                self.warm_s = self.warm.stat().st_mtime - self.t0_wall
            except OSError:
                self.warm_s = time.perf_counter() - self.t0

    def release(self) -> None:
        """Let its timed runs start."""
        self.go.touch()

    def result(self) -> dict[str, Any]:
        """Its result (after :meth:`release`), as :meth:`ForkRunner.run` gives one."""
        self._sender.join()
        if self._error is not None:
            reply: dict[str, Any] = {"exit": None, "signal": None, "timed_out": False, "error": self._error}
        else:
            if self._reply is None:
                self._reply = self.runner._await(self.out, self.timeout)
            if self._reply is None:  # still running a timeout after its release
                self.cancel(timed_out=True)
            reply = self._reply or {"exit": None, "signal": None, "timed_out": True}
        res = self.runner._result(self.spec, self.out, reply, time.perf_counter() - self.t0, "forked, warmed up beside others")
        res["warm_s"] = round(self.warm_s, 2) if self.warm_s is not None else None
        return res

    def cancel(self, *, timed_out: bool = False) -> None:
        """End it now (its whole session) and collect the server's reply."""
        self._sender.join()
        if self._error is not None or self._reply is not None:
            return
        self.runner._kill_child(self.out)
        reply = self.runner._await(self.out, 30)
        self._reply = {**(reply or {"exit": None, "signal": signal.SIGKILL}), "timed_out": timed_out}


def preload_initialises_cuda() -> bool:
    """Would importing a model's modeling module in the fork server touch CUDA? With torchao
    installed it does (measured on the H100 with torchao 0.18: the modeling module imports
    transformers' quantizers, which import torchao, whose prototype kernels ask torch for the
    compute capability and load CUDA extensions at import; forked children then fail with "Cannot
    re-initialize CUDA in forked subprocess"). Then each child imports the model module itself.
    Without an NVIDIA GPU there is no CUDA to initialise."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return False
    from ._forkserver import _capabilities

    return bool(_capabilities())


class ForkRunner:
    """Runs each candidate in a child of a warm fork server, with a timeout."""

    def __init__(self, *, timeout_s: float = 600.0, workdir: str | Path | None = None, preload_model_type: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.preload = ["torch", "transformers", "transformers.generation.utils", "autotune.worker"]
        if preload_model_type and not preload_initialises_cuda():
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
        self._cv = threading.Condition()
        self._replies: dict[str, dict[str, Any]] = {}  # run folder -> the server's reply for its child
        self._pending: dict[str, subprocess.Popen] = {}  # run folder -> the server running its child
        self._write = threading.Lock()

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
        self.proc = proc = subprocess.Popen([sys.executable, "-m", "autotune._forkserver", *self.preload], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)

        def hello() -> None:
            self._hello_line = self._read(proc, 180)
            self.server_start_s = time.perf_counter() - self._t0
            self._ready_flag.touch()  # also on failure: nothing waits for a server that will not come
            if self._hello_line:  # then every reply, filed by run folder, until the server ends
                assert proc.stdout is not None
                for line in proc.stdout:
                    reply = json.loads(line)
                    with self._cv:
                        self._replies[reply["out_dir"]] = reply
                        self._pending.pop(reply["out_dir"], None)
                        self._cv.notify_all()
            with self._cv:  # the server is gone: what it was running gets no reply of its own
                for d in [d for d, p in self._pending.items() if p is proc]:
                    self._replies.setdefault(d, {"exit": None, "signal": None, "timed_out": False, "server_lost": True})
                    del self._pending[d]
                self._cv.notify_all()

        self._hello = threading.Thread(target=hello, daemon=True)
        self._hello.start()

    def _server_ready(self) -> bool:
        return self._hello is not None and self._ready_flag.exists()

    def _server(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None and self._server_ready() and self._hello_line:
            return self.proc
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None
        while not self._ready_flag.exists():
            time.sleep(0.02)
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

    @staticmethod
    def _read(proc: subprocess.Popen, timeout: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        return proc.stdout.readline() if ready else None

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        out = self._folder()
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
            self._submit(spec, out, timeout)
            try:
                reply = self._await(out, timeout + 60)
            except BaseException:  # an interrupt: end the candidate (its own session) and the server now
                self.close_server()
                raise
            if reply is None:
                reply = {"exit": None, "signal": None, "timed_out": True, "server_lost": True}
                self.close_server()
        return self._result(spec, out, reply, time.perf_counter() - t0, how)

    def launch(self, spec: dict[str, Any]) -> Launch:
        """Start ``spec`` in the fork server now, held before its timed runs until released (see
        :class:`Launch`). A tensor-parallel spec cannot be launched: :meth:`run` it."""
        if int(spec.get("nproc") or 1) > 1:
            raise ValueError("a tensor-parallel candidate runs with torchrun: use run()")
        return Launch(self, spec, self._folder(), float(spec.get("timeout_s") or self.timeout_s))

    def _folder(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:  # a fresh folder: earlier runs' folders hold logits that cached results point to
            self.count += 1
            out = self.workdir / f"{self.count:03d}"
            try:
                out.mkdir(parents=True)
                return out
            except FileExistsError:
                continue

    def _submit(self, spec: dict[str, Any], out: Path, timeout: float) -> None:
        """Hand ``spec`` to the fork server (waiting for it to be ready)."""
        with self._write:
            proc = self._server()
            assert proc.stdin is not None
            with self._cv:
                self._pending[str(out)] = proc
            try:
                proc.stdin.write(json.dumps({"spec": spec, "out_dir": str(out), "timeout": timeout}) + "\n")
                proc.stdin.flush()
            except OSError:  # the server died: its reader files this run as lost
                pass

    def _await(self, out: Path, timeout: float) -> dict[str, Any] | None:
        """The server's reply for the child in ``out``; None if none came within ``timeout``."""
        with self._cv:
            self._cv.wait_for(lambda: str(out) in self._replies, timeout)
            return self._replies.pop(str(out), None)

    def _kill_child(self, out: Path, wait_s: float = 5.0) -> None:
        """Kill the child running in ``out`` and all it started (the server writes its pid just after the fork)."""
        end = time.monotonic() + wait_s
        while True:
            try:
                kill_group(int((out / "child.pid").read_text()))
                return
            except (OSError, ValueError):
                with self._cv:
                    if str(out) not in self._pending or time.monotonic() > end:
                        return
                time.sleep(0.02)

    def _result(self, spec: dict[str, Any], out: Path, reply: dict[str, Any], wall: float, how: str) -> dict[str, Any]:
        timeout = float(spec.get("timeout_s") or self.timeout_s)
        if reply.get("timed_out"):
            result = {"label": spec["label"], "status": "timeout", "error": f"no result after {timeout:.0f} s (hung?); killed"}
        elif (out / "result.json").is_file():
            result = _merge_ranks(out)
        elif reply.get("error"):
            result = {"label": spec["label"], "status": "crashed", "error": str(reply["error"])}
        else:
            died = f"killed by signal {signal.Signals(reply['signal']).name}" if reply.get("signal") else f"exit code {reply.get('exit')}"
            result = {"label": spec["label"], "status": "crashed", "error": f"the candidate's process died ({died}): {_tail(out / 'log.txt')}"}
        result["wall_s"] = round(wall, 2)
        result["dir"] = str(out)
        result["process"] = how
        return result

    def _kill_pending(self, wait_s: float) -> None:
        with self._cv:
            pending = list(self._pending)
        for d in pending:
            self._kill_child(Path(d), wait_s=wait_s)

    def close_server(self) -> None:
        self._kill_pending(0)  # candidates still running: the server wrote their pids
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self._kill_pending(1)  # launched and never released (an interrupted tune): ended now
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
