"""Where call records live: one small contract, several backends chosen by `STORE_URL`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

# What `listen`'s callback may get besides a key: "-" + key (erased), TAG_ERASED + tag (every key of a tag).
TAG_ERASED = "~"
# How long a store remembers that a tag was erased: the longest a record can live (CALLER_TTL_SECONDS' limit).
ERASURE_KEPT_S = 7 * 86400
# The default deadline of one store operation (STORE_TIMEOUT_MS): a store that stops answering must
# not keep a caller in silence; a capture that misses it is logged and Asterisk goes on.
DEADLINE_S = 1.0
# How many items the list beside a value keeps at most (a call's timeline: batches of its turns).
MAX_ENTRIES = 500

# What a store knows of a number's calls before one of them: how many, the first's and the last's
# start (Unix seconds) and the last one's key.
HistoryRow = tuple[int, float | None, float | None, str | None]
NO_HISTORY: HistoryRow = (0, None, None, None)


class StoreError(Exception):
    """The store cannot be reached or used; carries what went wrong for the log line."""


class Store(Protocol):
    """Opaque values under a key, each with an absolute expiry time (Unix seconds)."""

    #: How often a waiter should re-read when another process may write (None: local writes only).
    poll_interval: float | None
    #: Whether values leave the process (then calls.py seals them).
    durable: bool
    #: Whether the store may lose live values (a Redis restart without persistence): then processes keep
    #: a copy of the calls they serve and write it back.
    volatile: bool

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        """Store a value with an optional tag (a keyed number hash, for erasure by number).

        With replace=False a live value is kept and False returned. born: when the value came to be
        (its capture); False when its tag was erased since, so a copy kept somewhere, or a write
        queued before the erasure, does not bring an erased number back.
        """
        ...

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float | None, tag: str | None = None,
                   notify: bool = True) -> bool:
        """Replace a live value only while it is still exactly `expected` (compare-and-set).

        False when another write came first: the caller reads again and redoes its change on that.
        expires_at=None: the value alone changes, its expiry and tag stay (a cheaper write).
        notify=False leaves `stamp(key)` as it is: readers may go on with the value they hold.
        """
        ...

    def stamp(self, key: str) -> bytes | None:
        """A token that changes with every write to `key` (but quiet swaps) by any process; None: cannot tell.

        Read before a `get`, it lets a process keep using that value while the token stays the same.
        """
        ...

    async def delete_tagged(self, tag: str) -> int:
        """Delete every value stored with `tag`, and its calls' history, and remember when (ERASURE_KEPT_S);
        returns how many values went."""
        ...

    async def counter(self, key: str) -> int | None:
        """The counter beside a live value (0 until something is counted); None when there is none."""
        ...

    async def append(self, lists: Mapping[str, Sequence[bytes]], counts: Mapping[str, int] | None = None) -> set[str]:
        """Add entries to the lists beside live values and `counts` to their counters, several keys in one
        operation, each key's atomically whatever process adds at the same time (the newest MAX_ENTRIES
        entries of each list stay); returns the keys that had a live value.

        A counter and a list live and go with their value (expiry, delete, erasure) and survive its
        replacement; a value written where none was live starts with neither.
        """
        ...

    async def entries(self, key: str, newest: int | None = None) -> list[bytes]:
        """The list beside a live value, oldest first (only its `newest` last entries when given);
        empty when there is none."""
        ...

    async def note_call(self, tag: str, key: str, at: float, keep_until: float,
                        seen_until: float) -> HistoryRow | None:
        """Count call `key`, started at `at`, among the calls of the number with `tag`, once however often
        and wherever it is noted, and return what was known before it (the same answer every time);
        None when the number was erased since `at` (nothing is noted).

        The number's entry lives until `keep_until` (renewed by each call); the note that `key` was
        counted for that number until `seen_until`. `delete_tagged(tag)` erases both.
        """
        ...

    async def recent(self, limit: int) -> list[tuple[bytes, int]]:
        """The values expiring last (the newest calls), each with its counter, at most `limit`."""
        ...

    def listen(self, on_key: Callable[[str], None]) -> None:
        """Have `on_key(key)` called for puts made by other processes, `on_key("-" + key)` for values
        they deleted and `on_key(TAG_ERASED + tag)` for tags they erased, where the store can tell."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value, or None when it is missing or expired."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def purge_expired(self, now: float) -> int:
        """Drop expired values; returns how many went."""
        ...

    async def ping(self) -> None:
        """Raise StoreError when the store is not usable."""
        ...

    async def close(self) -> None: ...


def open_store(url: str, deadline_s: float = DEADLINE_S) -> Store:
    """The store for a `STORE_URL` (validated by config); `deadline_s` bounds each operation."""
    if url == "memory://":
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), deadline_s)
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisStore

        return RedisStore(url, deadline_s)
    raise StoreError(f"unsupported STORE_URL scheme: {url.split(':', 1)[0]}")
