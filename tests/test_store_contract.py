"""One store contract, run against memory, SQLite and the real Redis (database 15, cleaned before and after)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from avr_llm_proxy.calls import CallRecord, CallRegistry
from avr_llm_proxy.identity import parse_caller
from avr_llm_proxy.stores import MAX_ENTRIES, Store, StoreError, open_store
from avr_llm_proxy.stores.memory import MemoryStore

REDIS_URL = "redis://127.0.0.1:6379/15"
UUID = "cbb1cd1e-86d0-4af4-b938-ebd18537fffb"


def redis_available() -> bool:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False
    return True


def clean_redis() -> None:
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        if not redis_available():
            pytest.skip("Redis is not answering on 127.0.0.1:6379")
        clean_redis()
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'calls.db'}", "redis": REDIS_URL}[request.param]
    opened = open_store(url)
    yield opened
    await opened.close()
    if request.param == "redis":
        clean_redis()


def record(uuid: str = UUID, number: str = "+593987654321") -> CallRecord:
    return CallRecord(uuid=uuid, caller=parse_caller(number, "Juan Perez", "0", source="http"), called_number="5551000")


class TestStoreContract:
    """What every store must do, whatever keeps the bytes."""

    async def test_put_get_delete(self, store: Store) -> None:
        """A value comes back as stored until it is deleted."""
        assert await store.put("k", b"v", time.time() + 60)
        assert await store.get("k") == b"v"
        assert await store.delete("k") is True
        assert await store.get("k") is None and await store.delete("k") is False

    async def test_replace_or_keep(self, store: Store) -> None:
        """put replaces; put(replace=False) keeps a live value and says so."""
        await store.put("k", b"1", time.time() + 60)
        await store.put("k", b"2", time.time() + 60)
        assert await store.get("k") == b"2"
        assert await store.put("k", b"3", time.time() + 60, replace=False) is False
        assert await store.get("k") == b"2"
        assert await store.put("new", b"4", time.time() + 60, replace=False) is True

    async def test_swap_only_over_the_expected_value(self, store: Store) -> None:
        """swap replaces a value only while it is still the one the caller read (compare-and-set)."""
        await store.put("k", b"read", time.time() + 60, "t1")
        assert await store.swap("k", b"stale", b"lost", time.time() + 60, "t1") is False
        assert await store.get("k") == b"read"
        assert await store.swap("k", b"read", b"new", time.time() + 60, "t1") is True
        assert await store.get("k") == b"new"
        assert await store.swap("missing", b"read", b"new", time.time() + 60) is False
        assert await store.get("missing") is None
        assert await store.delete_tagged("t1") == 1  # a swapped value still goes with its number

    async def test_swap_of_the_value_alone_keeps_expiry_and_tag(self, store: Store) -> None:
        """swap with expires_at=None changes the value only: it still expires when it did and goes with its tag."""
        await store.put("short", b"1", time.time() + 0.4, "t1")
        await store.put("tagged", b"1", time.time() + 60, "t1")
        assert await store.swap("short", b"1", b"2", None)
        assert await store.swap("tagged", b"1", b"2", None, notify=False)
        assert await store.get("short") == b"2" and await store.get("tagged") == b"2"
        await asyncio.sleep(0.5)
        assert await store.get("short") is None
        assert await store.delete_tagged("t1") >= 1 and await store.get("tagged") is None

    async def test_expiry(self, store: Store) -> None:
        """After its expiry a value is not returned."""
        await store.put("short", b"v", time.time() + 0.2)
        await store.put("long", b"v", time.time() + 60)
        await asyncio.sleep(0.3)
        assert await store.get("short") is None and await store.get("long") == b"v"
        assert await store.purge_expired(time.time()) >= 0

    async def test_a_put_refused_leaves_the_tags_alone(self, store: Store) -> None:
        """put(replace=False) over a live value indexes nothing: erasing its number spares the other caller."""
        await store.put("k", b"first", time.time() + 60, "t1")
        assert await store.put("k", b"second", time.time() + 60, "t2", replace=False) is False
        assert await store.delete_tagged("t2") == 0 and await store.get("k") == b"first"
        assert await store.delete_tagged("t1") == 1

    async def test_no_value_older_than_its_tags_erasure(self, store: Store) -> None:
        """After delete_tagged, a value captured before it (a copy kept somewhere, a queued write) is
        refused; one captured after it, one without the capture time and other tags are stored."""
        before = time.time()
        await asyncio.sleep(0.01)
        assert await store.delete_tagged("t1") == 0  # nothing stored: the erasure still counts
        assert await store.put("old", b"v", time.time() + 60, "t1", born=before) is False
        assert await store.get("old") is None
        assert await store.put("new", b"v", time.time() + 60, "t1", born=time.time())
        assert await store.put("other", b"v", time.time() + 60, "t2", born=before)
        assert await store.put("unborn", b"v", time.time() + 60, "t1")
        assert await store.purge_expired(time.time()) >= 0  # a recent erasure is still remembered
        assert await store.put("old", b"v", time.time() + 60, "t1", born=before) is False

    async def test_tags_erase_by_number(self, store: Store) -> None:
        """Every value with a tag goes with delete_tagged; others stay."""
        for key, tag in (("a", "t1"), ("b", "t1"), ("c", "t2")):
            await store.put(key, key.encode(), time.time() + 60, tag)
        assert await store.delete_tagged("t1") == 2
        assert await store.get("a") is None and await store.get("c") == b"c"
        assert await store.delete_tagged("missing") == 0

    async def test_recent(self, store: Store) -> None:
        """recent lists the newest live values first, at most `limit`, each with its counter."""
        for index in range(5):
            await store.put(f"k{index}", str(index).encode(), time.time() + 60 + index)
        await store.append({}, {"k3": 2})
        assert await store.recent(3) == [(b"4", 0), (b"3", 2), (b"2", 0)]

    async def test_counter_lives_and_goes_with_its_value(self, store: Store) -> None:
        """A counter exists only beside a live value, survives the value's replacement and a change of
        expiry, and goes with a delete, an erasure or the expiry; a new value starts at 0."""
        assert await store.append({}, {"k": 1}) == set() and await store.counter("k") is None
        await store.put("k", b"v", time.time() + 60, "t")
        assert await store.counter("k") == 0
        for _ in range(3):
            assert await store.append({}, {"k": 1}) == {"k"}
        assert await store.counter("k") == 3
        await store.put("k", b"w", time.time() + 60, "t")  # replaced while live
        assert await store.swap("k", b"w", b"x", time.time() + 120, "t")
        assert await store.swap("k", b"x", b"y", None)
        assert await store.append({"k": [b"e"]}, {"k": 2}) == {"k"}
        assert await store.counter("k") == 5 and await store.entries("k") == [b"e"]
        await store.delete("k")
        await store.put("k", b"v", time.time() + 60, "t")
        assert await store.counter("k") == 0
        await store.append({}, {"k": 1})
        await store.delete_tagged("t")
        assert await store.counter("k") is None
        await store.put("k", b"v", time.time() + 0.05)
        await store.append({}, {"k": 1})
        await asyncio.sleep(0.1)
        assert await store.counter("k") is None
        await store.put("k", b"v", time.time() + 60, replace=False)
        assert await store.counter("k") == 0

    async def test_list_lives_and_goes_with_its_value(self, store: Store) -> None:
        """Entries are kept beside a live value only, in order, the newest MAX_ENTRIES, several keys at once;
        they survive a replacement and a longer expiry, and go with a delete, an erasure or the expiry."""
        assert await store.append({"k": [b"lost"]}) == set() and await store.entries("k") == []
        await store.put("k", b"v", time.time() + 60, "t")
        await store.put("j", b"v", time.time() + 60)
        assert await store.append({"k": [b"1", b"2"], "j": [b"x"], "none": [b"y"]}) == {"k", "j"}
        assert await store.append({"k": [b"3"]}) == {"k"}
        assert await store.entries("k") == [b"1", b"2", b"3"] and await store.entries("j") == [b"x"]
        assert await store.entries("k", newest=2) == [b"2", b"3"] and await store.entries("none") == []
        many = [str(n).encode() for n in range(4, MAX_ENTRIES + 6)]
        await store.append({"k": many})
        kept = await store.entries("k")
        assert len(kept) == MAX_ENTRIES and kept[0] == b"6" and kept[-1] == many[-1]
        await store.put("k", b"w", time.time() + 60, "t")
        assert await store.swap("k", b"w", b"x", time.time() + 120, "t")
        assert await store.entries("k") == kept
        await store.delete("k")
        assert await store.entries("k") == [] and await store.entries("j") == [b"x"]
        await store.put("k", b"v", time.time() + 60, "t")
        assert await store.entries("k") == []
        await store.append({"k": [b"a"]})
        await store.delete_tagged("t")
        assert await store.entries("k") == []
        await store.put("k", b"v", time.time() + 0.05)
        await store.append({"k": [b"a"]})
        await asyncio.sleep(0.1)
        assert await store.entries("k") == [] and await store.append({"k": [b"b"]}) == set()
        await store.put("k", b"v", time.time() + 60)  # over the expired value, before any purge
        assert await store.entries("k") == []
        assert await store.append({"k": [b"c"]}) == {"k"} and await store.entries("k") == [b"c"]
        await store.purge_expired(time.time())
        assert await store.entries("k") == [b"c"]

    async def test_note_call_counts_each_call_once(self, store: Store) -> None:
        """Each call of a number is counted once however often it is noted, and is told what came before
        it; numbers are apart, a call noted for another number (a recapture) is counted there; an
        erasure or the expiry starts the number again."""
        now = time.time()
        keep, seen = now + 60, now + 60
        assert await store.note_call("t", "c1", 100.0, keep, seen) == (0, None, None, None)
        assert await store.note_call("t", "c1", 100.0, keep, seen) == (0, None, None, None)
        assert await store.note_call("t", "c2", 200.0, keep, seen) == (1, 100.0, 100.0, "c1")
        assert await store.note_call("t", "c3", 300.0, keep, seen) == (2, 100.0, 200.0, "c2")
        assert await store.note_call("t", "c2", 200.0, keep, seen) == (1, 100.0, 100.0, "c1")
        assert await store.note_call("u", "c4", 400.0, keep, seen) == (0, None, None, None)
        assert await store.note_call("u", "c3", 300.0, keep, seen) == (1, 400.0, 400.0, "c4")
        await store.delete_tagged("t")
        assert await store.note_call("t", "c3", 300.0, keep, seen) is None  # began before the erasure
        later = time.time() + 1
        assert await store.note_call("t", "c5", later, keep, seen) == (0, None, None, None)
        assert await store.note_call("t", "c2", later, keep, seen) == (1, later, later, "c5")  # its note went too
        assert await store.note_call("u", "c6", 600.0, time.time() + 0.05, seen) == (2, 400.0, 300.0, "c3")
        await asyncio.sleep(0.1)
        assert await store.note_call("u", "c7", 700.0, keep, seen) == (0, None, None, None)

    async def test_counts_made_at_the_same_moment_all_count(self, store: Store, tmp_path: Path) -> None:
        """200 counts and 40 notes of calls at once, through two handles of the store where it is shared:
        none is lost, and a call noted twice is counted once."""
        await store.put("k", b"v", time.time() + 60)
        shared = getattr(store, "url", None) or (f"sqlite:///{tmp_path / 'calls.db'}"
                                                 if not isinstance(store, MemoryStore) else None)
        # Two writers of one SQLite file wait for each other's lock: on a loaded machine, past 1 s.
        other = open_store(shared, deadline_s=30) if shared else store
        if hasattr(store, "deadline_s"):
            store.deadline_s = 30
        try:
            await asyncio.gather(*(handle.append({"k": [b"e"]}, {"k": 1}) for _ in range(100)
                                   for handle in (store, other)))
            assert await store.counter("k") == 200 and len(await store.entries("k")) == 200
            keep = time.time() + 60
            # One call noted by both handles at once is counted once; 20 calls from both, each once.
            same = await asyncio.gather(*(handle.note_call("t", "c", 1.0, keep, keep) for handle in (store, other)))
            assert same == [(0, None, None, None)] * 2
            await asyncio.gather(*(handle.note_call("t", f"c{index}", 2.0, keep, keep)
                                   for index in range(20) for handle in (store, other)))
            assert (await store.note_call("t", "last", 3.0, keep, keep))[0] == 21
        finally:
            if other is not store:
                await other.close()

    async def test_ping(self, store: Store) -> None:
        """A usable store answers ping without raising."""
        await store.ping()


async def test_registry_round_trip(store: Store) -> None:
    """A record comes back exactly as captured, sealed where the store is durable."""
    from avr_llm_proxy.privacy import Sealer

    registry = CallRegistry(store, 3600, (), Sealer([("0", b"k" * 32)]), b"h" * 32)
    stored = await registry.put(record())
    assert await registry.get(UUID) == stored
    assert await registry.add(record(number="+34612345678")) is None
    assert await registry.note({UUID: [b'{"kind":"turn"}']}, {UUID: 1}) == {UUID}
    assert await registry.turns(UUID) == 1 and await registry.timeline(UUID) == [{"kind": "turn"}]
    assert (await registry.newest(5))[0] == (stored, 1)
    assert await registry.forget_number(stored.caller) == 1 and await store.get(UUID) is None


async def test_wait_across_processes(store: Store, tmp_path: Path) -> None:
    """A capture through one store handle wakes a turn waiting on another handle of the same store."""
    if isinstance(store, type(open_store("memory://"))):
        pytest.skip("the memory store has one process by definition")
    other = open_store(getattr(store, "url", None) or f"sqlite:///{tmp_path / 'calls.db'}")
    try:
        writer, reader = CallRegistry(store, 3600), CallRegistry(other, 3600)
        reader.start()
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(reader.wait(UUID, 5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await writer.put(record())
        found = await waiting
        assert found is not None and found.caller.e164 == "+593987654321"
        assert time.monotonic() - started < 2
    finally:
        await other.close()


async def test_redis_tag_set_lives_as_long_as_its_longest_call() -> None:
    """A short-lived call of a number never shortens the erasure index of a longer one."""
    if not redis_available():
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    clean_redis()
    store = open_store(REDIS_URL)
    try:
        await store.put("long", b"v", time.time() + 3600, "tag1")
        await store.put("short", b"v", time.time() + 5, "tag1")
        ttl_ms = redis.Redis.from_url(REDIS_URL).pttl("avrlp:tag:tag1")
        assert ttl_ms > 3000 * 1000
    finally:
        await store.close()
        clean_redis()


async def test_redis_that_stops_answering_fails_the_read() -> None:
    """A Redis that accepts connections but never answers: the read fails with StoreError (the turn
    then goes on without the store) instead of hanging through redis-py's retries."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = open_store(f"redis://127.0.0.1:{port}/0", deadline_s=0.3)
    try:
        with pytest.raises(StoreError, match=r"timed out after 0\.3 s"):
            await store.get(UUID)
        with pytest.raises(StoreError, match=r"did not answer within 0\.3 s"):
            await store.ping()
    finally:
        server.close()
        for writer in held:
            writer.close()
        await store.close()


