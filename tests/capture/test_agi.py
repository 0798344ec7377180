"""capture/agi.py: the FastAGI parser on the captured bytes, and real sessions over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import uuid as uuidlib
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.calls import CallRegistry
from avr_llm_proxy.capture.agi import (
    STIR_ASKED,
    AgiEnvironment,
    AgiHangup,
    AgiParser,
    AgiProtocolError,
    AgiReply,
    FastAgiServer,
    record_from_environment,
)
from avr_llm_proxy.simulate import play_call, register_caller
from avr_llm_proxy.stores.memory import MemoryStore

from ..conftest import FIXTURES, closed_port, make_settings, rss, running_api, running_proxy, wait_for

LOCAL = (FIXTURES / "agi-env-local.txt").read_bytes()
PJSIP = (FIXTURES / "agi-env-pjsip.txt").read_bytes()
FIXTURE_UUID = "858675a8-e2f7-4c71-ad18-2c76b7927da2"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def environment(data: bytes) -> AgiEnvironment:
    events = AgiParser().feed(data)
    assert len(events) == 1 and isinstance(events[0], AgiEnvironment)
    return events[0]


def test_fixture_environment_parses() -> None:
    """The real Asterisk 22 block gives every agi_* key, empty values kept empty."""
    env = environment(PJSIP)
    assert env.values["agi_callerid"] == "+593987654321" and env.values["agi_calleridname"] == "Juan Perez"
    assert env.values["agi_dnid"] == "5551000" and env.values["agi_accountcode"] == ""
    assert env.get("agi_rdnis") == "" and env.values["agi_rdnis"] == "unknown"
    assert env.script == "test"


def test_crlf_and_byte_by_byte() -> None:
    """CRLF line ends and one byte at a time give the same environment."""
    parser = AgiParser()
    events = [event for byte in LOCAL.replace(b"\n", b"\r\n") for event in parser.feed(bytes([byte]))]
    assert events == [environment(LOCAL)]


@given(st.integers(min_value=0, max_value=len(LOCAL)))
def test_split_anywhere(offset: int) -> None:
    """Split at any offset, the parser yields exactly one identical environment."""
    parser = AgiParser()
    events = parser.feed(LOCAL[:offset]) + parser.feed(LOCAL[offset:])
    assert events == [environment(LOCAL)]


def test_replies_and_hangup() -> None:
    """Reply lines and HANGUP after the environment become events."""
    parser = AgiParser()
    parser.feed(LOCAL)
    events = parser.feed(b"200 result=1 (prohib)\n510 Invalid or unknown command\nHANGUP\n200 result=0\n")
    assert events == [
        AgiReply(200, 1, "prohib", "200 result=1 (prohib)"),
        AgiReply(510, None, None, "510 Invalid or unknown command"),
        AgiHangup(),
        AgiReply(200, 0, None, "200 result=0"),
    ]


def test_limits() -> None:
    """An over-long line or an endless environment is refused, not buffered."""
    with pytest.raises(AgiProtocolError):
        AgiParser().feed(b"agi_callerid: " + b"9" * 10_000)
    with pytest.raises(AgiProtocolError):
        AgiParser().feed(b"".join(b"agi_x%d: 1\n" % index for index in range(300)))
    with pytest.raises(AgiProtocolError):  # lines each under both caps, 40 KiB in all
        AgiParser().feed(b"".join(b"agi_x%d: %s\n" % (index, b"9" * 4000) for index in range(10)))
    assert environment(edited(PJSIP, arg_1="9" * 4000, arg_2="9" * 4000)).values["agi_arg_2"] == "9" * 4000


@given(st.binary(max_size=3000))
def test_garbage_never_crashes(data: bytes) -> None:
    """Any bytes give events or a protocol error, nothing else."""
    try:
        AgiParser().feed(data)
    except AgiProtocolError:
        pass


def edited(data: bytes, **values: str) -> bytes:
    """A captured environment with some agi_* values replaced (keys without the `agi_` prefix)."""
    for key, value in values.items():
        data, count = re.subn(rb"(?m)^agi_%s: .*$" % key.encode(), f"agi_{key}: {value}".encode(), data)
        assert count == 1
    return data


# (fixture, its values replaced, the called number recorded)
DIALLED = [
    ("pjsip", {}, "5551000"),
    ("pjsip", {"arg_2": "5559999", "extension": "5558888"}, "5551000"),
    ("pjsip", {"dnid": "alice", "arg_2": "5552000"}, "5552000"),
    ("pjsip", {"dnid": "alice", "extension": "s"}, None),
    ("local", {}, None),
    ("local", {"arg_2": "5551000"}, "5551000"),
    ("local", {"arg_2": "5551000", "extension": "s"}, "5551000"),
    ("local", {"arg_2": "+593 2 555-1000"}, "+59325551000"),
    ("local", {"arg_2": "", "extension": "5553000"}, "5553000"),
    ("local", {"arg_2": "unknown", "extension": "s"}, None),
]


@pytest.mark.parametrize(("fixture", "values", "called"), DIALLED)
def test_called_number_from_dnid_else_argument_else_extension(fixture: str, values: dict[str, str],
                                                              called: str | None) -> None:
    """agi_dnid, else agi_arg_2 (the subroutine's calling extension), else agi_extension: the first of digits."""
    env = environment(edited(LOCAL if fixture == "local" else PJSIP, **values))
    record = record_from_environment(env, FIXTURE_UUID, "allowed_not_screened", "EC")
    assert record.called_number == called
    assert record.caller.e164 == "+593987654321" and record.uuid == FIXTURE_UUID


# Channel values the fake Asterisk knows, by the expression inside ${…}.
PAI, IDENTITY = "PJSIP_HEADER(read,P-Asserted-Identity)", "PJSIP_HEADER(read,Identity)"
STIR_COUNT, ATTESTATION, VERIFY = "STIR_SHAKEN(count)", "STIR_SHAKEN(0,attestation)", "STIR_SHAKEN(0,verify_result)"
_INNERMOST = re.compile(r"\$\{([^${}]*)\}")


def evaluate(expression: str, variables: dict[str, str]) -> str:
    """Substitute ${…} as Asterisk does, innermost first; LEN() counts, anything unknown is empty."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("LEN(") and name.endswith(")"):
            return str(len(name[4:-1]))
        return variables.get(name, "")

    while _INNERMOST.search(expression):
        expression = _INNERMOST.sub(value, expression)
    return expression


async def agi_session(port: int, env: bytes, num_pres: str = "allowed_not_screened",
                      getvar_reply: str | None = None, variables: dict[str, str] | None = None) -> list[str]:
    """A fake Asterisk: send the environment, answer each command the way Asterisk 22 does: the
    presentation is `num_pres`, `variables` the values of other expressions, anything else empty, an
    expression followed by a channel name not found (`getvar_reply`: the whole answer to every GET FULL
    VARIABLE instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(env)
    commands = []
    try:
        while line := await asyncio.wait_for(reader.readline(), 5):
            command = line.decode().rstrip("\n")
            commands.append(command)
            if command.startswith("GET FULL VARIABLE"):
                # res_agi splits at spaces: a second word names the channel, here one that does not exist.
                expression, _, channel = command.removeprefix("GET FULL VARIABLE ").partition(" ")
                value = num_pres if "num-pres" in expression else evaluate(expression, variables or {})
                answer = "200 result=0" if channel else f"200 result=1 ({value})"
                writer.write(f"{getvar_reply or answer}\n".encode())
            else:
                writer.write(b"200 result=1\n")
    finally:
        writer.close()
    return commands


def with_script(env: bytes, script: str = "callerid", arg: str | None = None) -> bytes:
    env = env.replace(b"agi_network_script: test", f"agi_network_script: {script}".encode())
    if arg is None:
        return env.replace(b"agi_arg_1: " + FIXTURE_UUID.encode() + b"\n", b"")
    return env.replace(FIXTURE_UUID.encode(), arg.encode())


@pytest.mark.parametrize("fixture", ["local", "pjsip"])
async def test_session_records_caller_and_sets_uuid(tmp_path: Path, fixture: str) -> None:
    """The dialplan gets SET VARIABLE UUID, the record holds the caller, and turns carry the number."""
    port = closed_port()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}", caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            env = with_script(LOCAL if fixture == "local" else PJSIP)
            commands = await agi_session(port, env)
            assert commands[0] == "GET FULL VARIABLE ${CALLERID(num-pres)}"
            # The assertion about the number, asked of a PJSIP channel only: without an Identity header, once.
            asked = [STIR_ASKED[0]] if fixture == "pjsip" else []
            assert commands[1:-1] == [f"GET FULL VARIABLE {expression}" for expression in asked]
            match = re.fullmatch(r'SET VARIABLE UUID "(.+)"', commands[-1])
            assert match and UUID4.match(match.group(1))
            call = match.group(1)
            turns = await play_call(proxy.url, call, ["hola", "mi pedido"])
    assert all(turn.problems == [] for turn in turns)
    for payload in api.received:
        assert payload["caller_number"] == "+593987654321" and payload["caller_name"] == "Juan Perez"
        assert payload["caller"]["source"] == "agi" and payload["caller"]["presentation"] == "allowed"
        assert payload["called_number"] == ("5551000" if fixture == "pjsip" else None)


async def test_session_inside_a_gosub_takes_the_dialled_number_from_the_argument(tmp_path: Path) -> None:
    """A Local channel in the shipped Gosub (no DNID, agi_extension `s`): the number comes from agi_arg_2."""
    port = closed_port()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}", caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            env = edited(with_script(LOCAL, arg=""), extension="s", context="avr-callerid-agi", arg_2="5551000")
            commands = await agi_session(port, env)
            call = commands[-1].split('"')[1]
            await play_call(proxy.url, call, ["hola"])
    assert api.received[0]["called_number"] == "5551000"
    assert api.received[0]["caller_number"] == "+593987654321"


