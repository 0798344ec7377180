"""calls.py: the registry over the memory and SQLite stores, and Redis where only a volatile shared store
shows it (the store contract: test_store_contract)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import sqlite3
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from avr_llm_proxy.calls import CallRecord, CallRegistry, NumberErased
from avr_llm_proxy.identity import parse_caller
from avr_llm_proxy.stores import Store, StoreError, open_store
from avr_llm_proxy.stores.memory import MemoryStore
from avr_llm_proxy.stores.redis import CHANNEL
from avr_llm_proxy.stores.sqlite import SqliteStore

UUID = "cbb1cd1e-86d0-4af4-b938-ebd18537fffb"


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'calls.db'}"
    opened = open_store(url)
    yield opened
    await opened.close()


def record(uuid: str = UUID, number: str = "+593987654321") -> CallRecord:
    return CallRecord(uuid=uuid, caller=parse_caller(number, "Juan Perez", "0", source="http"), called_number="5551000")


async def test_record_round_trip(store: Store) -> None:
    """A record comes back exactly as captured, caller and all."""
    registry = CallRegistry(store, 3600)
    stored = await registry.put(record())
    fetched = await registry.get(UUID)
    assert fetched == stored and fetched is not None
    assert fetched.caller.e164 == "+593987654321" and fetched.caller.name == "Juan Perez"
    assert fetched.expires_at > time.time() + 3500


async def test_wait_wakes_on_put(store: Store) -> None:
    """A waiting turn gets the record as soon as it is put, well before its wait ends."""
    registry = CallRegistry(store, 3600)
    waiter = asyncio.create_task(registry.wait(UUID, 5.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await registry.put(record())
    found = await waiter
    assert found is not None and found.uuid == UUID
    assert time.monotonic() - started < 2.5


async def test_wait_gives_up(store: Store) -> None:
    """Without a capture the wait returns None after its time."""
    registry = CallRegistry(store, 3600)
    assert await registry.wait(UUID, 0.05) is None


async def test_late_source_is_kept(store: Store) -> None:
    """A caller found by a late source (the legacy file) is stored for the rest of the call."""
    calls = 0

    async def source(uuid: str) -> CallRecord | None:
        nonlocal calls
        calls += 1
        return record(uuid) if calls == 1 else None

    registry = CallRegistry(store, 3600, [source])
    first = await registry.get(UUID)
    second = await registry.get(UUID)
    assert first is not None and second is not None and second.caller == first.caller and calls == 1


async def test_touch_renews_only_late_in_life(store: Store) -> None:
    """touch re-stores a record only once half its TTL has passed."""
    registry = CallRegistry(store, 3600)
    stored = await registry.put(record())
    assert await registry.touch(stored) is stored
    aged = CallRecord(uuid=UUID, caller=stored.caller, expires_at=time.time() + 100)
    renewed = await registry.touch(aged)
    assert renewed.expires_at > time.time() + 3500


async def test_change_redoes_an_edit_another_process_overtook(tmp_path: Path) -> None:
    """A recapture written by another process between a change's read and its write is kept, not undone."""
    path = tmp_path / "calls.db"
    store = open_store(f"sqlite:///{path}")
    other = CallRegistry(open_store(f"sqlite:///{path}"), 3600)
    try:
        registry = CallRegistry(store, 3600)
        await registry.put(record())
        recaptured = record(number="+34612345678")
        seen: list[str | None] = []

        def counted(current: CallRecord) -> CallRecord:
            seen.append(current.caller.e164)
            if len(seen) == 1:  # the other process writes while this edit is under way
                raw = sqlite3.connect(path)
                with raw:
                    raw.execute("UPDATE calls SET value = ? WHERE key = ?", (recaptured.to_bytes(), UUID))
                raw.close()
            return dataclasses.replace(current, started_at=3.0)

        changed = await registry.change(UUID, counted)
        assert seen == ["+593987654321", "+34612345678"]
        assert changed is not None and changed.started_at == 3.0 and changed.caller.e164 == "+34612345678"
        found = await other.get(UUID)
        assert found is not None and found.caller.e164 == "+34612345678" and found.started_at == 3.0
    finally:
        await store.close()
        await other.store.close()


