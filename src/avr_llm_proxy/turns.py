"""One turn end to end: record → payload → upstream → speech → avr frames.

Whatever fails, the caller hears something: avr-core hangs up on any non-2xx or odd framing, so a
turn always ends as a 200 stream of text frames, the fallback message when nothing better exists.
avr-core also never cancels a request and plays every answer in arrival order (reply-framing.json,
`slow-llm`), so a turn still waiting for the API when the same call's next turn arrives is answered
with nothing rather than with a stale answer spoken after the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from .avr import AvrRequestError, AvrTurn, frame, parse_turn
from .calls import CallRecord, CallRegistry
from .control import CallControl
from .identity import UNKNOWN_CALLER, NumberFormat, parse_caller
from .lookup import Lookup
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

COUNT_EVERY_S = 0.25

# Frames to send now; `last` is True with the final ones, after which the response ends.
Speak = Callable[[Sequence[bytes], bool], Awaitable[None]]


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
    history_s: float = 0.0  # HISTORY_DAYS in seconds; 0: no caller history
    timeline: bool = True  # each turn kept for the console's timeline (CONSOLE=on)

    def phone_for(self, record: CallRecord | None) -> str:
        """The bot number for the DID the caller dialled (BOT_PHONE_MAP), else BOT_PHONE."""
        called = record.called_number.lstrip("+") if record and record.called_number else ""
        return self.bot_phones.get(called, self.bot_phone)


@dataclass(slots=True)
class _Flight:
    """A turn of this process still waiting for its answer, so a newer turn of the same call can end it."""

    turn: int
    interrupt: asyncio.Timeout | None = None
    speaking: bool = False
    superseded: bool = False

    def supersede(self) -> None:
        self.superseded = True
        if self.interrupt is not None:
            self.interrupt.reschedule(-1.0)  # a deadline in the past: the waiting turn is woken at once


@dataclass(slots=True)
class _Outcome:
    """One turn's side of the response (what was said, whether it ended) and the figures for its log line."""

    speak: Speak
    started: float
    status: str = ""
    first_ms: float | None = None
    upstream_ms: float = 0.0
    texts: list[str] = field(default_factory=list)  # the answer's sentences: the timeline, a call action's wait
    filler: bool = False
    ended: bool = False

    @property
    def sentences(self) -> int:
        return len(self.texts)

    async def say(self, frames: Sequence[bytes], last: bool = False) -> None:
        if not self.ended:
            self.ended = last
            await self.speak(frames, last)

    async def answer(self, texts: Sequence[str], last: bool = False) -> None:
        """Sentences of the answer itself (the filler and the apology are not counted)."""
        if texts and self.first_ms is None:
            self.first_ms = round((time.perf_counter() - self.started) * 1000, 1)
            FIRST_SENTENCE.observe(self.first_ms / 1000)
        self.texts.extend(texts)
        await self.say([frame(text) for text in texts], last)