async def test_given_uuid_is_kept(tmp_path: Path) -> None:
    """A UUID passed as the first AGI argument is used instead of a new one."""
    port, call = closed_port(), str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path, agi_listen=f"127.0.0.1:{port}")) as proxy:
        commands = await agi_session(port, with_script(PJSIP, arg=call.upper()))
        assert commands[-1] == f'SET VARIABLE UUID "{call}"'
        reply = await play_call(proxy.url, call, ["hola"])
    assert "Juan" in reply[0].sentences[0]


async def test_session_does_not_replace_a_live_caller(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """An AGI session naming a live call's UUID gets its UUID back but leaves the caller as /call recorded it."""
    port, call = closed_port(), str(uuidlib.uuid4())
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}", caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            first = await register_caller(proxy.url, call, "0991234567", "Ana", "5551000", "json")
            assert first.status == 200
            env = with_script(PJSIP, arg=call)  # the fixture's caller: +593987654321, Juan Perez
            commands = await agi_session(port, env)
            assert commands[-1] == f'SET VARIABLE UUID "{call}"'
            await play_call(proxy.url, call, ["hola"])
            withheld = await agi_session(port, with_script(PJSIP, arg=call), num_pres="prohib")
            assert withheld[-1] == f'SET VARIABLE UUID "{call}"'
            await play_call(proxy.url, call, ["sigo"])
    assert [(p["caller_number"], p["caller_name"]) for p in api.received] == [
        ("+593991234567", "Ana"), ("anonymous", None)]  # a withheld capture may take the number away
    refused = [line for line in logs() if '"capture_refused"' in line]
    assert len(refused) == 1 and call in refused[0] and "already_captured" in refused[0]


