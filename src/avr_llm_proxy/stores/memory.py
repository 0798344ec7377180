"""A store in this process's memory: fastest, gone on restart, one process only."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from . import ERASURE_KEPT_S, MAX_ENTRIES, NO_HISTORY, HistoryRow


class MemoryStore:
    poll_interval: float | None = None
    durable = False
    volatile = False

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._data: dict[str, tuple[float, bytes, str | None]] = {}
        self._erased: dict[str, float] = {}  # tag: when
        self._counts: dict[str, int] = {}
        self._lists: dict[str, list[bytes]] = {}
        self._history: dict[str, tuple[HistoryRow, float]] = {}  # tag: (calls so far, until when)
        self._seen: dict[tuple[str, str], tuple[HistoryRow, float]] = {}  # (tag, call): (known before it, until)
        self._max_entries = max_entries

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        current = self._data.get(key)
        if current is not None and not replace and current[0] > time.time():
            return False
        if tag is not None and born is not None and self._erased.get(tag, float("-inf")) >= born:
            return False
        if current is None or current[0] <= time.time():
            self._forget_beside(key)
        if len(self._data) >= self._max_entries and key not in self._data:
            await self.purge_expired(time.time())
            if len(self._data) >= self._max_entries:
                # Bounded memory: the oldest inserted record goes first.
                oldest = next(iter(self._data))
                del self._data[oldest]
                self._forget_beside(oldest)
        self._data[key] = (expires_at, value, tag)
        return True

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float | None, tag: str | None = None,
                   notify: bool = True) -> bool:
        if await self.get(key) != expected:
            return False
        current = self._data[key]
        self._data[key] = (current[0], value, current[2]) if expires_at is None else (expires_at, value, tag)
        return True

    def stamp(self, key: str) -> bytes | None:
        return None  # a read is a dictionary look-up: nothing to save

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= time.time():
            self._data.pop(key, None)
            self._forget_beside(key)
            return None
        return entry[1]

    async def counter(self, key: str) -> int | None:
        return None if await self.get(key) is None else self._counts.get(key, 0)

    def _forget_beside(self, key: str) -> None:
        """What lives beside a value goes with it: its counter and its list."""
        self._counts.pop(key, None)
        self._lists.pop(key, None)

    async def append(self, lists: Mapping[str, Sequence[bytes]], counts: Mapping[str, int] | None = None) -> set[str]:
        appended = set()
        by = counts or {}
        for key in set(lists).union(by):
            if await self.get(key) is None:
                continue
            self._counts[key] = self._counts.get(key, 0) + by.get(key, 0)
            kept = self._lists.setdefault(key, [])
            kept.extend(lists.get(key, ()))
            del kept[:-MAX_ENTRIES]
            appended.add(key)
        return appended

    async def entries(self, key: str, newest: int | None = None) -> list[bytes]:
        if await self.get(key) is None:
            return []
        kept = self._lists.get(key, [])
        return list(kept if newest is None else kept[-newest:])

    async def note_call(self, tag: str, key: str, at: float, keep_until: float,
                        seen_until: float) -> HistoryRow | None:
        now = time.time()
        if self._erased.get(tag, float("-inf")) >= at:
            return None
        seen = self._seen.get((tag, key))
        if seen is not None and seen[1] > now:
            return seen[0]
        entry = self._history.get(tag)
        before = entry[0] if entry is not None and entry[1] > now else NO_HISTORY
        # Bounded like the values: the oldest goes first.
        if len(self._history) >= self._max_entries:
            del self._history[next(iter(self._history))]
        if len(self._seen) >= self._max_entries:
            del self._seen[next(iter(self._seen))]
        self._history[tag] = ((before[0] + 1, before[1] or at, at, key), keep_until)
        self._seen[(tag, key)] = (before, seen_until)
        return before

    async def delete(self, key: str) -> bool:
        self._forget_beside(key)
        return self._data.pop(key, None) is not None

    async def delete_tagged(self, tag: str) -> int:
        self._erased[tag] = time.time()
        self._history.pop(tag, None)
        for noted in [noted for noted in self._seen if noted[0] == tag]:
            del self._seen[noted]
        keys = [key for key, entry in self._data.items() if entry[2] == tag]
        for key in keys:
            del self._data[key]
            self._forget_beside(key)
        return len(keys)

    async def recent(self, limit: int) -> list[tuple[bytes, int]]:
        newest = sorted(self._data.items(), key=lambda item: item[1][0], reverse=True)[:limit]
        return [(entry[1], self._counts.get(key, 0)) for key, entry in newest if entry[0] > time.time()]

    def listen(self, on_key: Callable[[str], None]) -> None:
        return None  # one process: every put already wakes its waiters

    async def purge_expired(self, now: float) -> int:
        for tag in [tag for tag, when in self._erased.items() if when <= now - ERASURE_KEPT_S]:
            del self._erased[tag]
        for tag in [tag for tag, entry in self._history.items() if entry[1] <= now]:
            del self._history[tag]
        for noted in [noted for noted, seen in self._seen.items() if seen[1] <= now]:
            del self._seen[noted]
        expired = [key for key, entry in self._data.items() if entry[0] <= now]
        for key in expired:
            del self._data[key]
            self._forget_beside(key)
        return len(expired)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._counts.clear()
        self._lists.clear()
        self._history.clear()
        self._seen.clear()
