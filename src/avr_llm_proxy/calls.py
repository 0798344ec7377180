"""The call registry: one `CallRecord` per call UUID, kept in a store for the whole call.

A turn can arrive before its caller is captured (the dialplan's `CURL()` and avr-core race), so the
registry lets a turn wait briefly for the record instead of sending "unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import structlog

from .history import CallerHistory, kept_for
from .identity import NO_TRUST, CallerId, CallerTrust
from .observability import CAPTURES
from .privacy import Sealer, SealError, hash_number
from .stores import TAG_ERASED, Store, StoreError

log = structlog.get_logger("avr_llm_proxy.calls")

MAX_KEPT = 50_000
# Decoded records kept for reuse when the store still holds the same bytes (turns of live calls).
MAX_DECODED = 4096
# How often `change` redoes an edit another process's write overtook before it gives up.
MAX_CHANGE_ATTEMPTS = 5
# How long a record held here is used on the store's word that nothing changed, before it is read again.
MAX_TRUSTED_S = 60.0


class NumberErased(StoreError):
    """A capture older than its number's erasure: not stored (a race with `forget`, nothing broken)."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """Who is on one call, as captured at call start."""

    uuid: str
    caller: CallerId
    called_number: str | None = None
    channel: str | None = None
    uniqueid: str | None = None
    captured_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    # The call's lifecycle, from avr-core's webhooks (POST /events); its turns are counted by the store.
    started_at: float | None = None
    ended_at: float | None = None
    # What the network asserted about the number (verstat, STIR/SHAKEN), from the capture.
    trust: CallerTrust = NO_TRUST
    # The caller's calls before this one (HISTORY_DAYS), noted by the call's first turn.
    history: CallerHistory | None = None
    # The CRM lookup (LOOKUP_URL): "pending:<process>" while one process asks, then "done" with the
    # answer in `contact`, or "failed:<reason>".
    lookup: str | None = None
    contact: dict[str, Any] | None = None
    # The call action an answer asked for (control.py): type, to, reason, outcome, at.
    action: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        """Compact JSON, nulls left out; copied because orjson's own buffer keeps 4 KiB per object."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields["caller"] = {key: value for key, value in self.caller.as_dict().items() if value is not None}
        fields["history"] = self.history.as_list() if self.history else None
        fields["trust"] = self.trust.as_list() if self.trust != NO_TRUST else None
        return bytes(memoryview(orjson.dumps({key: value for key, value in fields.items() if value not in (None, 0)})))

    @classmethod
    def from_bytes(cls, data: bytes) -> CallRecord:
        raw: dict[str, Any] = orjson.loads(data)
        known = {name: raw[name] for name in cls.__slots__ if name in raw}
        known["caller"] = CallerId.from_dict(raw["caller"])
        if "history" in known:
            known["history"] = CallerHistory(*known["history"])
        if "trust" in known:
            known["trust"] = CallerTrust(*known["trust"])
        return cls(**known)


def recaptured(current: CallRecord, capture: CallRecord) -> CallRecord:
    """A call's record after a new capture: a withheld caller stays withheld, the call's lifecycle stays."""
    keep_withheld = current.caller.presentation == "withheld" != capture.caller.presentation
    caller = current.caller if keep_withheld else capture.caller
    same_number = caller.e164 == current.caller.e164  # what was learnt about the number still holds
    return dataclasses.replace(
        capture,
        caller=caller,
        called_number=capture.called_number or current.called_number,
        channel=capture.channel or current.channel,
        uniqueid=capture.uniqueid or current.uniqueid,
        started_at=current.started_at,
        ended_at=current.ended_at,
        trust=capture.trust if capture.trust != NO_TRUST else current.trust,
        history=current.history if same_number else None,
        lookup=current.lookup if same_number else None,
        contact=current.contact if same_number else None,
        action=current.action,
    )


# A late source is asked for a caller the store does not have (the legacy file is one).
LateSource = Callable[[str], Awaitable["CallRecord | None"]]


class _Known(NamedTuple):
    """A record as this process last stored or read it."""

    data: bytes  # as stored (sealed where the store is durable)
    record: CallRecord
    stamp: bytes | None = None  # the store's change stamp just before the read; None: read again
    read_at: float = 0.0
    # Notices of this process's own writes still to come back from the store's change feed: those
    # do not make the copy stale (a notice of another process's write does).
    echoes: int = 0


class WaitedCalls:
    """The calls a turn of this process has waited for a capture already: each call waits once."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._calls: OrderedDict[str, None] = OrderedDict()

    def first_wait(self, uuid: str) -> bool:
        """True for the first turn of a call to wait for its caller here (later ones do not wait again)."""
        if uuid in self._calls:
            return False
        self._calls[uuid] = None
        if len(self._calls) > self._size:
            self._calls.popitem(last=False)
        return True