async def test_uuid_is_given_only_once_the_capture_is_stored(tmp_path: Path) -> None:
    """Asterisk goes on (to avr-core) once it has the UUID: by then every process must find the record,
    or avr-core's call_initiated on another worker would store the number a withheld caller hid."""
    port, call = closed_port(), str(uuidlib.uuid4())
    settings = make_settings(tmp_path, agi_listen=f"127.0.0.1:{port}")
    async with running_proxy(settings):
        blocker = sqlite3.connect(tmp_path / "calls.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process's long write: the capture's commit waits
        asyncio.get_running_loop().call_later(0.5, blocker.rollback)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(with_script(PJSIP, arg=call))
        stored_when_told = None
        while line := await asyncio.wait_for(reader.readline(), 10):
            if line.startswith(b"SET VARIABLE UUID"):
                with sqlite3.connect(tmp_path / "calls.db") as look:
                    stored_when_told = look.execute("SELECT count(*) FROM calls WHERE key = ?", (call,)).fetchone()[0]
            writer.write(b"200 result=1 (allowed_not_screened)\n" if line.startswith(b"GET") else b"200 result=1\n")
        writer.close()
        blocker.close()
    assert stored_when_told == 1


@pytest.mark.parametrize(("num_pres", "callingpres", "expected"),
                         [("prohib", "0", "anonymous"), ("allowed_not_screened", "35", "anonymous"),
                          ("allowed_not_screened", "67", "unknown")])
async def test_presentation_is_honoured(tmp_path: Path, num_pres: str, callingpres: str, expected: str) -> None:
    """num-pres prohib (no agi_callingpres change) or a restricting code withholds the number Asterisk still has."""
    port, call = closed_port(), str(uuidlib.uuid4())
    env = with_script(PJSIP, arg=call).replace(b"agi_callingpres: 0", f"agi_callingpres: {callingpres}".encode())
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}")
        async with running_proxy(settings) as proxy:
            await agi_session(port, env, num_pres)
            await play_call(proxy.url, call, ["hola"])
    payload = api.received[0]
    assert payload["caller_number"] == expected and payload["caller"]["raw"] is None
    assert "593987654321" not in orjson.dumps(payload).decode()


