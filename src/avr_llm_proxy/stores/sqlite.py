"""A store in one SQLite file: survives restarts and is shared by every worker process on the host.

WAL lets readers run beside the single writer. Reads are short indexed look-ups done on the event
loop; writes go through one dedicated thread so a busy lock never stalls the loop, and the writes
queued while it commits are committed together (one transaction and one wake-up of the loop for
all of them: under a burst of captures, most of a commit's cost is shared).

Beside the database, `<file>.changes` holds change stamps (stamps.py), renewed after each commit
(quiet swaps aside): a worker holding a record need not read it again while its stamp stays the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from . import DEADLINE_S, ERASURE_KEPT_S, MAX_ENTRIES, NO_HISTORY, HistoryRow, StoreError
from .stamps import ChangeStamps

log = structlog.get_logger("avr_llm_proxy.stores.sqlite")
MAX_BATCH = 64  # writes committed in one transaction at most
TRIM_EVERY = 64  # a list past MAX_ENTRIES is trimmed when its length crosses a multiple of this
PER_STATEMENT = 500  # rows of a multi-row statement at most
BUSY_WAIT_MS = 5000  # how long a statement waits for another process's lock
PREPARE_WAIT_MS = 60_000  # the same while opening: another worker may be upgrading the file
_Item = TypeVar("_Item")

# Statements, not a script: they run in the transaction that upgrades an earlier file (executescript
# would commit it first).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS calls (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        expires_at REAL NOT NULL,
        tag TEXT,
        counter INTEGER NOT NULL DEFAULT 0,
        noted INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS calls_expiry ON calls (expires_at)",
    "CREATE INDEX IF NOT EXISTS calls_tag ON calls (tag)",
    """CREATE TABLE IF NOT EXISTS erased (
        tag TEXT PRIMARY KEY,
        at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS history (
        tag TEXT PRIMARY KEY,
        calls INTEGER NOT NULL,
        first_at REAL NOT NULL,
        last_at REAL NOT NULL,
        last_key TEXT NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS history_seen (
        tag TEXT NOT NULL,
        key TEXT NOT NULL,
        calls INTEGER NOT NULL,
        first_at REAL,
        last_at REAL,
        last_key TEXT,
        expires_at REAL NOT NULL,
        PRIMARY KEY (tag, key)
    ) WITHOUT ROWID""",
    # Rows in insertion order, found through the index: a batch's rows of kilobytes go at the table's
    # end, where in a WITHOUT ROWID table they went between other calls' rows (3x the writer's time).
    """CREATE TABLE IF NOT EXISTS timeline (
        key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        value BLOB NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS timeline_order ON timeline (key, seq)",
    # A call's timeline goes with its row, and starts again with a value written over an expired row.
    """CREATE TRIGGER IF NOT EXISTS timeline_goes AFTER DELETE ON calls BEGIN
        DELETE FROM timeline WHERE key = old.key;
    END""",
    """CREATE TRIGGER IF NOT EXISTS timeline_restarts AFTER UPDATE OF noted ON calls WHEN new.noted < old.noted
    BEGIN
        DELETE FROM timeline WHERE key = old.key;
    END""",
)


# A write that needs more than one statement (read, then write): run in the writer thread, in the
# batch's transaction or a write transaction of its own.
Steps = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class _Write:
    sql: str | Steps
    params: tuple[object, ...]
    key: str | None  # the key written; None: any may be
    notify: bool
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any]


_Outcome = tuple[_Write, Any]


def _settle(outcomes: Sequence[_Outcome]) -> None:
    """On the writes' event loop: each waiting write gets its row count or its error."""
    for write, result in outcomes:
        if write.done.cancelled():
            continue
        if isinstance(result, Exception):
            write.done.set_exception(StoreError(f"SQLite write failed: {type(result).__name__}: {result}"))
        else:
            write.done.set_result(result)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_WAIT_MS / 1000, isolation_level=None, check_same_thread=False)
    # Workers opening a file not yet in WAL mode at once: the switch answers "locked" at once to all
    # but one, whatever the busy timeout, and is tried again (once switched, the file stays WAL).
    waited_until = time.monotonic() + PREPARE_WAIT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > waited_until:
                conn.close()
                raise
            time.sleep(0.02)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _parts(items: list[_Item]) -> Iterator[list[_Item]]:
    """The items in slices of a statement's worth (3 parameters each, far below SQLite's 32766)."""
    for start in range(0, len(items), PER_STATEMENT):
        yield items[start:start + PER_STATEMENT]


def _marks(rows: int, columns: int) -> str:
    """`(?, ?), (?, ?)`: the placeholders of a VALUES list."""
    return ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)


