"""A warm fork server: imports torch and transformers once (never CUDA), then forks a fresh
child per candidate. Protocol: one JSON request per line on stdin
``{"spec": {...}, "out_dir": "...", "timeout": s}``, one JSON reply per line on stdout when that
child has ended ``{"out_dir": "...", "exit": code, "signal": n | null, "timed_out": bool}``.
Several children may be running at once (the runner holds all but one of them before their timed
runs); replies come in the order the children end. Started by ``runner.ForkRunner``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from autotune._proc import die_with_parent, kill_group


def serve(preload: list[str]) -> None:
    import importlib

    parent = os.environ.pop("AUTOTUNE_SERVER_PARENT", "")  # popped: the candidates are this server's children
    die_with_parent(int(parent) if parent.isdigit() else None)  # the tune that started this server

    import torch
    import torch.utils._triton as tt

    # Asking torch for the GPU's compute capability initialises CUDA. A module that asks at import
    # (torchao 0.18, reached from transformers' torchao quantizer when torchao is installed:
    # prototype/mx_formats/kernels.py calls has_triton() and is_sm_at_least_100() at module level)
    # would leave a CUDA context that no forked child can use. While preloading, both questions
    # are answered from NVML instead; afterwards torch's own functions are back.
    plain = tt.has_triton, torch.cuda.get_device_capability
    tt.has_triton, torch.cuda.get_device_capability = has_triton_without_cuda, capability_without_cuda
    try:
        for name in preload:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # a missing model module only costs the child an import
    finally:
        tt.has_triton, torch.cuda.get_device_capability = plain

    out = sys.stdout
    out.write(json.dumps({"ready": True, "cuda_initialized": torch.cuda.is_initialized()}) + "\n")
    out.flush()
    running: dict[int, tuple[str, float]] = {}  # pid -> (out_dir, deadline)
    buf, eof = b"", False
    while not eof or running:
        # stdin is read raw (os.read), not through sys.stdin's buffer, which select cannot see
        ready, _, _ = select.select([] if eof else [0], [], [], 0.05 if running else None)
        if ready:
            chunk = os.read(0, 65536)
            eof = not chunk
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    req = json.loads(line)
                    running[_fork(req)] = (req["out_dir"], time.monotonic() + float(req["timeout"]))
        for pid, (out_dir, deadline) in list(running.items()):
            reply = _reap(pid, deadline)
            if reply is not None:
                del running[pid]
                out.write(json.dumps({"out_dir": out_dir, **reply}) + "\n")
                out.flush()


_CAPS: list[tuple[int, int]] | None = None


def _capabilities() -> list[tuple[int, int]]:
    """Each visible GPU's compute capability by CUDA ordinal, from NVML (the probe's ordering
    under CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER); empty without NVML or a GPU."""
    global _CAPS
    if _CAPS is None:
        try:
            from autotune.facts import UNKNOWN
            from autotune.machine import probe

            gpus = probe(packages={}, host={}).gpus
            _CAPS = [] if gpus is UNKNOWN else [(c.major, c.minor) for g in gpus for c in [g.capability] if c is not None]
        except Exception:  # noqa: BLE001 - no NVML: no CUDA device
            _CAPS = []
    return _CAPS


def capability_without_cuda(device: object = None) -> tuple[int, int]:
    """``torch.cuda.get_device_capability`` from NVML (raises like torch when there is no GPU)."""
    caps = _capabilities()
    if isinstance(device, str):
        idx = int(device.split(":")[1]) if ":" in device else None
    elif isinstance(device, int) or device is None:
        idx = device
    else:  # a torch.device
        idx = getattr(device, "index", None)
    idx = 0 if idx is None else int(idx)
    if not 0 <= idx < len(caps):
        raise RuntimeError("no CUDA GPU with that ordinal (read through NVML)")
    return caps[idx]


def has_triton_without_cuda() -> bool:
    """What ``torch.utils._triton.has_triton`` answers on CUDA (triton importable and a GPU of
    compute capability 7.0 or newer), read through NVML, without initialising CUDA."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    caps = _capabilities()
    return bool(caps) and caps[0][0] >= 7


def _fork(req: dict) -> int:
    out_dir = req["out_dir"]
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.setsid()
            die_with_parent(server)
            log = os.open(os.path.join(out_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            null = os.open(os.devnull, os.O_RDONLY)  # the server's requests are not the child's
            os.dup2(null, 0)
            from autotune.worker import run_candidate

            run_candidate(req["spec"], out_dir)
            code = 0
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    # where the runner finds the child (its own session) to end it with the tune
    tmp = os.path.join(out_dir, "child.pid.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, os.path.join(out_dir, "child.pid"))
    return pid


def _reap(pid: int, deadline: float) -> dict | None:
    """The reply for a child that has ended (killed first if past its deadline); None while it runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        if time.monotonic() <= deadline:
            return None
        kill_group(pid)
        os.waitpid(pid, 0)
        return {"exit": None, "signal": signal.SIGKILL, "timed_out": True}
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status), "timed_out": False}
    return {"exit": os.WEXITSTATUS(status), "signal": None, "timed_out": False}


if __name__ == "__main__":
    serve(sys.argv[1:])