@pytest.mark.parametrize("reply", ["510 Invalid or unknown command", "200 result=0"])
async def test_presentation_not_answered_is_withheld(tmp_path: Path, logs, reply: str) -> None:  # type: ignore[no-untyped-def]
    """CALLERID(num-pres) not answered (an error, result=0): the call is withheld, not forwarded as allowed."""
    port, call = closed_port(), str(uuidlib.uuid4())
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}")
        async with running_proxy(settings) as proxy:
            commands = await agi_session(port, with_script(PJSIP, arg=call), getvar_reply=reply)
            assert commands[0] == "GET FULL VARIABLE ${CALLERID(num-pres)}"
            assert commands[-1] == f'SET VARIABLE UUID "{call}"'
            await play_call(proxy.url, call, ["hola"])
    payload = api.received[0]
    assert payload["caller_number"] == "anonymous" and payload["caller"]["presentation"] == "withheld"
    assert payload["caller"]["raw"] is None and "593987654321" not in orjson.dumps(payload).decode()
    warned = [orjson.loads(line) for line in logs() if '"agi_presentation_unknown"' in line]
    assert [(line["uuid"], line["reply"], line["treated_as"]) for line in warned] == [(call, reply, "withheld")]


async def test_unknown_script_and_bad_clients_end_cleanly(tmp_path: Path) -> None:
    """Unknown script, silence, a line without newline, garbage, over-long line: closed, server keeps serving."""
    port = closed_port()
    settings = make_settings(tmp_path, agi_listen=f"127.0.0.1:{port}")
    async with running_proxy(settings):
        assert await agi_session(port, with_script(PJSIP, script="other")) == []
        for payload in (b"", b"agi_network: yes", b"\xff\xfe garbage\n\n", b"agi_callerid: " + b"1" * 9000):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            if payload:
                writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        commands = await agi_session(port, with_script(PJSIP))
        assert commands[-1].startswith("SET VARIABLE UUID")