class Turns:
    """Answers avr-core's `/prompt-stream` requests."""

    def __init__(self, registry: CallRegistry, upstream: Upstream, policy: TurnPolicy,
                 lookup: Lookup | None = None, control: CallControl | None = None) -> None:
        self.registry = registry
        self.upstream = upstream
        self.policy = policy
        self.lookup = lookup
        self.control = control
        self._fallback = [frame(sentence) for sentence in sentences(policy.fallback_message)]
        self._filler = [frame(sentence) for sentence in sentences(policy.filler_message)]
        self._flights: dict[str, _Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()  # history notes, off the turns' path
        self._uncounted: dict[str, int] = {}  # turns answered here and not yet counted in the store, per call
        self._unnoted: dict[str, list[bytes]] = {}  # their timeline entries (JSON), likewise
        self._fallback_texts = sentences(policy.fallback_message)
        self._worker = os.getpid()  # which process answered, in the timeline (serve --workers N)
        self._counting: asyncio.Task[None] | None = None
        if policy.history_s:
            registry.on_capture.append(self._note_history)

    async def handle(self, body: bytes | None, header_uuid: str | None, speak: Speak) -> None:
        """Answer one request body (None: refused as too large) through `speak`.

        Only what the caller hears comes before the response ends; the log line, metrics and the
        stored turn count come after it (at avr-core's pace every step runs with cold caches, so each
        one costs the caller tens of microseconds).
        """
        try:
            if body is None:
                raise AvrRequestError("body_too_large")
            turn = parse_turn(body, header_uuid)
        except AvrRequestError as exc:
            await speak(self._fallback, True)
            REJECTED.labels(endpoint="prompt-stream", reason=exc.reason).inc()
            FALLBACKS.labels(reason="bad_request").inc()
            TURNS.labels(outcome="rejected").inc()
            log.warning("turn_rejected", uuid=exc.uuid, reason=exc.reason)
            return
        ACTIVE_TURNS.inc()
        outcome = _Outcome(speak, time.perf_counter())
        record: CallRecord | None = None
        try:
            record = await self._record(turn)
            await self._answer(turn, record, outcome)
        except Exception:
            # Our bug, not the caller's: log it whole, and still keep the call going.
            log.exception("turn_failed", uuid=turn.uuid, turn=turn.turn)
            FALLBACKS.labels(reason="internal_error").inc()
            TURNS.labels(outcome="fallback").inc()
            outcome.status = "fallback:internal_error"
            await outcome.say([] if outcome.sentences else self._fallback, last=True)
        finally:
            ACTIVE_TURNS.dec()
        caller = record.caller if record else UNKNOWN_CALLER
        elapsed_ms = round((time.perf_counter() - outcome.started) * 1000, 1)
        if record is not None:
            self._note(turn, outcome, elapsed_ms)
        log.info(
            "turn", uuid=turn.uuid, turn=turn.turn, caller_number=caller.log_number, source=caller.source,
            status=outcome.status, sentences=outcome.sentences, latency_ms=round(outcome.upstream_ms, 1),
            first_ms=outcome.first_ms, elapsed_ms=elapsed_ms,
        )

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
            return await self._known_caller(await self.registry.touch(record))
        if turn.body_caller is not None:
            # For this turn only, never stored: any client may write a body, and a stored caller would
            # stand for the whole call and refuse the dialplan's real capture (already_captured).
            caller = parse_caller(turn.body_caller, source="body", region=self.policy.region)
            return CallRecord(uuid=turn.uuid, caller=caller)
        if self.policy.caller_wait_s <= 0 or not self.registry.waited.first_wait(turn.uuid):
            # Waited on an earlier turn already: a capture that late would still be found above.
            return None
        record = await self.registry.wait(turn.uuid, self.policy.caller_wait_s)
        CALLER_WAIT.labels(result="found" if record else "timeout").inc()
        if record is None:
            log.info("caller_not_captured", uuid=turn.uuid, waited_ms=round(self.policy.caller_wait_s * 1000))
            return None
        return await self._known_caller(record)

    async def _known_caller(self, record: CallRecord) -> CallRecord:
        """What the business knows of a captured caller: the earlier calls, noted by the call's first turn,
        and the CRM lookup's answer, waited for within its deadline (later turns find both in the record)."""
        if self.policy.history_s and record.history is None:
            record = await self._with_history(record)
        if self.lookup is not None:
            try:
                record = await self.lookup.contact(record)
            except StoreError as exc:
                log.warning("lookup_unavailable", uuid=record.uuid, reason=str(exc))
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
                other.supersede()
            elif other.turn > turn:
                flight.superseded = True  # this one is the stale one: it says nothing
                return flight
        self._flights[uuid] = flight
        return flight

    def request(self, turn: AvrTurn, record: CallRecord | None) -> UpstreamRequest:
        """What the upstream is asked for one turn of a call (and what the console's test call shows)."""
        return UpstreamRequest(
            uuid=turn.uuid, turn=turn.turn, text=turn.message, record=record, phone=self.policy.phone_for(record),
            number_format=self.policy.number_format, history=turn.history, with_history=self.policy.history_s > 0,
            with_contact=self.lookup is not None,
        )

    async def _answer(self, turn: AvrTurn, record: CallRecord | None, outcome: _Outcome) -> None:
        request = self.request(turn, record)
        flight = self._take_off(turn.uuid, turn.turn)
        try:
            if flight.superseded:
                await self._superseded(request, outcome)
            elif not self.upstream.breaker.allow():
                await self._failed(request, outcome, UpstreamError("circuit_open", detail="the API failed repeatedly"),
                                   0.0)
            else:
                await self._speak(request, flight, outcome)
        finally:
            if self._flights.get(turn.uuid) is flight:
                del self._flights[turn.uuid]

    async def _speak(self, request: UpstreamRequest, flight: _Flight, outcome: _Outcome) -> None:
        """Read the answer straight from the upstream, saying each sentence as soon as it is complete."""
        breaker = self.upstream.breaker
        verdict = False  # every turn let through gives the breaker a success, a failure, or its probe back
        info = AnswerInfo()
        asked = time.perf_counter()
        stream = SentenceStream()
        filler = asyncio.create_task(self._say_filler(outcome)) if self.policy.filler_after_s > 0 else None
        try:
            texts = await self._listen(self.upstream.answer(request, info), flight, stream, outcome)
            if not outcome.sentences and not texts and info.action is None:
                raise UpstreamError("empty_answer", info.status)
            outcome.upstream_ms = (time.perf_counter() - asked) * 1000
            verdict = True
            breaker.success()  # before the answer's end: whoever asks next sees the circuit as it is
            await outcome.answer(texts, last=True)
            if info.action is not None and self.control is not None:
                self.control.request(request.uuid, info.action, sum(map(len, outcome.texts)))
            outcome.status = str(info.status or "ok")
            UPSTREAM_LATENCY.labels(outcome="ok").observe(outcome.upstream_ms / 1000)
            TURNS.labels(outcome="answered").inc()
        except TimeoutError:
            if not flight.superseded:
                raise
            await self._superseded(request, outcome)
        except UpstreamError as error:
            verdict = True
            if error.reason == "empty_answer":
                breaker.success()  # the API answered: reachable and well, just silent
            else:
                breaker.failure()
            # Sentences already spoken stand; the unfinished one is said as it is, else the apology.
            await self._failed(request, outcome, error, (time.perf_counter() - asked) * 1000,
                               stream.end() if outcome.sentences else None)
        finally:
            if filler is not None:
                filler.cancel()
            if not verdict:
                breaker.release()

    @staticmethod
    async def _listen(pieces: AsyncGenerator[str, None], flight: _Flight, stream: SentenceStream, outcome: _Outcome,
                      ) -> list[str]:
        """Say each sentence as soon as the answer completes it; returns the unfinished rest at its end.

        A newer turn of the call interrupts this wait (TimeoutError) until the first sentence is said.
        """
        try:
            async with asyncio.timeout(None) as flight.interrupt, contextlib.aclosing(pieces):
                while True:
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        return stream.end()
                    except UpstreamError:
                        raise
                    except Exception as exc:  # a bug in an upstream: the turn logs it and falls back
                        raise UpstreamError("upstream_bug", None, repr(exc)) from exc
                    texts = stream.feed(piece)
                    if texts:
                        flight.speaking = True
                        await outcome.answer(texts)
        finally:
            flight.interrupt = None

    async def _say_filler(self, outcome: _Outcome) -> None:
        """FILLER_AFTER_MS: say the filler once if the answer has not begun by then."""
        await asyncio.sleep(max(0.0, outcome.started + self.policy.filler_after_s - time.perf_counter()))
        if not outcome.sentences:
            outcome.filler = True
            await outcome.say(self._filler)

    async def _superseded(self, request: UpstreamRequest, outcome: _Outcome) -> None:
        await outcome.say([], last=True)
        outcome.status = "superseded"
        TURNS.labels(outcome="superseded").inc()
        log.info("turn_superseded", uuid=request.uuid, turn=request.turn)

    def _note(self, turn: AvrTurn, outcome: _Outcome, elapsed_ms: float) -> None:
        """Count the turn and add it to the call's timeline in the store, in the background, off the turn's
        path (for `calls`, EVENTS_URL and the console). A stale turn is in the timeline, not the count.

        The turns of COUNT_EVERY_S are added up per call and stored with their entries, every call's in
        one store operation: at saturation a write per turn cost half the throughput of one process, and
        a write per call a tenth; the store lags by that much at most.
        """
        status = outcome.status
        if status != "superseded":  # something was said: a turn answered
            self._uncounted[turn.uuid] = self._uncounted.get(turn.uuid, 0) + 1
        if self.policy.timeline:
            spoken = outcome.texts or (self._fallback_texts if status.startswith("fallback") else [])
            # Encoded now: bytes kept until the batch is written are nothing for the garbage collector to
            # scan (kept as dicts, they cost a tenth of a process's turns at saturation).
            self._unnoted.setdefault(turn.uuid, []).append(orjson.dumps({
                "at": round(time.time() - elapsed_ms / 1000, 3), "kind": "turn",
                "turn": turn.turn, "said": turn.message, "spoken": spoken, "status": status, "filler": outcome.filler,
                "latency_ms": round(outcome.upstream_ms, 1), "first_ms": outcome.first_ms, "worker": self._worker,
                "elapsed_ms": elapsed_ms,
            }))
        if self._counting is None or self._counting.done():
            self._counting = asyncio.create_task(self._store_counts())

    async def _store_counts(self) -> None:
        while self._uncounted or self._unnoted:
            await asyncio.sleep(COUNT_EVERY_S)
            counts, self._uncounted = self._uncounted, {}
            notes, self._unnoted = self._unnoted, {}
            try:
                await self.registry.note(notes, counts)
            except StoreError as exc:
                log.info("turns_not_stored", calls=len(counts.keys() | notes.keys()), turns=sum(counts.values()),
                         reason=str(exc))

    def _note_history(self, record: CallRecord) -> None:
        """A capture: note the call in its caller's history now, so its first turn finds it in the record."""
        if record.history is None:
            task = asyncio.create_task(self._with_history(record))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _with_history(self, record: CallRecord) -> CallRecord:
        try:
            return await self.registry.with_history(record, self.policy.history_s)
        except StoreError as exc:
            log.warning("history_unavailable", uuid=record.uuid, reason=str(exc))
            return record

    async def close(self) -> None:
        """Let the turn counts and history notes still being written finish (the store closes after this)."""
        pending = self._background | ({self._counting} if self._counting else set())
        if pending:
            await asyncio.wait(pending, timeout=5.0)

    async def _failed(self, request: UpstreamRequest, outcome: _Outcome, error: UpstreamError, upstream_ms: float,
                      unfinished: Sequence[str] | None = None) -> None:
        """Say the rest (`unfinished`, when sentences were already spoken) or the apology, then log why."""
        if unfinished is None:
            await outcome.say(self._fallback, last=True)
        else:
            await outcome.answer(unfinished, last=True)
        outcome.status = f"fallback:{error.reason}"
        outcome.upstream_ms = upstream_ms
        UPSTREAM_LATENCY.labels(outcome="failure").observe(upstream_ms / 1000)
        FALLBACKS.labels(reason=error.reason).inc()
        TURNS.labels(outcome="fallback").inc()
        log.warning(
            "upstream_failed", uuid=request.uuid, turn=request.turn, upstream=self.upstream.name, reason=error.reason,
            status=error.status, detail=error.detail, latency_ms=round(upstream_ms, 1),
        )
