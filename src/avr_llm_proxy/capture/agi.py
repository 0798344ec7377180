"""FastAGI capture: `AGI(agi://proxy:4573/callerid)` records the caller and hands the call its UUID.

The recommended way: no `SHELL()` fork, no caller data near a shell, and the proxy assigns the UUID
the dialplan then dials with. `AgiParser` is sans-I/O (bytes in, events out); `FastAgiServer` is the
thin asyncio adapter that reads, feeds, acts and writes (WIRE.md section 3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid as uuidlib
from dataclasses import dataclass

import structlog

from ..avr import canonical_uuid
from ..calls import CallRecord, CallRegistry
from ..identity import NO_TRUST, CallerTrust, dialled_number, parse_caller, parse_presentation, parse_trust, strictest
from ..observability import AGI_SESSIONS, LogThrottle
from ..stores import StoreError

log = structlog.get_logger("avr_llm_proxy.capture.agi")

MAX_LINE_BYTES = 8192
MAX_ENV_LINES = 256
# Asterisk's environment is about 1.5 KB; this bounds what a half-sent one holds (512 sessions: 16 MiB).
MAX_ENV_BYTES = 32 * 1024
SCRIPT = "callerid"
_REPLY = re.compile(r"^(\d{3})(?:[ -](.*))?$")
_RESULT = re.compile(r"result=(-?\d+)(?:\s+\((.*)\))?")


class AgiProtocolError(Exception):
    """The peer sent something FastAGI does not allow (over-long line, endless environment)."""


@dataclass(frozen=True, slots=True)
class AgiEnvironment:
    """The `agi_*` block Asterisk sends first, keys lower-cased."""

    values: dict[str, str]

    def get(self, key: str) -> str:
        """The value, with Asterisk's literal `unknown` (absent number, name, DNID) read as empty."""
        value = self.values.get(key, "")
        return "" if value == "unknown" else value

    @property
    def script(self) -> str:
        """`agi_network_script` without a leading slash or query: the route name."""
        return self.values.get("agi_network_script", "").split("?", 1)[0].strip("/").lower()


@dataclass(frozen=True, slots=True)
class AgiReply:
    """One reply line to a command: `200 result=1 (value)`, `510 …`, `511 …`, `520 …`."""

    code: int
    result: int | None
    value: str | None
    line: str


@dataclass(frozen=True, slots=True)
class AgiHangup:
    """Asterisk's `HANGUP` line: the channel went away."""


AgiEvent = AgiEnvironment | AgiReply | AgiHangup