async def test_sqlite_stamp_changes_with_every_write_but_quiet_ones(tmp_path: Path) -> None:
    """Another process's handle sees a key's stamp change on each write it must see; counts stay quiet."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    writer, reader = open_store(url), open_store(url)
    try:
        stamps = [reader.stamp("k")]
        await writer.put("k", b"1", time.time() + 60, "t")
        stamps.append(reader.stamp("k"))
        assert await writer.swap("k", b"1", b"2", time.time() + 60, notify=False)
        await writer.purge_expired(time.time())
        await writer.put("other", b"1", time.time() + 60)  # another call (crc32 puts it in another slot)
        assert reader.stamp("k") == stamps[-1]
        assert not await writer.swap("k", b"stale", b"3", time.time() + 60)
        assert reader.stamp("k") == stamps[-1]
        assert await writer.swap("k", b"2", b"3", time.time() + 60, "t")
        stamps.append(reader.stamp("k"))
        assert await writer.delete_tagged("t") == 1  # erasure by number: any key's stamp changes
        stamps.append(reader.stamp("k"))
        assert None not in stamps and len(set(stamps)) == 4
        assert reader.stamp("other") != stamps[1] and len(stamps[0] or b"") == 16
    finally:
        await writer.close()
        await reader.close()


async def test_held_record_is_used_while_the_stamp_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker reuses the record it read while no process wrote; another worker's recapture is seen at once."""
    path = tmp_path / "calls.db"
    mine, theirs = (CallRegistry(open_store(f"sqlite:///{path}"), 3600) for _ in range(2))
    try:
        await theirs.put(record())
        assert (await mine.get(UUID)).caller.e164 == "+593987654321"  # type: ignore[union-attr]
        await theirs.change(UUID, lambda current: dataclasses.replace(current, started_at=4.0), notify=False)
        raw = sqlite3.connect(path)  # behind the stores' backs: no stamp renewed, so not seen
        with raw:
            raw.execute("UPDATE calls SET value = ? WHERE key = ?", (record(number="+14155550100").to_bytes(), UUID))
        raw.close()
        held = await mine.get(UUID)
        assert held is not None and held.caller.e164 == "+593987654321" and held.started_at is None
        await theirs.put(record(number="+34612345678"))
        assert (await mine.get(UUID)).caller.e164 == "+34612345678"  # type: ignore[union-attr]
        await theirs.forget(UUID)
        assert await mine.get(UUID) is None
        await theirs.put(record())
        assert await mine.get(UUID) is not None
        monkeypatch.setattr("avr_llm_proxy.calls.MAX_TRUSTED_S", 0.0)  # a held record is trusted only so long
        raw = sqlite3.connect(path)
        with raw:
            raw.execute("DELETE FROM calls")
        raw.close()
        assert await mine.get(UUID) is None
    finally:
        await mine.store.close()
        await theirs.store.close()


async def test_change_from_a_held_record_another_worker_changed_quietly_since(tmp_path: Path) -> None:
    """A change starts from the record held here; when another worker's quiet change made it stale, it reads."""
    path = tmp_path / "calls.db"
    mine, theirs = (CallRegistry(open_store(f"sqlite:///{path}"), 3600) for _ in range(2))
    try:
        first = await theirs.put(record())
        assert await mine.get(UUID) == first  # held here from now on
        await theirs.change(UUID, lambda current: dataclasses.replace(current, started_at=2.0), notify=False)
        changed = await mine.change(UUID, lambda current: dataclasses.replace(
            current, started_at=(current.started_at or 0.0) + 1), notify=False)
        assert changed is not None and changed.started_at == 3.0 and changed.expires_at == first.expires_at
        held = await theirs.get(UUID)  # quiet: theirs goes on with the record it holds
        assert held is not None and held.started_at == 2.0
        fresh = CallRegistry(open_store(f"sqlite:///{path}"), 3600)
        stored = await fresh.get(UUID)
        await fresh.store.close()
        assert stored is not None and stored.started_at == 3.0 and stored.caller == first.caller
    finally:
        await mine.store.close()
        await theirs.store.close()


