"""A store in one SQLite file: survives restarts and is shared by every worker process on the host.

WAL lets readers run beside the single writer. Reads are short indexed look-ups done on the event
loop; writes go through one dedicated thread so a busy lock never stalls the loop.

Beside the database, `<file>.changes` holds 8 random bytes that every process writing to it renews
after each commit (quiet swaps aside), mapped into memory by each process: `stamp()` costs no
system call, and a worker holding a record need not read it again while the stamp stays the same.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from . import StoreError

log = structlog.get_logger("avr_llm_proxy.stores.sqlite")
STAMP_SUFFIX = ".changes"
STAMP_BYTES = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL NOT NULL,
    tag TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS calls_expiry ON calls (expires_at);
CREATE INDEX IF NOT EXISTS calls_tag ON calls (tag);
"""


def _map_stamp(path: str) -> mmap.mmap | None:
    """The shared change stamp beside the database; None (every read goes to SQLite) if it cannot be made."""
    try:
        fd = os.open(path + STAMP_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < STAMP_BYTES:
                os.ftruncate(fd, STAMP_BYTES)
            return mmap.mmap(fd, STAMP_BYTES)
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        log.warning("sqlite_stamp_unavailable", path=path + STAMP_SUFFIX, reason=str(exc),
                    effect="every turn reads its record from SQLite")
        return None


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class SqliteStore:
    # Another worker process may write a record a turn here is waiting for.
    poll_interval: float | None = 0.02
    durable = True
    volatile = False

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._writer = _connect(path)
            columns = {row[1] for row in self._writer.execute("PRAGMA table_info(calls)")}
            if columns and "tag" not in columns:  # a database from before erasure by number
                self._writer.execute("ALTER TABLE calls ADD COLUMN tag TEXT")
            self._writer.executescript(_SCHEMA)
            self._reader = _connect(path)
            self._get = self._reader.cursor()  # one cursor for the turn path's look-ups, not one per read
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from exc
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._stamp = _map_stamp(path)

    async def _write(self, sql: str, params: tuple[object, ...], notify: bool = True) -> int:
        def run() -> int:
            changed = self._writer.execute(sql, params).rowcount
            if changed > 0 and notify and self._stamp is not None:
                # After the commit: a reader that sees the new stamp finds the new row.
                self._stamp[:STAMP_BYTES] = random.getrandbits(8 * STAMP_BYTES).to_bytes(STAMP_BYTES, "little")
            return changed

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, run)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite write failed: {exc}") from exc

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  ) -> bool:
        # Without replace, only an expired row (not yet purged) may be overwritten.
        condition = "" if replace else " WHERE calls.expires_at <= ?"
        params: tuple[object, ...] = (key, value, expires_at, tag)
        if not replace:
            params += (time.time(),)
        changed = await self._write(
            "INSERT INTO calls (key, value, expires_at, tag) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, "
            "tag = excluded.tag" + condition,
            params,
        )
        return changed > 0

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float, tag: str | None = None,
                   notify: bool = True) -> bool:
        changed = await self._write(
            "UPDATE calls SET value = ?, expires_at = ?, tag = ? WHERE key = ? AND value = ? AND expires_at > ?",
            (value, expires_at, tag, key, expected, time.time()), notify,
        )
        return changed > 0

    def stamp(self) -> bytes | None:
        return None if self._stamp is None else self._stamp[:STAMP_BYTES]

    async def delete_tagged(self, tag: str) -> int:
        return await self._write("DELETE FROM calls WHERE tag = ?", (tag,))

    async def get(self, key: str) -> bytes | None:
        try:
            row = self._get.execute(
                "SELECT value FROM calls WHERE key = ? AND expires_at > ?", (key, time.time())
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed: {exc}") from exc
        return None if row is None else bytes(row[0])

    async def delete(self, key: str) -> bool:
        return await self._write("DELETE FROM calls WHERE key = ?", (key,)) > 0

    async def recent(self, limit: int) -> list[bytes]:
        try:
            rows = self._reader.execute(
                "SELECT value FROM calls WHERE expires_at > ? ORDER BY expires_at DESC LIMIT ?", (time.time(), limit)
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed: {exc}") from exc
        return [bytes(row[0]) for row in rows]

    def listen(self, on_key: Callable[[str], None]) -> None:
        return None  # no change feed in SQLite: waiters poll every poll_interval

    async def purge_expired(self, now: float) -> int:
        return await self._write("DELETE FROM calls WHERE expires_at <= ?", (now,))

    async def ping(self) -> None:
        try:
            self._reader.execute("SELECT 1 FROM calls LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path} unusable: {exc}") from exc

    async def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._stamp is not None:
            self._stamp.close()
        self._reader.close()
        self._writer.close()