class AgiParser:
    """Feed bytes, get events; LF or CRLF, over-long lines refused, b"" is the end of the stream."""

    def __init__(self) -> None:
        self._buffer = b""
        self._env: dict[str, str] | None = {}
        self._env_lines = 0
        self._env_bytes = 0
        self.closed = False

    def feed(self, data: bytes) -> list[AgiEvent]:
        if not data:
            self.closed = True
            return []
        self._buffer += data
        events: list[AgiEvent] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE_BYTES:
                    raise AgiProtocolError("line too long")
                return events
            if end > MAX_LINE_BYTES:
                raise AgiProtocolError("line too long")
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            event = self._line(raw.rstrip(b"\r").decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> AgiEvent | None:
        if self._env is not None:
            if not line:
                env, self._env = self._env, None
                return AgiEnvironment(env)
            self._env_lines += 1
            self._env_bytes += len(line) + 1
            if self._env_lines > MAX_ENV_LINES or self._env_bytes > MAX_ENV_BYTES:
                raise AgiProtocolError("environment too long")
            key, sep, value = line.partition(":")
            if sep and key.strip():
                self._env[key.strip().lower()] = value[1:] if value.startswith(" ") else value
            return None
        if line.strip().upper() == "HANGUP":
            return AgiHangup()
        match = _REPLY.match(line.strip())
        if match is None:
            return None
        result = _RESULT.search(match.group(2) or "")
        return AgiReply(
            code=int(match.group(1)),
            result=int(result.group(1)) if result else None,
            value=result.group(2) if result else None,
            line=line,
        )


def record_from_environment(env: AgiEnvironment, uuid: str, num_pres: str | None, region: str) -> CallRecord:
    """The call record an AGI environment describes; `num_pres` is `CALLERID(num-pres)` when asked."""
    caller = parse_caller(
        env.get("agi_callerid"),
        env.get("agi_calleridname"),
        strictest(env.values.get("agi_callingpres"), num_pres),
        source="agi",
        region=region,
    )
    # The shipped subroutine passes the extension that called it as the second argument: inside the
    # Gosub agi_extension is `s`, and a Local channel has no DNID.
    called = dialled_number(env.get("agi_dnid"), env.get("agi_arg_2"), env.get("agi_extension"))
    return CallRecord(
        uuid=uuid,
        caller=caller,
        called_number=called,
        channel=env.get("agi_channel")[:128] or None,
        uniqueid=env.get("agi_uniqueid")[:64] or None,
    )


def quote_agi(value: str) -> str:
    """An AGI command argument: quoted, with quotes and backslashes escaped (res_agi.c parse_args)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# What FastAGI asks a PJSIP channel about its caller's number, one `GET FULL VARIABLE` each (no spaces:
# res_agi splits there). First the headers, the STIR/SHAKEN result count and the Identity header's
# length; with an Identity header, its attestation; and only with an attestation, its verify_result.
# Asterisk 22.10 dies reading verify_result after an x5u that failed its URL checks (a code with no
# name: a NULL string is copied), and any caller can send one; a failed verification leaves the
# attestation empty, so it is known as `failed` without asking.
STIR_ASKED = (
    "${PJSIP_HEADER(read,P-Asserted-Identity)}|${PJSIP_HEADER(read,From)}|${STIR_SHAKEN(count)}"
    "|${LEN(${PJSIP_HEADER(read,Identity)})}",
    "${STIR_SHAKEN(0,attestation)}",
    "${STIR_SHAKEN(0,verify_result)}",
)


class _Session:
    """One FastAGI connection: read the environment, record the caller, answer `SET VARIABLE UUID`."""

    def __init__(self, server: FastAgiServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.parser = AgiParser()
        self.pending: list[AgiEvent] = []

    async def next_event(self) -> AgiEvent | None:
        """The next event, None at end of stream; raises TimeoutError when the peer goes silent."""
        while not self.pending:
            if self.parser.closed:
                return None
            async with asyncio.timeout(self.server.idle_timeout):  # not wait_for: no task per read (3.11)
                data = await self.reader.read(4096)
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)

    async def command(self, line: str) -> AgiReply | None:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, AgiHangup):
                return None
            if isinstance(event, AgiReply):
                return event

    async def value(self, expression: str) -> str | None:
        """`GET FULL VARIABLE` of an expression: its value ("" when unset or refused), None on hang-up.

        The expression must hold no space: res_agi splits the command there, and a second word is
        taken as the channel to evaluate it on."""
        reply = await self.command(f"GET FULL VARIABLE {expression}")
        if reply is None:
            return None
        return (reply.value or "") if reply.code == 200 and reply.result == 1 else ""

    async def trust(self, env: AgiEnvironment) -> CallerTrust | None:
        """What the network asserted about the number, on a PJSIP channel (the only kind that carries it):
        the carrier's verstat in P-Asserted-Identity or From, and Asterisk's STIR/SHAKEN verification of
        an Identity header, asked in the order STIR_ASKED explains; None on hang-up."""
        if not env.get("agi_channel").startswith("PJSIP/"):
            return NO_TRUST
        asked = await self.value(STIR_ASKED[0])
        if asked is None:
            return None
        headers, count, identity = (asked.rsplit("|", 2) + ["", ""])[:3]
        attestation: str | None = ""
        result: str | None = ""
        if count.strip().isdigit() and int(count) > 0 and identity.strip() not in ("", "0"):
            attestation = await self.value(STIR_ASKED[1])
            if attestation == "":
                result = "failed"
            elif attestation is not None:
                result = await self.value(STIR_ASKED[2])
        if attestation is None or result is None:
            return None
        return parse_trust(headers, attestation, result)

    async def run(self) -> str:
        event = await self.next_event()
        if not isinstance(event, AgiEnvironment):
            return "no_environment"
        env = event
        if env.script != SCRIPT:
            log.warning("agi_unknown_script", script=env.script[:64], channel=env.get("agi_channel")[:64])
            return "unknown_script"
        uuid = canonical_uuid(env.get("agi_arg_1")) or str(uuidlib.uuid4())
        num_pres = None
        if parse_presentation(env.values.get("agi_callingpres")) in (None, "allowed"):
            # A num-pres change alone leaves agi_callingpres allowed (presentation.json): ask.
            reply = await self.command("GET FULL VARIABLE ${CALLERID(num-pres)}")
            if reply is None:
                return "hangup"
            num_pres = reply.value if reply.code == 200 and reply.result == 1 else None
            if num_pres is None:  # unknown presentation: withheld, as AMI takes it (fail closed)
                log.warning("agi_presentation_unknown", uuid=uuid, reply=reply.line[:80], treated_as="withheld")
                num_pres = "prohib"
        trust = await self.trust(env)
        if trust is None:
            return "hangup"
        record = dataclasses.replace(record_from_environment(env, uuid, num_pres, self.server.region), trust=trust)
        try:
            # Anyone who reaches the port may open a session: a live caller is replaced only as /call
            # without CAPTURE_TOKEN would replace it (SECURITY.md).
            stored = await self.server.registry.capture(record)
        except StoreError as exc:  # the call still gets its UUID: the dialplan goes on, without a caller
            log.error("capture_not_stored", uuid=uuid, source="agi", reason=str(exc))
        else:
            if stored is None:
                log.warning("capture_refused", uuid=uuid, source="agi", reason="already_captured")
            else:
                log.info(
                    "caller_captured", uuid=uuid, source="agi", caller_number=stored.caller.log_number,
                    presentation=stored.caller.presentation, channel=stored.channel,
                )
        reply = await self.command(f"SET VARIABLE UUID {quote_agi(uuid)}")
        return "ok" if reply is not None and reply.code == 200 else "hangup"


# Asterisk's session takes milliseconds; a peer trickling bytes is cut off at the deadline, and past
# the cap new sessions are closed at once instead of holding a socket (and its buffers) each.
SESSION_DEADLINE_S = 10.0
MAX_SESSIONS = 512


class FastAgiServer:
    """The asyncio FastAGI server `serve` runs on `AGI_LISTEN`."""

    def __init__(self, registry: CallRegistry, listen: str, region: str, idle_timeout: float = 5.0,
                 session_deadline: float = SESSION_DEADLINE_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.registry = registry
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.region = region
        self.idle_timeout = idle_timeout
        self.session_deadline = session_deadline
        self.max_sessions = max_sessions
        self._sessions = 0
        self._refused_log = LogThrottle()
        self._ended_log = LogThrottle()  # sessions cut off: a flood of them is one line a second
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # reuse_port: with `serve --workers N` every worker listens and the kernel spreads the sessions.
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, backlog=1024, reuse_port=self.port != 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("agi_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._sessions >= self.max_sessions:
            self._refuse(writer)
            return
        self._sessions += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._sessions -= 1

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Past the session cap: closed at once, so sockets held open elsewhere cannot exhaust the fds."""
        writer.close()
        AGI_SESSIONS.labels(outcome="refused_busy").inc()
        if (extra := self._refused_log.allow()) is not None:
            log.warning("agi_session_refused", reason="too_many_sessions", limit=self.max_sessions, **extra)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.perf_counter()
        session = _Session(self, reader, writer)
        deadline = asyncio.timeout(self.session_deadline)
        reason = ""
        try:
            async with deadline:  # a whole session, however slowly its bytes trickle in
                outcome = await session.run()
        except TimeoutError:
            outcome = "session_timeout" if deadline.expired() else "idle_timeout"
        except AgiProtocolError as exc:
            outcome, reason = "protocol_error", str(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            outcome = "connection_lost"
        finally:
            writer.close()
        AGI_SESSIONS.labels(outcome=outcome).inc()
        if outcome not in ("ok", "unknown_script") and (extra := self._ended_log.allow()) is not None:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
            log.warning("agi_session_ended", outcome=outcome, elapsed_ms=elapsed_ms, **extra,
                        **({"reason": reason} if reason else {}))
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