async def test_stamp_file_removed_while_workers_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    logs) -> None:  # type: ignore[no-untyped-def]
    """Someone deletes `<db>.changes` under running workers: a worker started since creates a new one,
    and the others follow it, so none goes on with a record another worker replaced."""
    path = tmp_path / "calls.db"
    url = f"sqlite:///{path}"
    monkeypatch.setattr("avr_llm_proxy.stores.stamps.FOLLOW_EVERY_S", 0.0)  # 1 s by default
    mine, old = (CallRegistry(open_store(url), 3600) for _ in range(2))
    try:
        await old.put(record())
        assert (await mine.get(UUID)).caller.e164 == "+593987654321"  # type: ignore[union-attr]
        (tmp_path / "calls.db.changes").unlink()
        new = CallRegistry(open_store(url), 3600)  # a worker restarted meanwhile
        try:
            await new.put(record(number="+34612345678"))
            # mine only reads: it notices the new file within FOLLOW_EVERY_S
            assert (await mine.get(UUID)).caller.e164 == "+34612345678"  # type: ignore[union-attr]
            # old still had the removed file mapped: it moves to the new one before renewing the stamp
            await old.put(record(number="+14155550100"))
            assert (await mine.get(UUID)).caller.e164 == "+14155550100"  # type: ignore[union-attr]
            assert (await new.get(UUID)).caller.e164 == "+14155550100"  # type: ignore[union-attr]
        finally:
            await new.store.close()
    finally:
        await mine.store.close()
        await old.store.close()
    assert sum('"sqlite_stamp_file_replaced"' in line for line in logs()) == 2


@pytest.mark.parametrize("obstacle", ["directory", "no file descriptor left"])
async def test_stamp_file_that_cannot_be_made_again_refuses_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs, obstacle: str) -> None:  # type: ignore[no-untyped-def]
    """`<db>.changes` removed and not made again (a directory in its place, EMFILE): the others cannot see
    this worker's writes, so it refuses them (and /readyz says why) until the file can be made again."""
    monkeypatch.setattr("avr_llm_proxy.stores.stamps.FOLLOW_EVERY_S", 0.0)
    store = open_store(f"sqlite:///{tmp_path / 'calls.db'}")
    registry = CallRegistry(store, 3600)
    stamps = tmp_path / "calls.db.changes"
    try:
        await registry.put(record())
        stamps.unlink()
        if obstacle == "directory":
            stamps.mkdir()
        else:
            def exhausted(*args: object) -> int:
                raise OSError(errno.EMFILE, "Too many open files")
            monkeypatch.setattr("avr_llm_proxy.stores.stamps.os.open", exhausted)
        assert store.stamp(UUID) is None
        with pytest.raises(StoreError, match="calls.db.changes"):
            await registry.put(record(number="+34612345678"))
        with pytest.raises(StoreError, match="repair or remove"):
            await store.ping()
        if obstacle == "directory":
            stamps.rmdir()
        else:
            monkeypatch.undo()
            monkeypatch.setattr("avr_llm_proxy.stores.stamps.FOLLOW_EVERY_S", 0.0)
        assert store.stamp(UUID) is not None
        await registry.put(record(number="+34612345678"))
        await store.ping()
    finally:
        await store.close()
    lines = logs()
    assert sum('"sqlite_stamp_unusable"' in line for line in lines) == 1
    assert any('"sqlite_stamp_usable_again"' in line for line in lines)


