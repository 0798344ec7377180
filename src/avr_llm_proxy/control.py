"""Call control from the answer: hand the caller to a person, or end the call, over AMI.

An answer may carry `{"action": {"type": "transfer", "to": "1001", "reason": "billing"}}` or
`{"action": {"type": "hangup"}}`. The proxy cannot see playback, so it waits the estimated time the
message takes to speak, then sets `AVR_CONVERSATION_ID`, `AVR_CALLER_NUMBER` and
`AVR_TRANSFER_REASON` on the caller's channel and redirects it to `TRANSFER_CONTEXT`, or hangs it
up. Only destinations of `TRANSFER_ALLOW` are ever sent; one action per call, whichever process
answers its turns (the claim is a compare-and-set on the call record); an ended call is left alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any

import structlog

from .calls import CallRecord, CallRegistry
from .extensions import EXTENSION, Destinations
from .lifecycle import Lifecycle
from .manager import ManagerClient, ManagerError
from .observability import ACTIONS
from .stores import StoreError

log = structlog.get_logger("avr_llm_proxy.control")

TYPES = ("transfer", "hangup")
MAX_REASON_CHARS = 128
MAX_DELAY_S = 15.0
PENDING, SENT = "pending", "sent"
# What a channel name looks like (PJSIP/carrier-00000001, Local/s@avr-00000000;2): nothing AMI reads as syntax.
_CHANNEL = re.compile(r"[A-Za-z0-9][\w/@;:.+#*-]{0,127}", re.ASCII)
_EVENTS = {"transfer": "call_transferred", "hangup": "call_hung_up"}


class ActionRefused(Exception):
    """An action that is not carried out; `reason` is the code for the log line and the record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CallAction:
    type: str
    to: str | None = None
    reason: str | None = None