HOSTILE = [b"$(reboot); `id` | nc x 1", b"+593987654321;rm -rf /", "Jos\u00e9 \u00f1".encode("latin-1"),
           b"\xff\xfe\xfd", b"9" * 4096]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_caller_ids(tmp_path: Path, value: bytes) -> None:
    """Shell code, non-UTF-8 and 4 KB values in the caller ID are recorded sanitised; nothing breaks."""
    port, call = closed_port(), str(uuidlib.uuid4())
    env = with_script(PJSIP, arg=call).replace(b"agi_callerid: +593987654321", b"agi_callerid: " + value)
    env = env.replace(b"agi_calleridname: Juan Perez", b"agi_calleridname: " + value)
    async with running_api() as api:
        async with running_proxy(make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}")) as proxy:
            commands = await agi_session(port, env)
            assert commands[-1] == f'SET VARIABLE UUID "{call}"'
            turns = await play_call(proxy.url, call, ["hola"])
    assert turns[0].problems == []
    sent = api.received[0]
    assert len(sent["caller_number"]) <= 32 and not set(sent["caller_number"]) & set("$`;|() ")
    assert sent["caller_name"] is None or len(sent["caller_name"]) <= 64


async def test_500_concurrent_sessions(tmp_path: Path) -> None:
    """500 sessions at once with distinct callers: every UUID maps to its own caller."""
    port = closed_port()
    async with running_api() as api:
        # Load tests get a generous deadline: a shared 2-core machine may be slow, never wrong.
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}", caller_wait_ms=0,
                                 api_timeout_ms=60_000)
        async with running_proxy(settings) as proxy:
            numbers = [f"+59398{index:07d}" for index in range(500)]

            async def one(number: str) -> tuple[str, str]:
                env = with_script(PJSIP).replace(b"+593987654321", number.encode())
                commands = await agi_session(port, env)
                return number, commands[-1].split('"')[1]

            pairs = await asyncio.gather(*(one(number) for number in numbers))
            assert len({call for _, call in pairs}) == 500
            heard = await asyncio.gather(*(play_call(proxy.url, call, ["hola"]) for _, call in pairs))
            assert [turns[0].sentences[0] for turns in heard] == [f"Hola {number}." for number, _ in pairs]
    by_call = {payload["conversation_id"]: payload["caller_number"] for payload in api.received}
    assert all(by_call[call] == number for number, call in pairs)


