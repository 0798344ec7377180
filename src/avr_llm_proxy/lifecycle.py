"""The call's lifecycle from avr-core's webhooks: start, end, and the business told about each.

avr-core (1.12+) posts `{uuid, type, timestamp, payload}` to its WEBHOOK_URL with the header
`X-AVR-WEBHOOK-SECRET` (WIRE.md section 2). `call_initiated` carries avr-core's `/call` payload,
`call_started` and `call_ended` mark the call, `transcription` and `interruption` happen during it.
`call_ended` shortens the record's retention; EVENTS_URL, when set, receives each event enriched
with the caller fields and signed like the turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import orjson
import structlog

from .avr import canonical_uuid, json_object
from .calls import CallRecord, CallRegistry
from .identity import NumberFormat, parse_caller, sanitize_raw
from .observability import EVENTS
from .stores import StoreError
from .upstream import AnswerInfo, Deadlines, HttpClient, UpstreamError, signature

log = structlog.get_logger("avr_llm_proxy.lifecycle")

EVENT_TYPES = frozenset({"call_initiated", "call_started", "call_ended", "transcription", "interruption"})
ENDED_RETENTION_S = 300.0  # late replies after hang-up still reach TTS (WIRE.md): keep the caller a while


class EventError(Exception):
    """A webhook body we refuse; `reason` is the code sent back and logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    uuid: str
    type: str
    timestamp: str
    payload: dict[str, Any]


def parse_event(body: bytes) -> Event:
    data = json_object(body, EventError)
    uuid = canonical_uuid(data.get("uuid"))
    if uuid is None:
        raise EventError("invalid_uuid")
    kind = data.get("type")
    if kind not in EVENT_TYPES:
        raise EventError("unknown_type")
    payload = data.get("payload")
    timestamp = data.get("timestamp")
    stamp = str(timestamp)[:40] if timestamp else ""
    return Event(uuid, str(kind), stamp, payload if isinstance(payload, dict) else {})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Lifecycle:
    """Applies events to call records and forwards them to EVENTS_URL."""

    def __init__(self, registry: CallRegistry, region: str, number_format: NumberFormat, events_url: str = "",
                 deadlines: Deadlines | None = None, token: str = "", signing_secret: str = "") -> None:
        self.registry = registry
        self.region = region
        self.number_format = number_format
        self.events_url = events_url
        self.signing_secret = signing_secret
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = HttpClient(deadlines or Deadlines(1.0, 3.0, 3.0), headers) if events_url else None
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.client:
            await self.client.start()

    async def close(self) -> None:
        for task in list(self._sending):
            task.cancel()
        if self.client:
            await self.client.close()

    async def apply(self, event: Event, by: str = "avr-core") -> CallRecord | None:
        """Record what the event says about the call (`by`: who said it, for the log line); returns the
        call's record after it."""
        EVENTS.labels(type=event.type).inc()
        record = await self.registry.get(event.uuid)
        if event.type == "call_initiated" and event.payload:
            captured = CallRecord(
                uuid=event.uuid,
                caller=parse_caller(event.payload.get("from"), None, None, source="avr-core", region=self.region),
                called_number=sanitize_raw(event.payload.get("to")) or None,
                channel=str(event.payload.get("channel") or "")[:128] or None,
                uniqueid=str(event.payload.get("uniqueid") or "")[:64] or None,
            )
            # A capture from the dialplan (AGI, CURL) knows presentation and name: it is never replaced.
            record = record or await self.registry.add(captured) or await self.registry.get(event.uuid)
        elif record is not None and event.type in ("call_started", "call_ended"):
            record = await self._mark(event)
        log.info("call_event", uuid=event.uuid, type=event.type, by=by, known=record is not None)
        self._send(event, record)
        return record

    async def hung_up(self, uuid: str) -> None:
        """The PBX hung up a captured call's channel (AMI): it ended, said or not by avr-core, whose own
        `call_ended` then changes nothing but the time (EVENTS_URL gets both, one Idempotency-Key)."""
        try:
            await self.apply(Event(uuid, "call_ended", _now(), {"source": "ami"}), by="ami")
        except StoreError as exc:
            log.warning("call_end_not_stored", uuid=uuid, source="ami", reason=str(exc))

    def announce(self, uuid: str, kind: str, payload: dict[str, Any], record: CallRecord | None) -> None:
        """Tell EVENTS_URL of something the proxy itself did to a call (a transfer, a hang-up)."""
        self._send(Event(uuid, kind, _now(), payload), record)

    def _send(self, event: Event, record: CallRecord | None) -> None:
        if self.client is not None:
            task = asyncio.create_task(self._forward(event, record))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _mark(self, event: Event) -> CallRecord | None:
        """The start or end time on the record; after its end the record is kept only a short while."""
        now = time.time()
        if event.type == "call_started":
            return await self.registry.change(
                event.uuid, lambda current: dataclasses.replace(current, started_at=now), ttl=self.registry.ttl_seconds)
        return await self.registry.change(event.uuid, lambda current: dataclasses.replace(current, ended_at=now),
                                          ttl=min(ENDED_RETENTION_S, self.registry.ttl_seconds))

    def enriched(self, event: Event, record: CallRecord | None, turns: int = 0) -> dict[str, Any]:
        caller = record.caller if record else None
        payload = event.payload
        if caller is None or caller.presentation != "allowed":
            # avr-core's payload repeats the number Asterisk had; a withheld one must not leave with it.
            payload = {key: value for key, value in payload.items() if key not in ("from", "callerid", "caller_number")}
        return {
            "uuid": event.uuid, "type": event.type, "timestamp": event.timestamp, "payload": payload,
            "caller_number": caller.caller_number(self.number_format) if caller else "unknown",
            "caller_name": caller.name if caller else None,
            "caller": {"presentation": caller.presentation, "source": caller.source, "e164": caller.e164}
            if caller else None,
            "called_number": record.called_number if record else None,
            "turns": turns,
        }

    async def _forward(self, event: Event, record: CallRecord | None) -> None:
        assert self.client is not None
        turns = 0
        if record is not None:
            with contextlib.suppress(StoreError):  # the event goes without its count rather than not at all
                turns = await self.registry.turns(event.uuid)
        body = orjson.dumps(self.enriched(event, record, turns))
        headers = {"Idempotency-Key": f"{event.uuid}:{event.type}"}
        if self.signing_secret:
            headers["X-Signature"] = signature(self.signing_secret, body)
        try:
            async for _ in self.client.stream(self.events_url, body, AnswerInfo(), headers):
                pass
        except UpstreamError as exc:
            if exc.reason not in ("empty_answer", "no_message_in_json", "invalid_json", "html_answer"):
                log.warning("event_not_forwarded", uuid=event.uuid, type=event.type, reason=exc.reason,
                            status=exc.status)