async def test_sqlite_with_an_unusable_stamp_file_refuses_writes(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """A stamp file there but unusable (a planted symlink): others may trust it, so no write goes unnoticed."""
    path = tmp_path / "calls.db"
    writer = open_store(f"sqlite:///{path}")
    await CallRegistry(writer, 3600).put(record())
    await writer.close()
    (tmp_path / "calls.db.changes").unlink()
    (tmp_path / "calls.db.changes").symlink_to(tmp_path / "elsewhere")
    store = open_store(f"sqlite:///{path}")
    try:
        assert store.stamp(UUID) is None and not (tmp_path / "elsewhere").exists()
        registry = CallRegistry(store, 3600)
        assert (await registry.get(UUID)).caller.e164 == "+593987654321"  # type: ignore[union-attr]
        with pytest.raises(StoreError, match="calls.db.changes"):
            await registry.put(record())
        with pytest.raises(StoreError, match="repair or remove"):
            await store.ping()
    finally:
        await store.close()
    assert any('"sqlite_stamp_unusable"' in line for line in logs())


async def test_sqlite_writes_queued_together_commit_together(tmp_path: Path) -> None:
    """A burst of writes is committed in shared transactions: each gets its own answer, one bad one fails alone."""
    store = open_store(f"sqlite:///{tmp_path / 'calls.db'}")
    assert isinstance(store, SqliteStore)
    try:
        later = time.time() + 60
        results = await asyncio.gather(
            *(store.put(f"k{index}", b"v", later) for index in range(100)),
            *(store.put("same", str(index).encode(), later, replace=False) for index in range(10)),
            store._write("INSERT INTO calls (key, value, expires_at) VALUES (?, NULL, 0)", ("bad",), "bad"),
            return_exceptions=True,
        )
        assert results[:100] == [True] * 100
        assert sorted(results[100:110]) == [False] * 9 + [True]  # type: ignore[type-var]
        assert isinstance(results[110], StoreError) and "NOT NULL" in str(results[110])
        assert await store.get("k99") == b"v" and await store.get("bad") is None
        # Not an SQLite error (a key SQLite cannot even bind): that write fails alone, nothing stays locked.
        odd = await asyncio.gather(*(store.put(f"j{index}", b"v", later) for index in range(20)),
                                   store.put("\ud800", b"v", later), return_exceptions=True)
        assert odd[:20] == [True] * 20 and isinstance(odd[20], StoreError)
        other = sqlite3.connect(tmp_path / "calls.db", timeout=0.5)
        with other:
            other.execute("DELETE FROM calls WHERE key = 'j0'")
        other.close()
    finally:
        await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.put("after", b"v", time.time() + 60)


async def test_sqlite_shared_between_two_registries(tmp_path: Path) -> None:
    """Two processes' registries on one SQLite file see each other's captures (the wait polls)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = open_store(url), open_store(url)
    try:
        writer, reader = CallRegistry(first, 3600), CallRegistry(second, 3600)
        waiting = asyncio.create_task(reader.wait(UUID, 5.0))
        await asyncio.sleep(0.05)
        await writer.put(record())
        found = await waiting
        assert found is not None and found.caller.e164 == "+593987654321"
    finally:
        await first.close()
        await second.close()


async def test_sqlite_record_survives_reopen(tmp_path: Path) -> None:
    """A restart (a new store on the same file) still finds the call's caller."""
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    store = open_store(url)
    await CallRegistry(store, 3600).put(record())
    await store.close()
    reopened = open_store(url)
    try:
        found = await CallRegistry(reopened, 3600).get(UUID)
        assert found is not None and found.caller.e164 == "+593987654321"
    finally:
        await reopened.close()


async def test_memory_store_is_bounded() -> None:
    """The memory store never holds more than its cap."""
    store = MemoryStore(max_entries=3)
    for index in range(10):
        await store.put(f"k{index}", b"v", time.time() + 60)
    assert await store.get("k9") == b"v" and await store.get("k0") is None


async def test_capture_older_than_its_numbers_erasure_is_refused(store: Store) -> None:
    """A capture made just before `forget` of its number but stored after it is refused, named as such."""
    registry = CallRegistry(store, 3600, hash_key=b"k" * 32)
    captured = record()
    await asyncio.sleep(0.01)
    await registry.forget_number(captured.caller)
    with pytest.raises(NumberErased):
        await registry.put(captured)
    assert await registry.get(UUID) is None
    assert (await registry.put(record())).caller.e164 == "+593987654321"  # a capture after it is stored


def capture(pres: str, number: str = "+593987654321", source: str = "ami", called: str | None = "5551000",
            ) -> CallRecord:
    """One source's capture of the call UUID: the caller as that source saw it."""
    return CallRecord(uuid=UUID, caller=parse_caller(number, "Juan Perez", pres, source=source), called_number=called)


async def from_store(registry: CallRegistry, uuid: str = UUID) -> CallRecord | None:
    """The record as the store holds it, read by a registry that holds no copy of its own."""
    return await CallRegistry(registry.store, registry.ttl_seconds, sealer=registry.sealer).get(uuid)


async def test_withheld_caller_stays_withheld_when_captured_again_as_allowed(store: Store) -> None:
    """A later capture that shows the number (the other half of a Local pair) does not undo a withheld one."""
    registry = CallRegistry(store, 3600)
    await registry.put(capture("prohib"))
    returned = await registry.put(capture("allowed_not_screened", "+34612345678", source="agi"))
    for found in (returned, await registry.get(UUID), await from_store(registry)):
        assert found is not None and found.caller.presentation == "withheld"
        assert found.caller.raw is None and found.caller.e164 is None and found.caller.name is None
        assert found.caller.caller_number("e164") == "anonymous"
    stored = await store.get(UUID)
    assert stored is not None and b"34612345678" not in stored and b"593987654321" not in stored


async def test_withheld_capture_after_an_allowed_one_wins(store: Store) -> None:
    """A withheld capture after an allowed one withholds the number from then on (stickiness is not first-wins)."""
    registry = CallRegistry(store, 3600)
    await registry.put(capture("allowed_not_screened", source="agi"))
    await registry.put(capture("prohib"))
    found = await from_store(registry)
    assert found is not None and found.caller.presentation == "withheld" and found.caller.source == "ami"
    assert found.caller.raw is None and found.caller.caller_number("e164") == "anonymous"


async def test_recapture_keeps_the_calls_lifecycle_and_called_number(store: Store) -> None:
    """A recapture keeps start, end and the turn count; it keeps the called number unless it brings one of its own."""
    registry = CallRegistry(store, 3600)
    await registry.put(capture("allowed_not_screened"))
    await registry.change(UUID, lambda current: dataclasses.replace(current, started_at=1000.0, ended_at=2000.0))
    await registry.note({}, {UUID: 1})
    again = await registry.put(capture("allowed_not_screened", "+34612345678", source="agi", called=None))
    found = await from_store(registry)
    for seen in (again, found):
        assert seen is not None and seen.caller.e164 == "+34612345678"
        assert (seen.started_at, seen.ended_at) == (1000.0, 2000.0)
        assert seen.called_number == "5551000"
    await registry.put(capture("allowed_not_screened", source="http", called="5552000"))
    found = await from_store(registry)
    assert found is not None and found.called_number == "5552000" and await registry.turns(UUID) == 1


async def test_capture_after_the_record_expired_or_was_forgotten_is_a_first_capture(store: Store) -> None:
    """Once the withheld record expired or was forgotten, a new capture is taken as it is, lifecycle and all."""
    await CallRegistry(store, 0).put(capture("prohib"))  # TTL 0: expired as soon as stored
    registry = CallRegistry(store, 3600)
    first = await registry.put(capture("allowed_not_screened", source="agi"))
    assert first.caller.presentation == "allowed" and first.caller.e164 == "+593987654321"
    await registry.put(capture("prohib"))
    await registry.change(UUID, lambda current: dataclasses.replace(current, started_at=1000.0))
    await registry.note({}, {UUID: 1})
    assert await registry.forget(UUID)
    again = await registry.put(capture("allowed_not_screened", source="agi", called=None))
    found = await from_store(registry)
    for seen in (again, found):
        assert seen is not None and seen.caller.presentation == "allowed"
        assert seen.caller.e164 == "+593987654321"
        assert (seen.started_at, seen.called_number) == (None, None)
    assert await registry.turns(UUID) == 0


async def test_withheld_kept_is_logged_only_when_a_capture_was_overridden(store: Store, logs) -> None:  # type: ignore[no-untyped-def]
    """`withheld_kept` names the source whose capture lost; a capture that stands as given logs no such line."""
    registry = CallRegistry(store, 3600)
    await registry.put(capture("allowed_not_screened", source="http"))
    await registry.put(capture("prohib", source="ami"))  # withheld wins: nothing overridden
    assert not [line for line in logs() if '"withheld_kept"' in line]
    await registry.put(capture("allowed_not_screened", source="agi"))
    kept = [json.loads(line) for line in logs() if '"withheld_kept"' in line]
    assert len(kept) == 1
    assert kept[0]["source"] == "agi" and kept[0]["kept"] == "ami" and kept[0]["uuid"] == UUID


class ForgottenMeanwhile(MemoryStore):
    """A memory store where another process forgets the call right after a put is refused for it."""

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        stored = await super().put(key, value, expires_at, tag, replace, born)
        if not stored and not replace:
            await self.delete(key)
        return stored


async def test_capture_whose_record_was_forgotten_meanwhile_is_a_first_capture() -> None:
    """The record gone between the put's refusal and its recapture: the capture is stored as given."""
    registry = CallRegistry(ForgottenMeanwhile(), 3600)
    await registry.put(capture("prohib"))
    again = await registry.put(capture("allowed_not_screened", source="agi"))
    found = await registry.get(UUID)
    for seen in (again, found):
        assert seen is not None and seen.caller.presentation == "allowed" and seen.caller.e164 == "+593987654321"


async def test_recapture_keeps_an_ended_calls_short_retention(store: Store) -> None:
    """A recapture after the call ended keeps the record's expiry: the short retention is not renewed to the TTL."""
    registry = CallRegistry(store, 3600)
    await registry.put(capture("allowed_not_screened"))
    ended = await registry.change(UUID, lambda current: dataclasses.replace(current, ended_at=time.time()), ttl=60)
    assert ended is not None and ended.expires_at < time.time() + 61
    # The same caller again (the value alone is rewritten), then another source's caller (written whole).
    for again in (capture("allowed_not_screened"), capture("allowed_not_screened", "+34612345678", source="agi")):
        returned = await registry.put(again)
        found = await from_store(registry)
        for seen in (returned, found):
            assert seen is not None and seen.caller == again.caller and seen.ended_at == ended.ended_at
            assert abs(seen.expires_at - ended.expires_at) < 1


class CapturedWithheldMeanwhile(MemoryStore):
    """A memory store where the call's record is forgotten right after a put is refused for it, and another
    process's withheld first capture lands right after the recapture found no record."""

    def __init__(self, withheld: CallRecord) -> None:
        super().__init__()
        self.withheld: CallRecord | None = withheld
        self.forgotten = False

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        stored = await super().put(key, value, expires_at, tag, replace, born)
        if not stored and not replace and not self.forgotten:
            self.forgotten = await self.delete(key)
        return stored

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if value is None and self.forgotten and self.withheld is not None:
            withheld, self.withheld = self.withheld, None
            await super().put(key, withheld.to_bytes(), withheld.expires_at)
        return value


async def test_capture_never_overwrites_a_withheld_first_capture_made_meanwhile() -> None:
    """The record gone between a put's refusal and its recapture, then another process's withheld first
    capture: the capture is stored only as a recapture of it, so the call stays withheld."""
    withheld = dataclasses.replace(capture("prohib"), expires_at=time.time() + 3600)
    store = CapturedWithheldMeanwhile(withheld)
    registry = CallRegistry(store, 3600)
    await registry.put(capture("allowed_not_screened", source="http"))
    again = await registry.put(capture("allowed_not_screened", source="agi"))
    found = await from_store(registry)
    for seen in (again, found):
        assert seen is not None and seen.caller.presentation == "withheld" and seen.caller.source == "ami"
        assert seen.caller.raw is None and seen.caller.caller_number("e164") == "anonymous"
    assert store.withheld is None and b"593987654321" not in (await store.get(UUID) or b"")


# Database 13 is this module's own (the contract and replica tests flush 15, the benchmark 14).
REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """A direct client on this module's Redis database, emptied before and after the test."""
    direct = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        direct.ping()
    except redis.RedisError:
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    direct.flushdb()
    yield direct
    direct.flushdb()
    direct.close()


class Listening:
    """A registry on Redis whose change-feed news the test can wait for (each after the registry had it)."""

    def __init__(self, registry: CallRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        self.heard: asyncio.Queue[str] = asyncio.Queue()
        listen = registry.store.listen

        def told(on_key: Callable[[str], None]) -> None:
            def relay(key: str) -> None:
                on_key(key)
                self.heard.put_nowait(key)
            listen(relay)

        monkeypatch.setattr(registry.store, "listen", told)
        registry.start()

    async def subscribed(self, redis_db: redis.Redis) -> None:
        for _ in range(100):  # until the subscription is up: a news item sent before it would be lost
            redis_db.publish(CHANNEL, "probe")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.heard.get(), 0.1)
                return
        pytest.fail("the registry did not subscribe")

    async def news_of(self, key: str) -> None:
        while await asyncio.wait_for(self.heard.get(), 10) != key:
            pass


async def test_record_another_worker_wrote_is_not_written_back_after_redis_lost_it(
        redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A holds an allowed caller; worker B withholds the call and A is told; Redis then loses the
    record: A neither serves nor writes back its stale allowed copy."""
    call = str(uuidlib.uuid4())  # the channel is shared by every database: no other test's news matches it
    mine, theirs = CallRegistry(open_store(REDIS_URL), 3600), CallRegistry(open_store(REDIS_URL), 3600)
    feed = Listening(mine, monkeypatch)
    news_of = feed.news_of
    try:
        await feed.subscribed(redis_db)
        allowed = dataclasses.replace(capture("allowed_not_screened", source="agi"), uuid=call)
        await mine.put(allowed)
        await news_of(call)  # A's own write comes back to it too
        held = await mine.get(call)
        assert held is not None and held.caller.e164 == "+593987654321"
        withheld = await theirs.put(dataclasses.replace(capture("prohib"), uuid=call))
        assert withheld.caller.presentation == "withheld"
        await news_of(call)
        redis_db.flushdb()  # Redis restarted without persistence
        assert await mine.get(call) is None
        assert not redis_db.exists(f"avrlp:call:{call}")
        assert not any(b"593987654321" in (redis_db.get(key) or b"") for key in redis_db.keys("avrlp:call:*"))
    finally:
        await mine.store.close()
        await theirs.store.close()


async def test_own_write_echoed_back_still_heals_a_redis_that_lost_it(
        redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed's echo of a worker's own capture leaves its copy trusted: Redis restarting before the
    first turn does not cost the call its caller."""
    call = str(uuidlib.uuid4())
    mine = CallRegistry(open_store(REDIS_URL), 3600)
    feed = Listening(mine, monkeypatch)
    try:
        await feed.subscribed(redis_db)
        await mine.put(dataclasses.replace(capture("allowed_not_screened", source="agi"), uuid=call))
        await feed.news_of(call)  # the echo of its own write
        redis_db.flushdb()  # Redis restarted without persistence
        restored = await mine.get(call)
        assert restored is not None and restored.caller.e164 == "+593987654321"
        assert redis_db.exists(f"avrlp:call:{call}")
    finally:
        await mine.store.close()


class WrittenDuringTheRead(MemoryStore):
    """A store where another write lands while a read is under way: the read returns the value before it."""

    def __init__(self) -> None:
        super().__init__()
        self.during_read: Callable[[], Awaitable[object]] | None = None

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if self.during_read is not None:
            write, self.during_read = self.during_read, None
            await write()
        return value


async def test_a_write_during_the_waits_read_wakes_it_at_once() -> None:
    """A wait whose read misses a write landing at that moment is woken by that write's notice, not left to
    the store's poll interval (here: the whole wait)."""
    store = WrittenDuringTheRead()
    registry = CallRegistry(store, 3600)
    await registry.put(record())
    store.during_read = lambda: registry.change(UUID, lambda current: dataclasses.replace(current, started_at=1.0))
    async with asyncio.timeout(5):  # a liveness bound: without the wake the wait lasts its whole 30 s
        found = await registry.wait(UUID, 30, until=lambda current: current.started_at == 1.0)
    assert found is not None and found.started_at == 1.0