def _reason(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = "".join(ch for ch in value if ch.isprintable()).strip()[:MAX_REASON_CHARS]
    return text or None


def parse_action(raw: object, destinations: Destinations) -> CallAction:
    """The action an answer asks for; raises ActionRefused for one that is malformed, unknown or not allowed."""
    if not isinstance(raw, dict):
        raise ActionRefused("not_an_object")
    kind = raw.get("type")
    if kind not in TYPES:
        raise ActionRefused("unknown_type")
    reason = _reason(raw.get("reason"))
    if kind == "hangup":
        return CallAction("hangup", reason=reason)
    to = raw.get("to")
    if isinstance(to, int) and not isinstance(to, bool):
        to = str(to)
    if not isinstance(to, str) or not EXTENSION.fullmatch(to):
        raise ActionRefused("invalid_destination")
    if not destinations.allows(to):
        raise ActionRefused("destination_not_allowed")
    return CallAction("transfer", to, reason)


def speaking_time(chars: int, chars_per_second: float) -> float:
    """How long avr-core's TTS takes to say `chars` characters, roughly: their reading time plus 0.5 s."""
    return min(MAX_DELAY_S, chars / chars_per_second + 0.5)


def describe(action: dict[str, Any] | None) -> str:
    """A recorded action in a few words, for `avr-llm-proxy calls` and /debug: `transfer 1001: sent`."""
    if not action:
        return "-"
    to = f" {action['to']}" if action.get("to") else ""
    return f"{action.get('type')}{to}: {action.get('outcome')}"


def blocks(action: dict[str, Any] | None) -> bool:
    """A call's recorded action that leaves no room for another: one waiting to run, or one carried out."""
    return action is not None and action.get("outcome") in (PENDING, SENT)


class CallControl:
    """Carries out the actions answers ask for, off the turns' path."""

    def __init__(self, registry: CallRegistry, client: ManagerClient | None, destinations: Destinations,
                 context: str, delay_ms: int, chars_per_second: float, lifecycle: Lifecycle | None = None) -> None:
        self.registry = registry
        self.client = client
        self.destinations = destinations
        self.context = context
        self.delay_ms = delay_ms
        self.chars_per_second = chars_per_second
        self.lifecycle = lifecycle
        self._running: set[asyncio.Task[None]] = set()

    def request(self, uuid: str, raw: object, spoken_chars: int) -> None:
        """An answer of call `uuid` asked for `raw` after saying `spoken_chars` characters: act on it later."""
        delay = self.delay_ms / 1000 if self.delay_ms else speaking_time(spoken_chars, self.chars_per_second)
        task = asyncio.create_task(self._run(uuid, raw, delay))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, uuid: str, raw: object, delay: float) -> None:
        kind = str(raw.get("type"))[:16] if isinstance(raw, dict) else "unknown"
        action, mark = CallAction(kind), None
        try:
            action = parse_action(raw, self.destinations)
            if self.client is None:
                raise ActionRefused("no_ami_url")
            record, mark = await self._claim(uuid, action)
            await asyncio.sleep(delay)
            current = await self.registry.get(uuid)
            if current is None or current.ended_at is not None:
                raise ActionRefused("call_ended")
            outcome = await self._execute(record, action)
        except ActionRefused as exc:
            outcome = f"refused: {exc.reason}"
        except StoreError as exc:
            outcome = f"failed: store: {exc}"
        await self._finish(uuid, action, outcome, mark)

    async def _claim(self, uuid: str, action: CallAction) -> tuple[CallRecord, dict[str, Any]]:
        """Mark the call's action pending, unless it has one: the one action per call, across processes."""
        mark = {"type": action.type, "to": action.to, "reason": action.reason, "outcome": PENDING, "at": time.time()}

        def claim(current: CallRecord) -> CallRecord | None:
            if blocks(current.action) or not current.channel or not _CHANNEL.fullmatch(current.channel):
                return None
            return dataclasses.replace(current, action=mark)

        record = await self.registry.change(uuid, claim)
        if record is None:
            raise ActionRefused("unknown_call")
        if record.action != mark:
            raise ActionRefused("one_action_per_call" if blocks(record.action) else "no_channel")
        return record, mark

    async def _execute(self, record: CallRecord, action: CallAction) -> str:
        """Send the action's AMI requests; its outcome for the record, `sent` or `failed: <message>`."""
        assert self.client is not None and record.channel is not None
        channel, caller = record.channel, record.caller
        try:
            if action.type == "hangup":
                await self.client.send("Hangup", Channel=channel)
                return SENT
            number = caller.e164 if caller.presentation == "allowed" and caller.e164 else ""
            for name, value in (("AVR_CONVERSATION_ID", record.uuid), ("AVR_CALLER_NUMBER", number),
                                ("AVR_TRANSFER_REASON", action.reason or "")):
                await self.client.send("Setvar", Channel=channel, Variable=name, Value=value)
            await self.client.send("Redirect", Channel=channel, Context=self.context, Exten=str(action.to),
                                   Priority="1")
        except ManagerError as exc:
            return f"failed: {exc}"
        return SENT

    async def _finish(self, uuid: str, action: CallAction, outcome: str, mark: dict[str, Any] | None) -> None:
        """Record, count, log and announce how the action went; a refusal never replaces another action."""
        kind = action.type if action.type in TYPES else "unknown"
        verdict = outcome.partition(":")[0]
        ACTIONS.labels(type=kind, outcome=verdict).inc()
        fields = {"uuid": uuid, "type": kind, "to": action.to, "outcome": outcome}
        if verdict == "refused":
            log.warning("action_refused", **fields, reason=outcome.removeprefix("refused: "))
        elif verdict == SENT:
            log.info("action_sent", **fields)
        else:
            log.warning("action_failed", **fields)
        entry = {"type": kind, "to": action.to, "reason": action.reason, "outcome": outcome, "at": time.time()}

        def noted(current: CallRecord) -> CallRecord | None:
            if blocks(current.action) and current.action != mark:
                return None
            return dataclasses.replace(current, action=entry)

        try:
            record = await self.registry.change(uuid, noted)
        except StoreError as exc:
            log.warning("action_not_stored", uuid=uuid, type=kind, reason=str(exc))
            return
        if verdict == SENT and self.lifecycle is not None:
            self.lifecycle.announce(uuid, _EVENTS[kind], {"action": entry}, record)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self.client is not None:
            await self.client.close()
