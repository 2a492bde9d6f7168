"""Process hygiene shared by the runner and the fork server (imports nothing of autotune):
a child that dies with its parent, and killing a process group."""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when the process that started it ends (also when that
    one is killed outright, where no handler of its own can run). ``parent``: exit at once if it
    is already gone. Elsewhere a no-op: the runner's own clean-up is all there is."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent check below still stops a child whose parent is already gone
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent ended before the request took effect


def kill_group(pid: int) -> None:
    """SIGKILL a process and everything it started (each run has its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def carrying(text: str) -> list[int]:
    """Pids of this user's processes (not this one) whose environment contains ``text``: how a
    test or benchmark finds everything a run it started left behind (Linux /proc)."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "environ").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out
