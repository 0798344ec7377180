"""One turn end to end: record → payload → upstream → speech → avr frames.

Whatever fails, the caller hears something: avr-core hangs up on any non-2xx or odd framing, so a
turn always ends as a 200 stream of text frames, the fallback message when nothing better exists.
avr-core also never cancels a request and plays every answer in arrival order (reply-framing.json,
`slow-llm`), so a turn still waiting for the API when the same call's next turn arrives is answered
with nothing rather than with a stale answer spoken after the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import structlog

from .avr import AvrRequestError, AvrTurn, frame, parse_turn
from .calls import CallRecord, CallRegistry
from .identity import UNKNOWN_CALLER, NumberFormat, parse_caller
from .observability import (
    ACTIVE_TURNS,
    CALLER_WAIT,
    FALLBACKS,
    FIRST_SENTENCE,
    REJECTED,
    TURNS,
    UPSTREAM_LATENCY,
)
from .speech import SentenceStream, sentences
from .stores import StoreError
from .upstream import AnswerInfo, Upstream, UpstreamError, UpstreamRequest

log = structlog.get_logger("avr_llm_proxy.turns")

_END = object()
_SUPERSEDED = object()


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    """The settings a turn needs, taken once from `Settings`."""

    bot_phone: str
    bot_phones: Mapping[str, str]
    number_format: NumberFormat
    region: str
    caller_wait_s: float
    fallback_message: str
    filler_after_s: float = 0.0
    filler_message: str = "Un momento, por favor."
    keep_stale_turns: bool = False

    def phone_for(self, record: CallRecord | None) -> str:
        """The bot number for the DID the caller dialled (BOT_PHONE_MAP), else BOT_PHONE."""
        called = record.called_number.lstrip("+") if record and record.called_number else ""
        return self.bot_phones.get(called, self.bot_phone)


@dataclass(slots=True)
class _Flight:
    """A turn of this process still in progress, so a newer turn of the same call can supersede it."""

    turn: int = 0
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    speaking: bool = False
    superseded: bool = False


@dataclass(slots=True)
class _Outcome:
    status: str = ""
    sentences: int = 0
    first_ms: float | None = None
    upstream_ms: float = 0.0


class Turns:
    """Answers avr-core's `/prompt-stream` requests."""

    def __init__(self, registry: CallRegistry, upstream: Upstream, policy: TurnPolicy) -> None:
        self.registry = registry
        self.upstream = upstream
        self.policy = policy
        self._fallback = [frame(sentence) for sentence in sentences(policy.fallback_message)]
        self._filler = [frame(sentence) for sentence in sentences(policy.filler_message)]
        self._flights: dict[str, _Flight] = {}
        self._counting: set[asyncio.Task[None]] = set()

    def reject(self, reason: str, uuid: str | None = None) -> list[bytes]:
        """The fallback frames for a request we could not use, with its log line."""
        REJECTED.labels(endpoint="prompt-stream", reason=reason).inc()
        FALLBACKS.labels(reason="bad_request").inc()
        TURNS.labels(outcome="rejected").inc()
        log.warning("turn_rejected", uuid=uuid, reason=reason)
        return self._fallback

    async def handle(self, body: bytes, header_uuid: str | None = None) -> AsyncIterator[bytes]:
        """Every frame to send back for one request body."""
        try:
            turn = parse_turn(body, header_uuid)
        except AvrRequestError as exc:
            for chunk in self.reject(exc.reason, exc.uuid):
                yield chunk
            return
        ACTIVE_TURNS.inc()
        sent = False
        try:
            async for chunk in self._answer(turn):
                sent = True
                yield chunk
        except Exception:
            # Our bug, not the caller's: log it whole, and still keep the call going.
            log.exception("turn_failed", uuid=turn.uuid, turn=turn.turn)
            FALLBACKS.labels(reason="internal_error").inc()
            TURNS.labels(outcome="fallback").inc()
            if not sent:
                for chunk in self._fallback:
                    yield chunk
        finally:
            ACTIVE_TURNS.dec()

    async def _record(self, turn: AvrTurn) -> CallRecord | None:
        """The call's caller: captured, else the seed's body fields, else waited for briefly."""
        try:
            return await self._lookup(turn)
        except StoreError as exc:
            log.error("store_unavailable", uuid=turn.uuid, reason=str(exc))
            return None

    async def _lookup(self, turn: AvrTurn) -> CallRecord | None:
        record = await self.registry.get(turn.uuid)
        if record is not None:
            return await self.registry.touch(record)
        if turn.body_caller is not None:
            caller = parse_caller(turn.body_caller, source="body", region=self.policy.region)
            return await self.registry.put(CallRecord(uuid=turn.uuid, caller=caller))
        if self.policy.caller_wait_s <= 0 or self.registry.recent.seen(turn.uuid):
            # Waited on an earlier turn already: a capture that late would still be found above.
            return None
        record = await self.registry.wait(turn.uuid, self.policy.caller_wait_s)
        CALLER_WAIT.labels(result="found" if record else "timeout").inc()
        if record is None:
            log.info("caller_not_captured", uuid=turn.uuid, waited_ms=round(self.policy.caller_wait_s * 1000))
        return record

    def _take_off(self, uuid: str, turn: int) -> _Flight:
        """Register this turn; an earlier turn of the call still waiting for the API gives way to it.

        Earlier means a lower turn number (avr-core's history), not an earlier arrival here: the store
        look-up before this point may take longer for one turn than for the next.
        """
        flight = _Flight(turn=turn)
        other = self._flights.get(uuid)
        if other is not None and not self.policy.keep_stale_turns:
            if other.turn < turn and not other.speaking:
                other.superseded = True
                other.queue.put_nowait(_SUPERSEDED)
            elif other.turn > turn:
                flight.superseded = True  # this one is the stale one: it says nothing
                flight.queue.put_nowait(_SUPERSEDED)
                return flight
        self._flights[uuid] = flight
        return flight

    def _land(self, uuid: str, flight: _Flight) -> None:
        if self._flights.get(uuid) is flight:
            del self._flights[uuid]

    async def _pump(self, request: UpstreamRequest, info: AnswerInfo, queue: asyncio.Queue[object]) -> None:
        """Move the answer's pieces into the turn's queue (a task of its own, so deadlines stay here)."""
        try:
            async for piece in self.upstream.answer(request, info):
                queue.put_nowait(piece)
            queue.put_nowait(_END)
        except Exception as exc:  # an UpstreamError, or a bug in an upstream: the turn logs it and falls back
            queue.put_nowait(exc)

    async def _answer(self, turn: AvrTurn) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        record = await self._record(turn)
        caller = record.caller if record else UNKNOWN_CALLER
        request = UpstreamRequest(
            uuid=turn.uuid, turn=turn.turn, text=turn.message, record=record, phone=self.policy.phone_for(record),
            number_format=self.policy.number_format, history=turn.history,
        )
        flight = self._take_off(turn.uuid, turn.turn)
        outcome = _Outcome()
        try:
            async for chunk in self._speak(request, flight, outcome, started):
                yield chunk
        finally:
            self._land(turn.uuid, flight)
            if record is not None and turn.turn > record.turns:
                self._count(record, turn.turn)
            self.registry.recent.note_turn(turn.uuid, caller, outcome.status, outcome.upstream_ms)
            log.info(
                "turn", uuid=turn.uuid, turn=turn.turn, caller_number=caller.log_number, source=caller.source,
                status=outcome.status, sentences=outcome.sentences, latency_ms=round(outcome.upstream_ms, 1),
                first_ms=outcome.first_ms, elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
            )

    async def _speak(
        self, request: UpstreamRequest, flight: _Flight, outcome: _Outcome, started: float
    ) -> AsyncIterator[bytes]:
        breaker = self.upstream.breaker
        if flight.superseded:
            outcome.status = "superseded"
            TURNS.labels(outcome="superseded").inc()
            log.info("turn_superseded", uuid=request.uuid, turn=request.turn)
            return
        if not breaker.allow():
            self._failed(request, outcome, UpstreamError("circuit_open", detail="the API failed repeatedly"), 0.0)
            for chunk in self._fallback:
                yield chunk
            return
        verdict = False  # every turn let through gives the breaker a success, a failure, or its probe back
        info = AnswerInfo()
        asked = time.perf_counter()
        pump = asyncio.create_task(self._pump(request, info, flight.queue))
        stream = SentenceStream()
        filler_due = self.policy.filler_after_s > 0
        try:
            while True:
                try:
                    if filler_due:
                        wait = max(0.0, started + self.policy.filler_after_s - time.perf_counter())
                        item = await asyncio.wait_for(flight.queue.get(), wait)
                    else:
                        item = await flight.queue.get()
                except TimeoutError:
                    filler_due = False
                    for chunk in self._filler:
                        yield chunk
                    continue
                if item is _SUPERSEDED:
                    outcome.status = "superseded"
                    TURNS.labels(outcome="superseded").inc()
                    log.info("turn_superseded", uuid=request.uuid, turn=request.turn)
                    return
                texts: list[str]
                if isinstance(item, str):
                    texts = stream.feed(item)
                elif item is _END:
                    texts = stream.end()
                    if not outcome.sentences and not texts:
                        item = UpstreamError("empty_answer", info.status)
                if isinstance(item, BaseException):
                    error = item if isinstance(item, UpstreamError) else UpstreamError("upstream_bug", None, repr(item))
                    upstream_ms = (time.perf_counter() - asked) * 1000
                    verdict = True
                    if error.reason == "empty_answer":
                        breaker.success()  # the API answered: reachable and well, just silent
                    else:
                        breaker.failure()
                    self._failed(request, outcome, error, upstream_ms)
                    # Sentences already spoken stand; the unfinished one is said as it is, else the apology.
                    texts = stream.end() if outcome.sentences else []
                    for chunk in [frame(text) for text in texts] or ([] if outcome.sentences else self._fallback):
                        yield chunk
                    return
                if texts:
                    filler_due = False  # the caller is hearing the answer: no filler in the middle of it
                for text in texts:
                    if outcome.first_ms is None:
                        outcome.first_ms = round((time.perf_counter() - started) * 1000, 1)
                        FIRST_SENTENCE.observe(outcome.first_ms / 1000)
                    flight.speaking = True
                    outcome.sentences += 1
                    yield frame(text)
                if item is _END:
                    verdict = True
                    breaker.success()
                    outcome.upstream_ms = (time.perf_counter() - asked) * 1000
                    outcome.status = str(info.status or "ok")
                    UPSTREAM_LATENCY.labels(outcome="ok").observe(outcome.upstream_ms / 1000)
                    TURNS.labels(outcome="answered").inc()
                    return
        finally:
            if not verdict:
                breaker.release()
            if not pump.done():
                pump.cancel()

    def _count(self, record: CallRecord, turns: int) -> None:
        """Keep the record's turn count (for `calls` and EVENTS_URL) in the background, off the turn's path."""

        async def update() -> None:
            try:
                # Read again: call_ended (or a later turn) may have changed the record since this turn began.
                fresh = await self.registry.get(record.uuid)
                if fresh is not None and turns > fresh.turns:
                    await self.registry.update(dataclasses.replace(fresh, turns=turns),
                                               ttl=max(1.0, fresh.expires_at - time.time()))
            except StoreError as exc:
                log.info("turn_count_not_stored", uuid=record.uuid, reason=str(exc))

        task = asyncio.create_task(update())
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    def _failed(self, request: UpstreamRequest, outcome: _Outcome, error: UpstreamError, upstream_ms: float) -> None:
        outcome.status = f"fallback:{error.reason}"
        outcome.upstream_ms = upstream_ms
        UPSTREAM_LATENCY.labels(outcome="failure").observe(upstream_ms / 1000)
        FALLBACKS.labels(reason=error.reason).inc()
        TURNS.labels(outcome="fallback").inc()
        log.warning(
            "upstream_failed", uuid=request.uuid, turn=request.turn, upstream=self.upstream.name, reason=error.reason,
            status=error.status, detail=error.detail, latency_ms=round(upstream_ms, 1),
        )