def _prepare(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a file written by an earlier version to it keeping what it holds:
    under the write lock, so of the workers starting together one does it and the others find it done
    (waiting longer than a write would: copying an earlier file's timelines takes a while)."""
    conn.execute(f"PRAGMA busy_timeout={PREPARE_WAIT_MS}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
        for column, kind in (("tag", "TEXT"), ("counter", "INTEGER NOT NULL DEFAULT 0"),
                             ("noted", "INTEGER NOT NULL DEFAULT 0")):
            if columns and column not in columns:  # before erasure by number, counted turns, timelines
                conn.execute(f"ALTER TABLE calls ADD COLUMN {column} {kind}")
        timeline = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'timeline'").fetchone()
        before = timeline is not None and "WITHOUT ROWID" in timeline[0].upper()
        if before:
            conn.execute("ALTER TABLE timeline RENAME TO timeline_before")
        for statement in _SCHEMA:
            conn.execute(statement)
        if before:
            conn.execute("INSERT INTO timeline (key, seq, value) SELECT key, seq, value FROM timeline_before "
                         "WHERE key IN (SELECT key FROM calls)")
            conn.execute("DROP TABLE timeline_before")
        # A timeline's length as its rows say, where the row has it shorter: a file from before the
        # column, or written meanwhile by an earlier version, which adds rows without counting them.
        conn.execute("UPDATE calls SET noted = t.last FROM (SELECT key, MAX(seq) AS last FROM timeline GROUP BY key) "
                     "AS t WHERE calls.key = t.key AND calls.noted < t.last")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_WAIT_MS}")


class SqliteStore:
    # Another worker process may write a record a turn here is waiting for.
    poll_interval: float | None = 0.02
    durable = True
    volatile = False

    def __init__(self, path: str, deadline_s: float = DEADLINE_S) -> None:
        self.path = path
        self.deadline_s = deadline_s
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._writer = _connect(path)
            _prepare(self._writer)
            self._reader = _connect(path)
            self._get = self._reader.cursor()  # one cursor for the turn path's look-ups, not one per read
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from exc
        self._stamps = ChangeStamps(path)
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._write_queued, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def _write(self, sql: str, params: tuple[object, ...], key: str | None, notify: bool = True) -> int:
        """One statement; its row count."""
        return int(await self._submit(sql, params, key, notify))

    async def _steps(self, steps: Steps) -> Any:
        """Several statements as one (a quiet write: no stamp changes); what `steps` returns."""
        return await self._submit(steps, (), None, False)

    async def _submit(self, sql: str | Steps, params: tuple[object, ...], key: str | None, notify: bool) -> Any:
        if notify and self._stamps.problem:
            raise StoreError(self._stamps.problem)
        loop = asyncio.get_running_loop()
        write = _Write(sql, params, key, notify, loop, loop.create_future())
        with self._closing:  # nothing is queued behind close()'s end mark, where it would wait for ever
            if self._closed:
                raise StoreError(f"SQLite store {self.path} is closed")
            self._queue.put(write)
        try:
            async with asyncio.timeout(self.deadline_s):  # a lock held elsewhere waits up to busy_timeout
                return await write.done
        except TimeoutError:
            raise StoreError(f"SQLite write not committed within {self.deadline_s:g} s (STORE_TIMEOUT_MS); "
                             "it stays queued") from None

    def _write_queued(self) -> None:
        """The writer thread: commit what is queued, renew the stamps, hand the results back to each loop."""
        while batch := self._next_batch():
            outcomes: list[_Outcome]
            try:
                outcomes = list(zip(batch, self._commit(batch), strict=True))
                self._renew_stamps(outcomes)
            except Exception as exc:  # the transaction could not be ended: no write may hang, the thread goes on
                log.error("sqlite_batch_failed", writes=len(batch), reason=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(sqlite3.Error):
                    self._end_transaction()
                outcomes = [(write, exc) for write in batch]
            for loop in {write.loop for write in batch}:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, [outcome for outcome in outcomes if outcome[0].loop is loop])

    def _next_batch(self) -> list[_Write]:
        """The next write and those queued behind it (at most MAX_BATCH); empty once closed."""
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                write = self._queue.get_nowait()
            except queue.Empty:
                break
            if write is None:
                self._queue.put(None)  # closed: after this batch
                break
            batch.append(write)
        return batch

    def _renew_stamps(self, outcomes: Sequence[_Outcome]) -> None:
        """After the commit, so a reader that sees a new stamp finds the new row."""
        self._stamps.renew(write.key for write, result in outcomes
                           if write.notify and isinstance(result, int) and result > 0)

    def _commit(self, writes: Sequence[_Write]) -> list[Any]:
        """One transaction for all; if any statement fails, each again on its own so only it fails.

        Raises only when a failed transaction cannot be ended: then none of them may be trusted.
        """
        if len(writes) > 1:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                changed = [self._run(write) for write in writes]
                self._writer.execute("COMMIT")
                return changed
            except Exception:
                self._end_transaction()
        results: list[Any] = []
        for write in writes:
            try:
                results.append(self._run(write))
            except Exception as exc:
                results.append(exc)
        return results

    def _run(self, write: _Write) -> Any:
        if isinstance(write.sql, str):
            return self._writer.execute(write.sql, write.params).rowcount
        # On its own, a write transaction from the start: a read that later wants to write cannot wait
        # for another process's lock (SQLite answers "locked" at once); in a batch, a savepoint.
        alone = not self._writer.in_transaction
        self._writer.execute("BEGIN IMMEDIATE" if alone else "SAVEPOINT steps")
        try:
            result = write.sql(self._writer)
        except Exception:
            self._writer.execute("ROLLBACK" if alone else "ROLLBACK TO steps")
            if not alone:
                self._writer.execute("RELEASE steps")
            raise
        self._writer.execute("COMMIT" if alone else "RELEASE steps")
        return result

    def _end_transaction(self) -> None:
        if self._writer.in_transaction:
            self._writer.execute("ROLLBACK")

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        params: tuple[object, ...] = (key, value, expires_at, tag)
        source = "VALUES (?, ?, ?, ?)"
        if tag is not None and born is not None:
            source = "SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM erased WHERE tag = ? AND at >= ?)"
            params += (tag, born)
        # The counter and the timeline go on over a live row and start again over an expired one (not yet
        # purged; the trigger timeline_restarts empties its timeline).
        now = time.time()
        params += (now, now)
        # Without replace, only an expired row may be overwritten.
        condition = "" if replace else " WHERE calls.expires_at <= ?"
        if not replace:
            params += (now,)
        changed = await self._write(
            f"INSERT INTO calls (key, value, expires_at, tag) {source} "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, "
            "tag = excluded.tag, counter = CASE WHEN calls.expires_at > ? THEN calls.counter ELSE 0 END, "
            "noted = CASE WHEN calls.expires_at > ? THEN calls.noted ELSE 0 END" + condition,
            params, key,
        )
        return changed > 0

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float | None, tag: str | None = None,
                   notify: bool = True) -> bool:
        # Naming an indexed column rewrites its index pages even with the same value: 12 KB of WAL
        # per write instead of 4 KB, so the expiry and tag are only set when they change.
        changes, params = ("value = ?", (value,)) if expires_at is None else \
            ("value = ?, expires_at = ?, tag = ?", (value, expires_at, tag))
        changed = await self._write(
            f"UPDATE calls SET {changes} WHERE key = ? AND value = ? AND expires_at > ?",
            (*params, key, expected, time.time()), key, notify,
        )
        return changed > 0

    def stamp(self, key: str) -> bytes | None:
        return self._stamps.read(key)

    async def note_call(self, tag: str, key: str, at: float, keep_until: float,
                        seen_until: float) -> HistoryRow | None:
        def noted(conn: sqlite3.Connection) -> HistoryRow | None:
            now = time.time()
            if conn.execute("SELECT 1 FROM erased WHERE tag = ? AND at >= ?", (tag, at)).fetchone():
                return None
            columns = "calls, first_at, last_at, last_key"
            seen = conn.execute(f"SELECT {columns} FROM history_seen WHERE tag = ? AND key = ? AND expires_at > ?",
                                (tag, key, now)).fetchone()
            if seen is not None:
                return (int(seen[0]), seen[1], seen[2], seen[3])
            row = conn.execute(f"SELECT {columns} FROM history WHERE tag = ? AND expires_at > ?", (tag, now)).fetchone()
            before: HistoryRow = (int(row[0]), row[1], row[2], row[3]) if row is not None else NO_HISTORY
            conn.execute(f"INSERT OR REPLACE INTO history (tag, {columns}, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (tag, before[0] + 1, before[1] or at, at, key, keep_until))
            conn.execute(f"INSERT OR REPLACE INTO history_seen (tag, key, {columns}, expires_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (tag, key, *before, seen_until))
            return before

        result: HistoryRow | None = await self._steps(noted)
        return result

    async def delete_tagged(self, tag: str) -> int:
        # The mark first: a put of an older value committed between the two is refused or deleted.
        await self._write("INSERT OR REPLACE INTO erased (tag, at) VALUES (?, ?)", (tag, time.time()), None,
                          notify=False)
        await self._write("DELETE FROM history WHERE tag = ?", (tag,), None, notify=False)
        await self._write("DELETE FROM history_seen WHERE tag = ?", (tag,), None, notify=False)
        return await self._write("DELETE FROM calls WHERE tag = ?", (tag,), None)

    def _read(self, sql: str, params: tuple[object, ...], via: sqlite3.Cursor | None = None) -> list[Any]:
        """The rows of one read on the event loop (`via`: a cursor of the reader kept for the turn path)."""
        try:
            return (via or self._reader).execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        rows = self._read("SELECT value FROM calls WHERE key = ? AND expires_at > ?", (key, time.time()), self._get)
        return bytes(rows[0][0]) if rows else None

    async def counter(self, key: str) -> int | None:
        rows = self._read("SELECT counter FROM calls WHERE key = ? AND expires_at > ?", (key, time.time()))
        return int(rows[0][0]) if rows else None

    async def append(self, lists: Mapping[str, Sequence[bytes]], counts: Mapping[str, int] | None = None) -> set[str]:
        keys = set(lists).union(counts or ())
        by = counts or {}

        def appended(conn: sqlite3.Connection) -> set[str]:
            # A few statements for all the keys (a few hundred calls a batch at saturation): between two
            # statements this thread takes the GIL from the event loop and gives it back. The row keeps
            # the timeline's length, so no statement reads the timeline back.
            live: set[str] = set()
            rows: list[tuple[str, int, bytes]] = []
            trims: list[tuple[str, int]] = []
            for part in _parts(list(keys)):
                sizes = [value for key in part for value in (key, by.get(key, 0), len(lists.get(key, ())))]
                for key, after in conn.execute(
                        f"UPDATE calls SET counter = counter + v.column2, noted = noted + v.column3 "
                        f"FROM (VALUES {_marks(len(part), 3)}) AS v WHERE calls.key = v.column1 "
                        "AND calls.expires_at > ? RETURNING key, noted", (*sizes, time.time())).fetchall():
                    entries = lists.get(key, ())
                    live.add(key)
                    before = after - len(entries)
                    rows += [(key, before + n, value) for n, value in enumerate(entries, 1)]
                    if after > MAX_ENTRIES and after // TRIM_EVERY != before // TRIM_EVERY:  # now and then only
                        trims.append((key, after - MAX_ENTRIES))
            # OR REPLACE: a row an earlier version added meanwhile without counting it gives way, and the
            # batch (every call's counts with it) is not lost for it.
            for chunk in _parts(rows):
                conn.execute(f"INSERT OR REPLACE INTO timeline (key, seq, value) VALUES {_marks(len(chunk), 3)}",
                             [value for row in chunk for value in row])
            conn.executemany("DELETE FROM timeline WHERE key = ? AND seq <= ?", trims)
            return live

        if not keys:
            return set()
        # Quiet: the values are unchanged, so the records other processes hold stay good.
        result: set[str] = await self._steps(appended)
        return result

    async def entries(self, key: str, newest: int | None = None) -> list[bytes]:
        # Past MAX_ENTRIES until the next trim: the newest MAX_ENTRIES are what the list holds.
        limit = min(MAX_ENTRIES, newest) if newest is not None else MAX_ENTRIES
        rows = self._read("SELECT t.value FROM timeline t JOIN calls c ON c.key = t.key WHERE t.key = ? "
                          "AND c.expires_at > ? ORDER BY t.seq DESC LIMIT ?", (key, time.time(), limit))
        return [bytes(row[0]) for row in reversed(rows)]

    async def delete(self, key: str) -> bool:
        return await self._write("DELETE FROM calls WHERE key = ?", (key,), key) > 0

    async def recent(self, limit: int) -> list[tuple[bytes, int]]:
        rows = self._read("SELECT value, counter FROM calls WHERE expires_at > ? ORDER BY expires_at DESC LIMIT ?",
                          (time.time(), limit))
        return [(bytes(row[0]), int(row[1])) for row in rows]

    def listen(self, on_key: Callable[[str], None]) -> None:
        return None  # no change feed in SQLite: waiters poll every poll_interval

    async def purge_expired(self, now: float) -> int:
        # Quiet: a process holding a record checks its expiry itself.
        await self._write("DELETE FROM erased WHERE at <= ?", (now - ERASURE_KEPT_S,), None, notify=False)
        await self._write("DELETE FROM history WHERE expires_at <= ?", (now,), None, notify=False)
        await self._write("DELETE FROM history_seen WHERE expires_at <= ?", (now,), None, notify=False)
        return await self._write("DELETE FROM calls WHERE expires_at <= ?", (now,), None, notify=False)

    async def ping(self) -> None:
        if self._stamps.problem:
            raise StoreError(self._stamps.problem)
        try:
            self._reader.execute("SELECT 1 FROM calls LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path} unusable: {exc}") from exc

    async def close(self) -> None:
        with self._closing:
            self._closed = True
            self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._stamps.close()
        self._reader.close()
        self._writer.close()
