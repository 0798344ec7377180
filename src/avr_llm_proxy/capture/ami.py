"""AMI capture: find each call's UUID and caller in Asterisk's manager events, no dialplan change needed.

Two parts over `manager.py`'s framing, as STYLE.md asks: `CallTracker` (sans-I/O: which caller
belongs to which UUID) and `AmiListener` (asyncio: login, read, reconnect, record). The event rules
are WIRE.md section 4, observed in ami-local-call.txt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from ..avr import canonical_uuid
from ..calls import CallRecord, CallRegistry
from ..identity import (
    CallerTrust,
    dialled_number,
    parse_caller,
    parse_presentation,
    parse_trust,
    sanitize_raw,
    strictest,
)
from ..manager import AmiMessage, AmiParser, AmiProtocolError, action_bytes, parse_ami_url
from ..observability import AMI_CONNECTED, AMI_EVENTS
from ..stores import StoreError

log = structlog.get_logger("avr_llm_proxy.capture.ami")

MAX_CHANNELS = 20_000
# AudioSocket/<host:port>-<uuid>; the host may hold dashes itself (avr-core:5001).
_AUDIOSOCKET_CHANNEL = re.compile(r"^AudioSocket/.+-([0-9A-Fa-f-]{36})$")
_NO_VALUE = ("", "<unknown>", "unknown")
_C_ESCAPE = re.compile(r"\\(.)")
_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True, slots=True)
class AmiCapture:
    """A call's UUID bound to its caller, as the events describe it."""

    uuid: str
    channel: str
    number: str
    name: str
    presentation: str
    called: str
    uniqueid: str


@dataclass(slots=True)
class _Channel:
    name: str
    uniqueid: str = ""
    linkedid: str = ""
    number: str = ""
    caller_name: str = ""
    presentation: str = ""
    exten: str = ""
    call: str = ""  # the call UUID captured at this channel's AudioSocket step


def _known(value: str) -> str:
    return "" if value.strip() in _NO_VALUE else value.strip()


def _unescape(value: str) -> str:
    """A caller name as the channel holds it: AMI's channel events escape it C-style (`O\\'Neil`)."""
    return _C_ESCAPE.sub(lambda found: _C_ESCAPES.get(found.group(1), found.group(1)), value)


class CallTracker:
    """Which caller belongs to which call UUID, from the events of every channel; memory is bounded.

    A call is captured once, at its AudioSocket step, from the channel that runs it: the Newexten of
    `Dial(AudioSocket/…)` or of the `AudioSocket()` application (dialplan events), or the DialBegin
    to an AudioSocket channel (call events). Its caller ID and presentation are then what avr-core's
    call will have, whatever the dialplan changed before; of a Local pair it is the half that ran
    the dialplan. The AudioSocket leg's own events never capture (its caller ID is the dialled
    extension, and its linkedid would lead to the other half of a Local pair), nor does anything
    after the step: a call whose step cannot be seen stays uncaptured rather than guessed.
    """

    def __init__(self, max_channels: int = MAX_CHANNELS) -> None:
        self._channels: OrderedDict[str, _Channel] = OrderedDict()  # by Uniqueid
        self._inbound: dict[str, str] = {}  # linkedid -> the first channel of the call (its dialled number)
        self._captured: OrderedDict[str, None] = OrderedDict()
        self._max_channels = max_channels

    def __len__(self) -> int:
        return len(self._channels)

    def ended_call(self, message: AmiMessage) -> str | None:
        """The call captured on this channel when the event is its Hangup (read before `feed` forgets it):
        the caller's side of the call is gone, whatever avr-core says or does not say."""
        if message.value("event").lower() != "hangup":
            return None
        channel = self._channels.get(message.value("uniqueid") or message.value("channel"))
        return channel.call if channel is not None and channel.call else None

    def feed(self, message: AmiMessage) -> list[AmiCapture]:
        event = message.value("event").lower()
        name = message.value("channel")
        # Channel events carry Linkedid; others (OriginateResponse, …) only mention a channel.
        if not event or not name or "linkedid" not in message or _AUDIOSOCKET_CHANNEL.match(name):
            return []
        # A channel is known by its Uniqueid: names repeat (their counters restart with Asterisk, and a
        # missed Hangup would leave a name behind), a Uniqueid does not.
        key = message.value("uniqueid") or name
        if event == "hangup":
            self._forget(key)
            return []
        channel = self._update(key, name, event, message)
        uuid = _audiosocket_step(event, message)
        if uuid is None or uuid in self._captured:
            return []
        channel.call = uuid
        self._captured[uuid] = None
        if len(self._captured) > self._max_channels:
            self._captured.popitem(last=False)
        # The number the call came in on: the call's first channel's (a DID), else this channel's.
        inbound = self._channels.get(self._inbound.get(channel.linkedid, ""), channel)
        called = dialled_number(inbound.exten, channel.exten) or ""
        return [AmiCapture(uuid, channel.name, channel.number, channel.caller_name, channel.presentation, called,
                           channel.uniqueid)]

    def _update(self, key: str, name: str, event: str, message: AmiMessage) -> _Channel:
        channel = self._channels.pop(key, None) or _Channel(name)
        self._channels[key] = channel
        if len(self._channels) > self._max_channels:
            self._forget(next(iter(self._channels)))
        channel.name = name  # a Rename keeps the Uniqueid
        channel.uniqueid = message.value("uniqueid") or channel.uniqueid
        linkedid = message.value("linkedid") or channel.linkedid
        if linkedid != channel.linkedid and self._inbound.get(channel.linkedid) == key:
            del self._inbound[channel.linkedid]  # a bridge or transfer gave the channel another call's id
        channel.linkedid = linkedid
        if "calleridnum" in message:  # every channel event carries the caller ID as it is now, blank included
            channel.number = _known(message.value("calleridnum"))
            channel.caller_name = _unescape(_known(message.value("calleridname")))
        if "cid-callingpres" in message:
            channel.presentation = message.value("cid-callingpres")
        if not channel.exten and event == "newchannel":
            channel.exten = sanitize_raw(message.value("exten"))
        if channel.linkedid:
            self._inbound.setdefault(channel.linkedid, key)
        return channel

    def _forget(self, key: str) -> None:
        channel = self._channels.pop(key, None)
        if channel is not None and self._inbound.get(channel.linkedid) == key:
            del self._inbound[channel.linkedid]