class CallRegistry:
    """put / get / wait / touch / forget of call records; the only code that talks to a store."""

    def __init__(
        self,
        store: Store,
        ttl_seconds: int,
        late_sources: Sequence[LateSource] = (),
        sealer: Sealer | None = None,
        hash_key: bytes = b"",
        older_hash_keys: Sequence[bytes] = (),
    ) -> None:
        self.store = store
        # Told of every capture this process stores (the CRM lookup starts there).
        self.on_capture: list[Callable[[CallRecord], None]] = []
        self.ttl_seconds = ttl_seconds
        # Durable stores hold records sealed (AES-GCM), and a keyed hash of the number for erasure.
        self.sealer = sealer if store.durable else None
        self.hash_key = hash_key
        self.older_hash_keys = tuple(older_hash_keys)
        # The last record this process stored or read per call, with its stored bytes. A turn uses it
        # without a store read while the store's change stamp is the one seen at that read (SQLite:
        # ~100 us saved per turn, with cold caches at avr-core's pace), and without decrypting and
        # parsing again when the store returns the same bytes. With a volatile store the records of
        # live calls are also what heals it: when the shared store loses them (a Redis restart, a
        # connection cut) the call still has its caller and the store gets it back.
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._known_size = MAX_KEPT if store.volatile else MAX_DECODED
        self.waited = WaitedCalls()
        self._late_sources = tuple(late_sources)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def start(self) -> None:
        """Wake waiting turns on captures made by other processes (where the store can tell)."""
        self.store.listen(self._heard)

    def _heard(self, uuid: str) -> None:
        """The store's feed says a process wrote this record. Unless that is the echo of a write of this
        process's own, the copy held here may be stale (an allowed caller since withheld by another
        capture): it is dropped, so it is neither used nor written back before the store is read again."""
        known = self._known.get(uuid)
        if known is not None and not uuid.startswith(("-", TAG_ERASED)):
            if known.echoes:  # the notice of a write of this process's own (Redis tells every listener)
                self._known[uuid] = known._replace(echoes=known.echoes - 1)
            else:
                del self._known[uuid]
        self._wake(uuid)

    def _remember(self, data: bytes, record: CallRecord, stamp: bytes | None = None, read_at: float = 0.0,
                  written: bool = False) -> _Known:
        """Hold a record as stored or read; `written`: this process wrote it, with a notice to others."""
        before = self._known.get(record.uuid)
        echoes = (before.echoes if before is not None else 0) + written
        known = self._known[record.uuid] = _Known(data, record, stamp, read_at, echoes)
        self._known.move_to_end(record.uuid)
        if len(self._known) > self._known_size:
            self._known.popitem(last=False)
        return known

    def _kept(self, uuid: str) -> _Known | None:
        """A live call's record this process holds, for when a volatile store lost it."""
        known = self._known.get(uuid) if self.store.volatile else None
        if known is None:
            return None
        if known.record.expires_at <= time.time():
            del self._known[uuid]
            return None
        return known

    def _wake(self, uuid: str) -> None:
        if uuid.startswith("-"):  # erased by another process
            self._known.pop(uuid[1:], None)
            return
        if uuid.startswith(TAG_ERASED):  # every record of a number erased by another process
            if dropped := self._drop_tagged({uuid[len(TAG_ERASED):]}):
                log.info("erased_records_dropped", count=dropped)
            return
        for waiter in self._waiters.pop(uuid, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def put(self, record: CallRecord) -> CallRecord:
        """Record a caller, or capture the call again, and wake every turn of this process waiting for it.

        A capture again keeps what the call's record already knows (a withheld presentation, the start
        and end; the store keeps the turn count): sources report the same call in any order (the two
        halves of a Local channel, AMI after FastAGI), and a number withheld by one of them must not come
        back through another.
        """
        for _ in range(MAX_CHANGE_ATTEMPTS):
            stored = await self._save(record, replace=False)
            if stored is not None:
                CAPTURES.labels(source=record.caller.source).inc()
                return self._captured(stored.record)
            # The expiry stays: a live call's turns renew it, an ended call's short retention holds.
            again = await self.change(record.uuid, lambda current: recaptured(current, record))
            if again is not None:
                if again.caller != record.caller:
                    log.info("withheld_kept", uuid=record.uuid, source=record.caller.source,
                             kept=again.caller.source)
                CAPTURES.labels(source=record.caller.source).inc()
                return self._captured(again)
            # No record to capture again: it went meanwhile (then the next write is a first capture),
            # or the store refused this one because its number was erased after the capture.
        raise NumberErased("the caller's number was erased after this capture")

    async def capture(self, record: CallRecord, trusted: bool = False) -> CallRecord | None:
        """A capture from a way anyone able to reach it may use (FastAGI, POST /call): it replaces a live
        caller only with the token (`trusted`), or where it knew more or is more private (then None
        when refused). avr-core's payload carries no presentation, and a withheld capture only removes
        a number: neither can attach a false number to someone else's call."""
        stored = await self.put(record) if trusted else await self.add(record)
        if stored is not None:
            return stored
        if record.caller.presentation == "withheld":  # more private: it only takes a number away
            return await self.put(record)
        existing = await self.get(record.uuid)
        if existing is not None and existing.caller.source == "avr-core" != record.caller.source:
            return await self.put(record)  # knows more than avr-core's payload
        return None

    async def add(self, record: CallRecord) -> CallRecord | None:
        """Record a caller unless the call already has a live record (then None)."""
        stored = await self._save(record, replace=False)
        if stored is None:
            return None
        CAPTURES.labels(source=stored.record.caller.source).inc()
        return self._captured(stored.record)

    def _captured(self, record: CallRecord) -> CallRecord:
        for listener in self.on_capture:
            listener(record)
        return record

    def number_tag(self, caller: CallerId, key: bytes | None = None) -> str | None:
        """The keyed hash a record is found by when its number must be erased."""
        number = caller.e164 or caller.raw
        key = key or self.hash_key
        return hash_number(number, key) if number and key else None

    async def _save(self, record: CallRecord, replace: bool = True, ttl: float | None = None,
                    over: _Known | None = None, notify: bool = True, keep: bool = False) -> _Known | None:
        """Store a record for `ttl` seconds (default: the TTL); `over`: only over exactly that stored record.

        keep (with `over`, the caller unchanged): the stored expiry and tag stay, a value-only write.
        notify=False: other processes may go on with the record they hold (only a count changed).
        """
        if over is not None and keep:
            expires_at = over.record.expires_at
        else:
            keep = False
            expires_at = time.time() + (self.ttl_seconds if ttl is None else ttl)
        stored = dataclasses.replace(record, expires_at=expires_at)
        data = stored.to_bytes()
        if self.sealer is not None:
            data = self.sealer.seal(data)
        tag = self.number_tag(stored.caller)
        if over is not None:
            if not await self.store.swap(stored.uuid, over.data, data, None if keep else expires_at, tag, notify):
                return None
        elif not await self.store.put(stored.uuid, data, stored.expires_at, tag, replace, born=stored.captured_at):
            return None
        self._wake(stored.uuid)
        if over is not None and not notify:
            # A quiet write leaves the stamp as it was: it still vouches for this record.
            return self._remember(data, stored, over.stamp, over.read_at)
        return self._remember(data, stored, written=True)

    async def get(self, uuid: str) -> CallRecord | None:
        """The record: the one held here while the store says nothing changed, else the store's, else
        a late source's (then kept in the store)."""
        found = self._held(uuid) or await self._lookup(uuid)
        return found.record if found else None

    def _held(self, uuid: str) -> _Known | None:
        """The record held here, while the store's stamp says no process wrote it since it was read."""
        known = self._known.get(uuid)
        if known is None or known.stamp is None:
            return None
        now = time.time()
        if known.stamp != self.store.stamp(uuid) or now - known.read_at >= MAX_TRUSTED_S or \
                known.record.expires_at <= now:
            return None
        return known

    async def _lookup(self, uuid: str) -> _Known | None:
        """The record as stored now (with its bytes, which a change must find unchanged to replace)."""
        stamp = self.store.stamp(uuid)  # before the read: a write after it changes the stamp
        try:
            data = await self.store.get(uuid)
        except StoreError:
            kept = self._kept(uuid)
            if kept is None:
                raise
            return kept
        if data is not None:
            known = self._known.get(uuid)
            record = known.record if known is not None and known.data == data else None
            try:
                record = record or CallRecord.from_bytes(self.sealer.open(data) if self.sealer else data)
            except (ValueError, KeyError, TypeError, SealError) as exc:
                raise StoreError(f"unreadable record: {type(exc).__name__}") from exc
            return self._remember(data, record, stamp, time.time())
        if not self.store.volatile:
            self._known.pop(uuid, None)  # expired or erased (perhaps by another process): not kept here either
        kept = self._kept(uuid)
        if kept is not None:
            # The store lost a live call's record (restarted without persistence): put it back, unless
            # its number was erased since (then it goes from here too).
            try:
                restored = await self._save(kept.record)
            except StoreError:
                return kept
            if restored is None:
                self._known.pop(uuid, None)
                log.warning("record_not_restored", uuid=uuid, reason="number erased since")
                return None
            log.warning("record_restored", uuid=uuid)
            return restored
        for source in self._late_sources:
            found = await source(uuid)
            if found is not None:
                await self.put(found)
                return self._known[uuid]
        return None

    async def wait(self, uuid: str, within: float,
                   until: Callable[[CallRecord], bool] | None = None) -> CallRecord | None:
        """The record, waiting up to `within` seconds for a capture that has not happened yet (or for
        the record to meet `until`: then the record as it is at the end of the wait).

        Each read is made with a waiter already in place: a write that lands during the read wakes
        the next wait at once instead of leaving it to the store's poll interval.
        """
        deadline = time.monotonic() + within
        loop = asyncio.get_running_loop()
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(uuid, []).append(waiter)
            try:
                record = await self.get(uuid)
                remaining = deadline - time.monotonic()
                if (record is not None and (until is None or until(record))) or remaining <= 0:
                    return record
                step = remaining if self.store.poll_interval is None else min(remaining, self.store.poll_interval)
                try:
                    async with asyncio.timeout(step):  # not wait_for: it can swallow a cancellation on 3.11
                        await waiter
                except TimeoutError:
                    pass
            finally:
                self._drop_waiter(uuid, waiter)

    def _drop_waiter(self, uuid: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(uuid)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[uuid]

    async def touch(self, record: CallRecord) -> CallRecord:
        """Keep a long call's record alive: renew its expiry once half the TTL has passed (not after its end)."""
        if record.ended_at is not None or record.expires_at - time.time() > self.ttl_seconds / 2:
            return record
        renewed = await self.change(record.uuid, lambda current: None if current.ended_at is not None else current,
                                    ttl=self.ttl_seconds, notify=False)
        return renewed or record

    async def change(self, uuid: str, edit: Callable[[CallRecord], CallRecord | None], ttl: float | None = None,
                     notify: bool = True) -> CallRecord | None:
        """Store `edit(record)` (None: leave it) unless another write came since it was read; then edit that.

        Turn counts, lifecycle marks and recaptures come from different processes at the same time:
        a plain read-modify-write would let one undo another (a recapture lost to a turn count).
        `ttl`: seconds from now; None keeps the record's expiry. notify=False: a change no turn needs
        at once (a count, a renewal). None back when there is no record.
        """
        for attempt in range(MAX_CHANGE_ATTEMPTS):
            # First from the record held here (a quiet write by another worker fails the swap, then read).
            found = (attempt == 0 and self._held(uuid)) or await self._lookup(uuid)
            if found is None:
                return None
            edited = edit(found.record)
            if edited is None:
                return found.record
            keep = ttl is None and edited.caller == found.record.caller
            lasts = ttl if ttl is not None else max(1.0, found.record.expires_at - time.time())
            stored = await self._save(edited, ttl=lasts, over=found, notify=notify, keep=keep)
            if stored is not None:
                return stored.record
        raise StoreError(f"record changed by others {MAX_CHANGE_ATTEMPTS} times while being updated")

    async def forget(self, uuid: str) -> bool:
        self._known.pop(uuid, None)
        return await self.store.delete(uuid)

    async def with_history(self, record: CallRecord, keep_s: float) -> CallRecord:
        """The record with what its caller's earlier calls were, this call counted once wherever it is
        asked (a caller without an allowed, valid number has none); kept in the record for later turns."""
        tag = self.number_tag(record.caller) if record.history is None and kept_for(record.caller) else None
        if tag is None:
            return record
        now = time.time()
        row = await self.store.note_call(tag, record.uuid, record.captured_at, now + keep_s, now + self.ttl_seconds)
        if row is None:  # the number was erased during the call: it leaves no history
            return record
        history = CallerHistory.from_row(row)

        def noted(current: CallRecord) -> CallRecord | None:
            same = current.history is None and current.caller.e164 == record.caller.e164
            return dataclasses.replace(current, history=history) if same else None

        return await self.change(record.uuid, noted, notify=False) or dataclasses.replace(record, history=history)

    async def note(self, entries: Mapping[str, Sequence[bytes]], turns: Mapping[str, int]) -> set[str]:
        """Add entries (each a JSON object) to calls' timelines and answered turns to their counts, in
        the store whatever process answered them, all in one store operation; returns the calls that had
        a record (the others' had nothing to attach to). A call's entries of one batch are one item in
        the store, sealed like the record: at saturation a call gets several turns a batch, and each
        sealed, stored item costs the turns' path its share of the process."""
        items = {}
        for uuid, batch in entries.items():
            data = b"[" + b",".join(batch) + b"]"
            items[uuid] = [self.sealer.seal(data) if self.sealer is not None else data]
        return await self.store.append(items, turns)

    async def timeline(self, uuid: str, newest: int | None = None) -> list[dict[str, Any]]:
        """The call's timeline, oldest first (at least its `newest` last entries when given); items that
        cannot be opened (a lost key) are skipped."""
        entries: list[dict[str, Any]] = []
        for data in await self.store.entries(uuid, newest):
            with contextlib.suppress(ValueError, SealError):
                batch = orjson.loads(self.sealer.open(data) if self.sealer else data)
                entries += [entry for entry in batch if isinstance(entry, dict)] if isinstance(batch, list) else []
        return entries

    async def turns(self, uuid: str) -> int:
        """The turns answered on this call so far (0 when it has no record)."""
        return await self.store.counter(uuid) or 0

    async def newest(self, limit: int = 50) -> list[tuple[CallRecord, int]]:
        """The newest calls of the store with their turns (for `avr-llm-proxy calls`); unreadable ones are skipped."""
        records = []
        for data, turns in await self.store.recent(limit):
            with contextlib.suppress(ValueError, KeyError, TypeError, SealError):
                records.append((CallRecord.from_bytes(self.sealer.open(data) if self.sealer else data), turns))
        return records

    async def forget_number(self, caller: CallerId) -> int:
        """Erase every record of this caller's number; returns how many went."""
        tags = {self.number_tag(caller, key) for key in (self.hash_key, *self.older_hash_keys)} - {None}
        self._drop_tagged(tags)
        return sum([await self.store.delete_tagged(tag) for tag in tags if tag])

    def _drop_tagged(self, tags: set[str | None]) -> int:
        """Forget the records held here of the numbers with these tags (none is written back after)."""
        dropped = [uuid for uuid, known in self._known.items() if self.number_tag(known.record.caller) in tags]
        for uuid in dropped:
            del self._known[uuid]
        return len(dropped)

    async def purge_expired(self) -> int:
        return await self.store.purge_expired(time.time())

    async def ready(self) -> str | None:
        """None when the store answers, else the reason it does not."""
        try:
            await self.store.ping()
        except StoreError as exc:
            return str(exc)
        return None