async def test_sqlite_write_behind_a_held_lock_misses_its_deadline_then_commits(tmp_path: Path) -> None:
    """Another process holds the database's write lock: the write fails at the store's deadline (the
    capture goes on), stays queued, and is committed once the lock is let go."""
    path = tmp_path / "calls.db"
    store = open_store(f"sqlite:///{path}", deadline_s=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"not committed within 0\.3 s"):
            await store.put("k", b"v", time.time() + 60)
        other.execute("COMMIT")
        for _ in range(500):  # the writer retries within SQLite's busy timeout
            if await store.get("k") == b"v":
                break
            await asyncio.sleep(0.01)
        assert await store.get("k") == b"v"
    finally:
        other.close()
        await store.close()


async def test_sqlite_file_from_before_the_timelines_length_goes_on(tmp_path: Path) -> None:
    """A file written before the row kept its timeline's length, opened by two workers at once: both
    open it, a live call's timeline goes on after its last entry, and the entries of calls gone from
    the file are dropped."""
    path = tmp_path / "calls.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript("""
        CREATE TABLE calls (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL, tag TEXT,
                            counter INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        CREATE TABLE timeline (key TEXT NOT NULL, seq INTEGER NOT NULL, value BLOB NOT NULL,
                               PRIMARY KEY (key, seq)) WITHOUT ROWID;
    """)
    old.execute("INSERT INTO calls VALUES ('k', x'76', ?, NULL, 4)", (time.time() + 60,))
    old.executemany("INSERT INTO timeline VALUES (?, ?, ?)", [("k", 1, b"1"), ("k", 2, b"2"), ("gone", 1, b"x")])
    old.close()
    store, other = await asyncio.gather(*(asyncio.to_thread(open_store, f"sqlite:///{path}") for _ in range(2)))
    try:
        assert await store.append({"k": [b"3"]}, {"k": 1}) == {"k"}
        assert await other.entries("k") == [b"1", b"2", b"3"] and await other.counter("k") == 5
        await store.put("gone", b"v", time.time() + 60)
        assert await store.entries("gone") == []
    finally:
        await store.close()
        await other.close()


async def test_sqlite_timeline_row_added_without_its_count_loses_no_turn_count(tmp_path: Path) -> None:
    """A row an earlier version wrote into a call's timeline without counting it (a downgrade and back,
    or an old process on the same file): the next batch still stores every call's counts, and the file
    opened again continues after the highest row."""
    path = tmp_path / "calls.db"
    store = open_store(f"sqlite:///{path}")
    try:
        for key in ("k", "j"):
            await store.put(key, b"v", time.time() + 60)
        await store.append({"k": [b"1"]}, {"k": 1})
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
            old.executemany("INSERT INTO timeline (key, seq, value) VALUES ('k', ?, ?)", [(2, b"old"), (3, b"old")])
        assert await store.append({"k": [b"2"], "j": [b"x"]}, {"k": 1, "j": 1}) == {"k", "j"}
        assert await store.counter("k") == 2 and await store.counter("j") == 1
    finally:
        await store.close()
    store = open_store(f"sqlite:///{path}")
    try:
        await store.append({"k": [b"3"]}, {"k": 1})
        assert await store.entries("k") == [b"1", b"2", b"old", b"3"] and await store.counter("k") == 3
    finally:
        await store.close()


async def test_copy_held_through_a_redis_loss_is_not_written_back_over_an_erasure() -> None:
    """Redis lost its data; the number is erased while a replica's subscription is down (no message
    reaches it): the copy it holds is still not written back on the call's next turn."""
    if not redis_available():
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    clean_redis()
    holding, erasing = CallRegistry(open_store(REDIS_URL), 3600, hash_key=b"k" * 32), \
        CallRegistry(open_store(REDIS_URL), 3600, hash_key=b"k" * 32)
    try:
        captured = await holding.put(record())
        assert await holding.get(UUID) == captured
        clean_redis()  # Redis restarted without persistence
        assert await erasing.forget_number(captured.caller) == 0
        assert await holding.get(UUID) is None
        assert not redis.Redis.from_url(REDIS_URL).exists(f"avrlp:call:{UUID}")
        again = await holding.put(record())  # the same number calling again is a new capture
        assert await erasing.get(UUID) == again
    finally:
        await holding.store.close()
        await erasing.store.close()
        clean_redis()