def _audiosocket_step(event: str, message: AmiMessage) -> str | None:
    """The call UUID when this event is a channel's AudioSocket step (WIRE.md), else None."""
    if event == "newexten":
        application, data = message.value("application").lower(), message.value("appdata")
        if application == "dial" and data.lower().startswith("audiosocket/"):
            # AudioSocket/<host:port>/<uuid>[/…][,timeout,…]: the segment after host:port.
            parts = data.split(",", 1)[0].split("/")
            return canonical_uuid(parts[2]) if len(parts) > 2 else None
        if application == "audiosocket":
            return canonical_uuid(data.split(",", 1)[0].strip())
    if event == "dialbegin":
        dest = _AUDIOSOCKET_CHANNEL.match(message.value("destchannel"))
        return canonical_uuid(dest.group(1)) if dest else None
    return None


def record_from_capture(capture: AmiCapture, num_pres: str | None, region: str) -> CallRecord:
    """The call record for a capture; `num_pres` is the Getvar answer, None when it could not be had.

    An unknown presentation is a withheld one: the number is kept back rather than risked.
    """
    presentation = strictest(capture.presentation, "prohib" if num_pres is None else num_pres)
    caller = parse_caller(capture.number, capture.name, presentation, source="ami", region=region)
    return CallRecord(uuid=capture.uuid, caller=caller, called_number=capture.called or None,
                      channel=capture.channel[:128], uniqueid=capture.uniqueid[:64] or None)