async def test_frozen_redis_does_not_hold_the_call(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """A Redis that accepts and never answers: Asterisk gets its UUID at the store's deadline, not after
    redis-py's retries (about 35 s), and the capture is logged as not stored."""
    held: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing back, answers nothing
        await reader.read(1 << 20)

    redis = await asyncio.start_server(frozen, "127.0.0.1", 0)
    port = closed_port()
    try:
        settings = make_settings(tmp_path, agi_listen=f"127.0.0.1:{port}",
                                 store_url=f"redis://127.0.0.1:{redis.sockets[0].getsockname()[1]}/0",
                                 store_timeout_ms=400,
                                 encryption_key="MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
        async with running_proxy(settings):
            async with asyncio.timeout(10):  # a liveness bound, far from both 1 s and 35 s
                commands = await agi_session(port, with_script(PJSIP))
    finally:
        for writer in held:
            writer.close()
        redis.close()
    assert commands[-1].startswith("SET VARIABLE UUID ")
    assert any('"capture_not_stored"' in line and "timed out after 0.4 s" in line for line in logs())


async def test_trickling_session_is_cut_at_its_deadline(logs) -> None:  # type: ignore[no-untyped-def]
    """A peer sending a byte now and then, never idle long enough for the idle timeout, is closed at the
    whole-session deadline."""
    server = FastAgiServer(CallRegistry(MemoryStore(), 3600), "127.0.0.1:0", "EC", idle_timeout=5.0,
                           session_deadline=1.0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        sent = 0
        async with asyncio.timeout(20):  # a liveness bound: the deadline is 1 s, the idle timeout 5 s
            while not reader.at_eof():
                with contextlib.suppress(ConnectionError):
                    writer.write(b"a")
                    await writer.drain()
                    sent += 1
                with contextlib.suppress(TimeoutError, ConnectionError):
                    async with asyncio.timeout(0.3):
                        await reader.read(1)
        writer.close()
    finally:
        await server.close()
    assert sent >= 2  # it was kept busy below the idle timeout, then cut
    assert any('"agi_session_ended"' in line and "session_timeout" in line for line in logs())


async def test_sessions_past_the_cap_are_closed_at_once(logs) -> None:  # type: ignore[no-untyped-def]
    """With the cap reached, a new connection is closed at once (one log line), and a session that ends
    makes room for the next."""
    server = FastAgiServer(CallRegistry(MemoryStore(), 3600), "127.0.0.1:0", "EC", max_sessions=2)
    await server.start()
    held = []
    try:
        for _ in range(2):
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
            await held[-1][1].drain()
        await wait_for(lambda: server._sessions == 2)  # both accepted by the server
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a word
        writer.close()
        held.pop()[1].close()
        await wait_for(lambda: server._sessions == 1)
        commands = await agi_session(server.port, with_script(PJSIP))
        assert commands[-1].startswith("SET VARIABLE UUID ")
    finally:
        for _, other in held:
            other.close()
        await server.close()
    assert len([line for line in logs() if '"agi_session_refused"' in line]) == 1


async def test_500_half_sent_environments_hold_bounded_memory() -> None:
    """500 peers each sending environment lines as long as allowed and never the blank line: each is cut
    at the environment cap, so together they hold megabytes, not the 2 MiB each that 256 long lines are."""
    server = FastAgiServer(CallRegistry(MemoryStore(), 3600), "127.0.0.1:0", "EC")
    await server.start()
    line = b"agi_x: " + b"9" * 8000 + b"\n"
    held, sent = [], 0
    before = rss()
    try:
        for index in range(500):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            held.append(writer)
            with contextlib.suppress(ConnectionError):
                for _ in range(256):
                    writer.write(line.replace(b"agi_x", b"agi_x%d" % index))
                    await writer.drain()
                    sent += len(line)
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                            break  # the server closed it
        grown = rss() - before
    finally:
        for writer in held:
            writer.close()
        await wait_for(lambda: server._sessions == 0)
        await server.close()
    assert grown < 64 * 1024 * 1024, f"the process grew {grown} bytes"
    assert sent < 500 * 64 * 1024  # the server closed each early; on its own the client would send 1 GB


async def test_2000_trickling_sessions_are_all_closed() -> None:
    """2,000 peers trickling environment bytes: those past the session cap are closed at once, the rest at
    the session deadline; none stays open, and a real session is served after."""
    server = FastAgiServer(CallRegistry(MemoryStore(), 3600), "127.0.0.1:0", "EC", session_deadline=1.0)
    await server.start()
    closed = 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        with contextlib.suppress(ConnectionError):
            for byte in b"agi_network: yes\n" * 1000:
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(4096), 0.2) == b"":
                        break
        closed += 1
        writer.close()

    try:
        connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2000)]
        async with asyncio.timeout(60):  # a liveness bound: the deadline is 1 s
            await asyncio.gather(*(trickle(reader, writer) for reader, writer in connections))
        await wait_for(lambda: server._sessions == 0)
        commands = await agi_session(server.port, with_script(PJSIP))
    finally:
        await server.close()
    assert closed == 2000
    assert commands[-1].startswith("SET VARIABLE UUID ")
