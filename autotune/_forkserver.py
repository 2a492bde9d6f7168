"""A warm fork server: imports torch and transformers once (never CUDA), then forks a fresh
child per candidate. Protocol: one JSON request per line on stdin
``{"spec": {...}, "out_dir": "...", "timeout": s}``, one JSON reply per line on stdout
``{"exit": code, "signal": n | null, "timed_out": bool}``. Started by ``runner.ForkRunner``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from autotune._proc import die_with_parent, kill_group


def serve(preload: list[str]) -> None:
    import importlib

    parent = os.environ.pop("AUTOTUNE_SERVER_PARENT", "")  # popped: the candidates are this server's children
    die_with_parent(int(parent) if parent.isdigit() else None)  # the tune that started this server

    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # a missing model module only costs the child an import
    import torch

    out = sys.stdout
    out.write(json.dumps({"ready": True, "cuda_initialized": torch.cuda.is_initialized()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_one(req)) + "\n")
        out.flush()


def _one(req: dict) -> dict:
    out_dir, timeout = req["out_dir"], float(req["timeout"])
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.setsid()
            die_with_parent(server)
            log = os.open(os.path.join(out_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            from autotune.worker import run_candidate

            run_candidate(req["spec"], out_dir)
            code = 0
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    # where the runner finds the child (its own session) to end it with the tune
    with open(os.path.join(out_dir, "child.pid"), "w") as f:
        f.write(str(pid))
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            kill_group(pid)
            os.waitpid(pid, 0)
            return {"exit": None, "signal": signal.SIGKILL, "timed_out": True}
        time.sleep(0.05)
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status), "timed_out": False}
    return {"exit": os.WEXITSTATUS(status), "signal": None, "timed_out": False}


if __name__ == "__main__":
    serve(sys.argv[1:])