class AmiListener:
    """Logs in to the manager, reads events, records callers; reconnects with backoff, forever."""

    def __init__(self, registry: CallRegistry, url: str, region: str, answer_wait: float = 1.0,
                 hung_up: Callable[[str], Coroutine[Any, Any, object]] | None = None) -> None:
        self.endpoint = parse_ami_url(url)
        self.hung_up = hung_up  # told of each captured call whose channel hangs up (the call's end)
        self.registry = registry
        self.region = region
        self.answer_wait = answer_wait
        self.tracker = CallTracker()
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._records: set[asyncio.Task[object]] = set()
        self._capturing: dict[str, asyncio.Task[object]] = {}  # captures still being stored, by call UUID

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ami-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._records):
            task.cancel()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._session()
                delay = 0.5
            except (OSError, AmiProtocolError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.warning("ami_disconnected", host=self.endpoint.host, reason=f"{type(exc).__name__}: {exc}",
                            retry_in_s=delay)
            finally:
                self.connected = False
                AMI_CONNECTED.set(0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _session(self) -> None:
        # asyncio.timeout, never wait_for: on Python 3.11 wait_for can swallow the cancellation that
        # close() sends when the awaited read completes at the same moment, and the listener would
        # reconnect for ever while the shutdown waits for it (seen as a hung test).
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        parser = AmiParser()
        # A restarted Asterisk names channels from 0 again: what was tracked before belongs to other calls.
        self.tracker = CallTracker()
        try:
            writer.write(action_bytes({"Action": "Login", "ActionID": "login", "Username": self.endpoint.username,
                                       "Secret": self.endpoint.secret, "Events": "on"}))
            await writer.drain()
            while True:
                try:
                    async with asyncio.timeout(60.0):
                        data = await reader.read(65536)
                except TimeoutError:
                    writer.write(action_bytes({"Action": "Ping", "ActionID": "ping"}))
                    async with asyncio.timeout(10.0):
                        data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("manager closed the connection")
                for message in parser.feed(data):
                    self._handle(message, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    def _handle(self, message: AmiMessage, writer: asyncio.StreamWriter) -> None:
        action_id = message.value("actionid")
        if "response" in message:
            if action_id == "login":
                if message.value("response").lower() != "success":
                    raise AmiProtocolError(f"login refused: {message.value('message')[:80]}")
                self.connected = True
                AMI_CONNECTED.set(1)
                log.info("ami_connected", host=self.endpoint.host, port=self.endpoint.port)
                # Every capture asks Getvar: a user that may not would withhold every caller, one
                # warning per call. Asked once now, the reason is said once, at login.
                writer.write(action_bytes({"Action": "Getvar", "ActionID": "probe", "Variable": "AVR_LLM_PROXY_PROBE"}))
            elif action_id == "probe" and message.value("response").lower() != "success":
                log.warning("ami_getvar_refused", host=self.endpoint.host, message=message.value("message")[:80],
                            effect="every caller it captures is recorded withheld",
                            hint="give the manager user write = call,reporting (manager.conf)")
            waiter = self._pending.pop(action_id, None)
            if waiter is not None and not waiter.done():
                ok = message.value("response").lower() == "success"
                waiter.set_result(message.value("value") if ok else None)
            return
        AMI_EVENTS.inc()
        ended = self.tracker.ended_call(message)
        if ended is not None and self.hung_up is not None:
            self._background(self._ended(ended, self._capturing.get(ended)))
        for capture in self.tracker.feed(message):
            task = self._background(self._record(capture, writer))
            self._capturing[capture.uuid] = task
            task.add_done_callback(functools.partial(self._stored, capture.uuid))

    def _background(self, work: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task = asyncio.create_task(work)
        self._records.add(task)
        task.add_done_callback(self._records.discard)
        return task

    def _stored(self, uuid: str, task: asyncio.Task[object]) -> None:
        if self._capturing.get(uuid) is task:
            del self._capturing[uuid]

    async def _ended(self, uuid: str, capture: asyncio.Task[object] | None) -> None:
        """After the call's capture is stored (a short call hangs up while it asks Getvar), its end."""
        assert self.hung_up is not None
        if capture is not None:
            await asyncio.wait([capture])
        await self.hung_up(uuid)

    async def _record(self, capture: AmiCapture, writer: asyncio.StreamWriter) -> None:
        """Record one capture; a presentation-only change has no event, so ask for num-pres first."""
        num_pres: str | None = ""
        if parse_presentation(capture.presentation) in (None, "allowed"):
            num_pres = await self._getvar(capture.channel, "CALLERID(num-pres)", writer)
            if num_pres is None:
                log.warning("ami_presentation_unknown", uuid=capture.uuid, channel=capture.channel,
                            treated_as="withheld")
        record = record_from_capture(capture, num_pres, self.region)
        if capture.channel.startswith("PJSIP/"):
            record = dataclasses.replace(record, trust=await self._trust(capture.channel, writer))
        try:
            stored = await self.registry.put(record)
        except StoreError as exc:
            log.error("capture_not_stored", uuid=capture.uuid, source="ami", reason=str(exc))
            return
        # The caller as stored: a call withheld by an earlier capture stays so, in the log too.
        caller = stored.caller
        log.info("caller_captured", uuid=capture.uuid, source="ami", caller_number=caller.log_number,
                 presentation=caller.presentation, channel=capture.channel)

    async def _trust(self, channel: str, writer: asyncio.StreamWriter) -> CallerTrust:
        """What the network asserted, read off a PJSIP channel: its P-Asserted-Identity and From headers
        and Asterisk's STIR/SHAKEN verification of an Identity header, in the order capture/agi.py's
        STIR_ASKED explains. Whatever the manager cannot say counts as not asserted."""
        headers = [await self._getvar(channel, f"PJSIP_HEADER(read,{name})", writer)
                   for name in ("P-Asserted-Identity", "From")]
        count = await self._getvar(channel, "STIR_SHAKEN(count)", writer) or ""
        attestation = result = None
        if count.strip().isdigit() and int(count) > 0 and await self._getvar(
                channel, "PJSIP_HEADER(read,Identity)", writer):
            attestation = await self._getvar(channel, "STIR_SHAKEN(0,attestation)", writer)
            if attestation:
                result = await self._getvar(channel, "STIR_SHAKEN(0,verify_result)", writer)
            elif attestation == "":
                result = "failed"
        return parse_trust([header for header in headers if header], attestation, result)

    async def _getvar(self, channel: str, variable: str, writer: asyncio.StreamWriter) -> str | None:
        """A channel's variable or function value; None when the manager could not say (error, no answer)."""
        if writer.is_closing():
            return None
        action_id = f"get-{next(self._ids)}"
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = waiter
        writer.write(action_bytes({"Action": "Getvar", "ActionID": action_id, "Channel": channel,
                                   "Variable": variable}))
        try:
            async with asyncio.timeout(self.answer_wait):
                return await waiter
        except TimeoutError:
            return None
        finally:
            self._pending.pop(action_id, None)
