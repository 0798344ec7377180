"""`<database>.changes`: the change stamps the processes sharing a SQLite store read from memory.

8 bytes per slot, renewed by the process that wrote after each commit; a key's slot is picked by a
hash of the key, and slot 0 is renewed by writes that may touch any key (erasure by number). Reading
a stamp costs no system call, so a worker holding a record need not read it again while its stamp
stays the same. A process follows the file when it is removed or replaced while others run (before
each renewal, and at most FOLLOW_EVERY_S after a read): a new file starts with random stamps, so what
a process held under the old one is read again.
"""

from __future__ import annotations

import mmap
import os
import random
import stat
import threading
import time
import zlib
from collections.abc import Iterable

import structlog

log = structlog.get_logger("avr_llm_proxy.stores.stamps")

STAMP_SUFFIX = ".changes"
STAMP_BYTES = 8
STAMP_SLOTS = 4096  # a write shares its slot with 1 in 4,096 other calls' records: a spare read for them
FOLLOW_EVERY_S = 1.0  # how long a process that only reads may go on with a stamp file that was replaced


def _slot(key: str | None) -> int:
    """Where a key's stamp is (None: slot 0, for writes that may touch any key)."""
    return 0 if key is None else (1 + zlib.crc32(key.encode()) % STAMP_SLOTS) * STAMP_BYTES


class ChangeStamps:
    """The stamp file of one database, mapped into this process."""

    def __init__(self, database: str) -> None:
        self.path = database + STAMP_SUFFIX
        self._database = database
        self._lock = threading.Lock()  # the event loop reads and the writer thread renews
        self._map: mmap.mmap | None = None
        self._identity: tuple[int, int] | None = None
        # Set when the file exists but cannot be used: other processes may be trusting it, so a write
        # from here would go unnoticed there (an erased caller still served), and writes are refused.
        self.problem: str | None = None
        self._checked_at = time.monotonic()
        self._open()

    def _open(self) -> None:
        """Map the file (created with the database's mode when missing), or say why not.

        Without stamps from the start every turn reads its record from SQLite. Once this process has
        used them, other processes count on its writes showing there: losing them is a problem.
        """
        size = (1 + STAMP_SLOTS) * STAMP_BYTES
        had = self._identity is not None or self.problem is not None
        self._map = self._identity = None
        try:
            mode = stat.S_IMODE(os.stat(self._database).st_mode)  # whoever may write the database may write this
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                info = os.fstat(fd)
                if info.st_size < size:
                    os.ftruncate(fd, size)
                    os.pwrite(fd, os.urandom(size), 0)  # new: matches no stamp held from an earlier file
                self._map, self._identity = mmap.mmap(fd, size), (info.st_dev, info.st_ino)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            if had or os.path.lexists(self.path):
                problem = f"cannot use {self.path} ({exc}): repair or remove it with every process stopped"
                if problem != self.problem:
                    log.error("sqlite_stamp_unusable", path=self.path, reason=str(exc), effect="writes refused")
                self.problem = problem
            else:
                log.warning("sqlite_stamp_unavailable", path=self.path, reason=str(exc),
                            effect="every turn reads its record from SQLite")
            return
        if self.problem is not None:
            log.warning("sqlite_stamp_usable_again", path=self.path)
        self.problem = None

    def follow(self) -> None:
        """Map the file again if it is no longer the one mapped (removed, replaced, or unusable until now)."""
        with self._lock:
            self._checked_at = time.monotonic()
            if self._identity is not None:
                try:
                    info = os.stat(self.path, follow_symlinks=False)
                    if (info.st_dev, info.st_ino) == self._identity:
                        return
                except OSError:
                    pass
                log.warning("sqlite_stamp_file_replaced", path=self.path, effect="records held here are read again")
            elif self.problem is None:
                return  # never had stamps: nothing here counts on them
            self._open()  # the old map is closed when the last reader lets go of it

    def read(self, key: str) -> bytes | None:
        if time.monotonic() - self._checked_at >= FOLLOW_EVERY_S:
            self.follow()
        stamps = self._map
        if stamps is None:
            return None
        offset = _slot(key)
        return stamps[:STAMP_BYTES] + stamps[offset:offset + STAMP_BYTES]

    def renew(self, keys: Iterable[str | None]) -> None:
        """New stamps for keys just committed (None: any key), in the file the other processes use now."""
        self.follow()
        stamps = self._map
        if stamps is None:
            return
        for key in keys:
            offset = _slot(key)
            stamps[offset:offset + STAMP_BYTES] = random.getrandbits(8 * STAMP_BYTES).to_bytes(STAMP_BYTES, "little")

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
            self._map = self._identity = None
