"""One CRM lookup per call (`LOOKUP_URL`): who the caller is to the business, asked once at capture.

When a call is captured with an allowed, valid number, the first process to mark the call's record
`pending` POSTs the caller to `LOOKUP_URL` (with the business API's bearer token and signature); a
JSON object of at most 16 KB comes back as `caller.contact` on every turn, kept in the sealed call
record. A turn that arrives meanwhile waits for it until `LOOKUP_TIMEOUT_MS` after the capture, never
longer; any failure leaves `caller.contact` null and one log line with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from typing import Any

import orjson
import structlog

from .calls import CallRecord, CallRegistry
from .history import kept_for
from .identity import NumberFormat
from .stores import StoreError
from .upstream import Deadlines, HttpClient, UpstreamError, signature

log = structlog.get_logger("avr_llm_proxy.lookup")

MAX_CONTACT_BYTES = 16 * 1024
DONE = "done"


def settled(record: CallRecord) -> bool:
    """The lookup has an outcome (or was never to run): a turn has nothing to wait for."""
    return record.lookup is not None and not record.lookup.startswith("pending:")


class Lookup:
    """Starts each call's lookup on capture and lets turns wait for its answer within the deadline."""

    def __init__(self, registry: CallRegistry, url: str, timeout_s: float, number_format: NumberFormat,
                 token: str = "", signing_secret: str = "") -> None:
        self.registry = registry
        self.url = url
        self.timeout_s = timeout_s
        self.number_format = number_format
        self.signing_secret = signing_secret
        self.client = HttpClient(Deadlines(min(timeout_s, 1.0), timeout_s, timeout_s),
                                 {"Authorization": f"Bearer {token}"} if token else None)
        self._mark = "pending:" + secrets.token_hex(6)  # this process's claim on a call's lookup
        self._running: dict[str, asyncio.Task[None]] = {}
        registry.on_capture.append(self.captured)

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await self.client.close()

    def captured(self, record: CallRecord) -> None:
        """A capture: start its lookup here unless it has one (another process's claim is settled in `_run`)."""
        if record.lookup is None and kept_for(record.caller) and record.uuid not in self._running:
            task = asyncio.create_task(self._run(record.uuid))
            self._running[record.uuid] = task
            task.add_done_callback(lambda _: self._running.pop(record.uuid, None))

    async def contact(self, record: CallRecord) -> CallRecord:
        """The record once its lookup has answered, or as it is when LOOKUP_TIMEOUT_MS after the capture
        has passed: a turn never waits longer."""
        if not kept_for(record.caller) or settled(record):
            return record
        self.captured(record)  # captured where nothing started it (a restored record, another way)
        left = record.captured_at + self.timeout_s - time.time()
        waited = await self.registry.wait(record.uuid, left, until=settled) if left > 0 else record
        if waited is None or not settled(waited):
            log.info("lookup_late", uuid=record.uuid, timeout_ms=round(self.timeout_s * 1000))
            return waited or record
        return waited

    async def _run(self, uuid: str) -> None:
        try:
            claimed = await self.registry.change(uuid, self._claim)
            if claimed is None or claimed.lookup != self._mark:
                return  # no record any more, or another process asks
            outcome, contact = await self._ask(claimed)
            await self.registry.change(uuid, lambda current: dataclasses.replace(current, lookup=outcome,
                                                                                 contact=contact))
        except StoreError as exc:
            log.warning("lookup_not_stored", uuid=uuid, reason=str(exc))

    def _claim(self, current: CallRecord) -> CallRecord | None:
        if current.lookup is not None or not kept_for(current.caller):
            return None
        return dataclasses.replace(current, lookup=self._mark)

    async def _ask(self, record: CallRecord) -> tuple[str, dict[str, Any] | None]:
        """The lookup's outcome and the contact object; a failure is logged here, once."""
        caller = record.caller
        body = orjson.dumps({"caller_number": caller.caller_number(self.number_format), "caller_name": caller.name,
                             "called_number": record.called_number, "conversation_id": record.uuid})
        headers = {"X-Signature": signature(self.signing_secret, body)} if self.signing_secret else None
        started = time.perf_counter()
        try:
            answer = await self.client.read(self.url, body, MAX_CONTACT_BYTES, headers)
            contact = orjson.loads(answer)
            if not isinstance(contact, dict):
                raise UpstreamError("not_an_object")
        except UpstreamError as exc:
            reason = exc.reason
        except orjson.JSONDecodeError:
            reason = "invalid_json"
        else:
            return DONE, contact
        log.warning("lookup_failed", uuid=record.uuid, reason=reason,
                    latency_ms=round((time.perf_counter() - started) * 1000, 1))
        return f"failed:{reason}", None
