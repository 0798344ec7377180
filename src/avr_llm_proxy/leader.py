"""One process per host for a duty that must not run once per worker: the AMI connection.

With `serve --workers N` every worker builds the same app; N AMI logins would read every event N
times and write every capture N times. The worker holding an advisory lock file does the duty; the
kernel drops the lock when that process dies, and a waiting worker takes over within `retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class HostLock:
    """An exclusive, non-blocking `flock` on a file named after the duty (keyed, so no secret shows)."""

    def __init__(self, duty: str, key: str, directory: Path | None = None) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = (directory or Path(tempfile.gettempdir())) / f"avr-llm-proxy-{duty}-{digest}.lock"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return False  # not ours (another user's file, a symlink): the duty waits rather than run twice
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


async def lead(lock: HostLock, duty: Callable[[], None], retry_s: float = 2.0) -> None:
    """Start `duty` once this process holds `lock`, trying again every `retry_s` while another holds it."""
    while True:
        if lock.try_acquire():
            duty()
            return
        await asyncio.sleep(retry_s)
