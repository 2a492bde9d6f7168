"""One tune measures on a machine at a time: two at once slow each other down and each takes
the other's load for its candidates' speed (seen: bf16 at 3.7 tok/s against fp32's 26.4, then
cached and reused). A second tune waits for the lock, saying so, or gives up after ``wait_s``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


class MeasureLock:
    """An exclusive ``flock`` on ``<cache>/locks/<device>.lock`` for the whole measuring part of
    a tune; the holder's pid and start time are written in the file for the message the second
    one prints. The kernel releases it when the holder exits, however it exits."""

    def __init__(self, root: Path, device: str, *, wait_s: float | None = None, say: Callable[[str], None] | None = None) -> None:
        self.path = Path(root) / "locks" / f"{device}.lock"
        self.wait_s = wait_s
        self.say = say or (lambda msg: None)
        self.fd: int | None = None
        self.waited_s = 0.0

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> MeasureLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                h = self.holder()
                who = f"pid {h.get('pid', '?')}, started {h.get('started', '?')}"
                if self.wait_s is not None and time.monotonic() - t0 >= self.wait_s:
                    os.close(fd)
                    raise UserError(f"another tune ({who}) is measuring on this machine; measurements taken together are wrong. "
                                    f"Run again when it ends, or wait longer with --wait SECONDS") from None
                if not told:
                    limit = "" if self.wait_s is None else f" (at most {self.wait_s:.0f} s; --wait SECONDS)"
                    self.say(f"waiting for another tune ({who}) to finish measuring on this machine{limit}")
                    told = True
                time.sleep(0.5)
        self.waited_s = time.monotonic() - t0
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
