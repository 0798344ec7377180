"""One turn end to end: record → payload → upstream → speech → avr frames.

Whatever fails, the caller hears something: avr-core hangs up on any non-2xx or odd framing, so a
turn always ends as a 200 stream of text frames, the fallback message when nothing better exists.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import structlog

from .avr import AvrRequestError, AvrTurn, frame, parse_turn
from .calls import CallRecord, CallRegistry
from .identity import UNKNOWN_CALLER, NumberFormat, parse_caller
from .observability import ACTIVE_TURNS, CALLER_WAIT, FALLBACKS, REJECTED, TURNS, UPSTREAM_LATENCY
from .speech import sentences
from .stores import StoreError
from .upstream import Upstream, UpstreamFailure, UpstreamReply, build_payload

log = structlog.get_logger("avr_llm_proxy.turns")


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    """The settings a turn needs, taken once from `Settings`."""

    bot_phone: str
    bot_phones: Mapping[str, str]
    number_format: NumberFormat
    region: str
    caller_wait_s: float
    fallback_message: str

    def phone_for(self, record: CallRecord | None) -> str:
        """The bot number for the DID the caller dialled (BOT_PHONE_MAP), else BOT_PHONE."""
        called = record.called_number.lstrip("+") if record and record.called_number else ""
        return self.bot_phones.get(called, self.bot_phone)


class Turns:
    """Answers avr-core's `/prompt-stream` requests."""

    def __init__(self, registry: CallRegistry, upstream: Upstream, policy: TurnPolicy) -> None:
        self.registry = registry
        self.upstream = upstream
        self.policy = policy
        self._fallback = [frame(sentence) for sentence in sentences(policy.fallback_message)]

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
        try:
            frames = await self._answer(turn)
        except Exception:
            # Our bug, not the caller's: log it whole, and still keep the call going.
            log.exception("turn_failed", uuid=turn.uuid, turn=turn.turn)
            FALLBACKS.labels(reason="internal_error").inc()
            TURNS.labels(outcome="fallback").inc()
            frames = self._fallback
        finally:
            ACTIVE_TURNS.dec()
        for chunk in frames:
            yield chunk

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

    async def _answer(self, turn: AvrTurn) -> list[bytes]:
        started = time.perf_counter()
        record = await self._record(turn)
        caller = record.caller if record else UNKNOWN_CALLER
        payload = build_payload(
            bot_phone=self.policy.phone_for(record), text=turn.message, uuid=turn.uuid, record=record,
            number_format=self.policy.number_format,
        )
        answer = await self.upstream.ask(payload)
        frames: list[bytes] = []
        if isinstance(answer, UpstreamReply):
            frames = [frame(text) for text in sentences(answer.text)]
            if not frames:
                # Silence leaves the caller wondering whether anyone is there: say something.
                answer = UpstreamFailure("empty_answer", answer.latency_ms, answer.status)
        if isinstance(answer, UpstreamFailure):
            UPSTREAM_LATENCY.labels(outcome="failure").observe(answer.latency_ms / 1000)
            FALLBACKS.labels(reason=answer.reason).inc()
            log.warning(
                "upstream_failed", uuid=turn.uuid, turn=turn.turn, reason=answer.reason, status=answer.status,
                detail=answer.detail, latency_ms=round(answer.latency_ms, 1),
            )
            frames, status, outcome = self._fallback, f"fallback:{answer.reason}", "fallback"
        else:
            UPSTREAM_LATENCY.labels(outcome="ok").observe(answer.latency_ms / 1000)
            status, outcome = str(answer.status), "answered"
        TURNS.labels(outcome=outcome).inc()
        self.registry.recent.note_turn(turn.uuid, caller, status, answer.latency_ms)
        log.info(
            "turn", uuid=turn.uuid, turn=turn.turn, caller_number=caller.log_number, source=caller.source,
            status=status, sentences=len(frames), latency_ms=round(answer.latency_ms, 1),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return frames
