"""capture/ami.py: the AMI parser and call tracker on the captured events, and a real listener over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tracemalloc
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.calls import CallRecord, CallRegistry
from avr_llm_proxy.capture.ami import AmiCapture, AmiListener, CallTracker, record_from_capture
from avr_llm_proxy.identity import parse_caller
from avr_llm_proxy.manager import AmiMessage, AmiParser, AmiProtocolError, parse_ami_url
from avr_llm_proxy.simulate import http_request, play_call
from avr_llm_proxy.stores.memory import MemoryStore

from ..conftest import FIXTURES, clean_environ, closed_port, make_settings, running_api, running_proxy, wait_for

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
EVENTS_LF = (FIXTURES / "ami-local-call.txt").read_bytes()
EVENTS = EVENTS_LF.replace(b"\n", b"\r\n")
DIAL_UUID = "9a05bdfe-fb2c-492e-a462-b7e152a95121"
APP_UUID = "ab4df463-b871-4281-9969-d26cf223634a"
# Banner and login answer included, CRLF: the ;2 half of a Local pair withholds its number, then dials AudioSocket.
WITHHELD = (FIXTURES / "ami-local-withheld.txt").read_bytes()
WITHHELD_UUID = "ab56120b-ee05-4e59-9646-4671c97fbaf5"
WITHHELD_LEG = "Local/5551000@ami-dial-usage-before-00000000;2"


def messages(data: bytes) -> list[AmiMessage]:
    return AmiParser().feed(BANNER + data)


def test_fixture_parses_with_crlf_and_lf() -> None:
    """The captured call gives its seven events, whichever line end is used."""
    parsed = messages(EVENTS)
    assert [m.value("event") for m in parsed] == [
        "Newchannel", "NewCallerid", "VarSet", "Newexten", "Newexten", "Hangup", "OriginateResponse"]
    assert messages(EVENTS_LF + b"\n") == parsed
    assert parsed[1].value("cid-callingpres") == "0 (Presentation Allowed, Not Screened)"
    assert parsed[0].value("accountcode") == ""


@given(st.integers(min_value=0, max_value=len(EVENTS)))
def test_split_anywhere(offset: int) -> None:
    """The stream split at any offset gives the same messages."""
    parser = AmiParser()
    data = BANNER + EVENTS
    assert parser.feed(data[:offset]) + parser.feed(data[offset:]) == messages(EVENTS)


def test_limits_and_banner() -> None:
    """No banner, or a message that never ends, is a protocol error, not unbounded memory."""
    with pytest.raises(AmiProtocolError):
        AmiParser().feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(AmiProtocolError):
        AmiParser().feed(BANNER + b"Event: X\r\nValue: " + b"9" * 70_000)


@given(st.binary(max_size=2000))
def test_garbage_never_crashes(data: bytes) -> None:
    """Any bytes after a banner give messages or a protocol error, nothing else."""
    with contextlib.suppress(AmiProtocolError):
        AmiParser().feed(BANNER + data)


def test_tracker_binds_callers_to_uuids() -> None:
    """Both the Dial(AudioSocket/…) and the AudioSocket() forms bind the caller to the right UUID."""
    tracker = CallTracker()
    captures = [capture for message in messages(EVENTS) for capture in tracker.feed(message)]
    assert [(c.uuid, c.number, c.name) for c in captures] == [
        (DIAL_UUID, "+593987654321", "Juan Perez"), (APP_UUID, "+593987654321", "Juan Perez")]
    assert captures[0].channel == "Local/s@avr-00000000;2" and captures[0].presentation.startswith("0 ")
    assert len(tracker) == 1  # Local/s@avr-00000000;2 hung up and was forgotten


def test_tracker_names_the_call_whose_channel_hangs_up() -> None:
    """The Hangup of the channel a call was captured on names that call (read before the tracker forgets
    the channel); a tracker that never saw the capture names none."""
    tracker = CallTracker()
    ended = []
    for message in messages(EVENTS):
        call = tracker.ended_call(message)
        if call is not None:
            ended.append((call, message.value("channel")))
        tracker.feed(message)
    assert ended == [(DIAL_UUID, "Local/s@avr-00000000;2")]
    hangups = [message for message in messages(EVENTS) if message.value("event") == "Hangup"]
    assert hangups and all(CallTracker().ended_call(message) is None for message in hangups)


def channel_event(event: str, channel: str, number: str, linkedid: str, **extra: str) -> bytes:
    fields = {"Event": event, "Privilege": "call,all", "Channel": channel, "CallerIDNum": number,
              "CallerIDName": "<unknown>", "ConnectedLineNum": "+593987654321", "ConnectedLineName": "Juan Perez",
              "Exten": extra.pop("Exten", "5551000"), "Uniqueid": extra.pop("Uniqueid", f"{linkedid}:{channel}"),
              "Linkedid": linkedid, **extra}
    return "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode() + b"\r\n"


def test_audiosocket_leg_is_never_the_caller() -> None:
    """On the AudioSocket channel CallerIDNum is the extension: the caller comes from the channel that dials it."""
    call = str(uuidlib.uuid4())
    stream = (
        channel_event("Newchannel", "PJSIP/tester-00000001", "+593987654321", "1795.1")
        + channel_event("Newchannel", f"AudioSocket/127.0.0.1:5001-{call}", "5551000", "1795.1")
        + channel_event("DialBegin", "PJSIP/tester-00000001", "+593987654321", "1795.1",
                        DestChannel=f"AudioSocket/127.0.0.1:5001-{call}")
    )
    tracker = CallTracker()
    captures = [c for m in messages(stream) for c in tracker.feed(m)]
    assert [(c.uuid, c.channel, c.number, c.called) for c in captures] == [
        (call, "PJSIP/tester-00000001", "+593987654321", "5551000")]


def test_audiosocket_leg_alone_captures_nothing() -> None:
    """The AudioSocket leg's events alone never make a capture: its connected line carries no presentation."""
    call = str(uuidlib.uuid4())
    tracker = CallTracker()
    stream = (channel_event("Newchannel", f"AudioSocket/127.0.0.1:5001-{call}", "s", "9.9")
              + channel_event("NewConnectedLine", f"AudioSocket/127.0.0.1:5001-{call}", "s", "9.9"))
    assert [c for m in messages(stream) for c in tracker.feed(m)] == []
    assert len(tracker) == 0


def test_caller_id_the_dialplan_blanks_is_captured_blank() -> None:
    """A number blanked after it was seen (NewCallerid `<unknown>`) is captured with no number at the step."""
    call, leg = str(uuidlib.uuid4()), "PJSIP/trunk-00000001"
    stream = (
        channel_event("Newchannel", leg, "+593987654321", "1795.1")
        + channel_event("NewCallerid", leg, "<unknown>", "1795.1", **{"CID-CallingPres": "0 (Presentation Allowed)"})
        + channel_event("Newexten", leg, "<unknown>", "1795.1", Application="Dial",
                        AppData=f"AudioSocket/127.0.0.1:5001/{call},120")
    )
    assert [(c.uuid, c.channel, c.number) for c in tracked([BANNER + stream])] == [(call, leg, "")]


def test_audiosocket_host_with_a_dash_is_recognised() -> None:
    """Call events only: a DialBegin to `AudioSocket/avr-core:5001-<uuid>` (a dash in the host) is the step."""
    call = str(uuidlib.uuid4())
    socket_leg = f"AudioSocket/avr-core:5001-{call}"
    stream = (
        channel_event("Newchannel", "PJSIP/tester-00000001", "+593987654321", "1795.1")
        + channel_event("Newchannel", socket_leg, "5551000", "1795.1")
        + channel_event("DialBegin", "PJSIP/tester-00000001", "+593987654321", "1795.1", DestChannel=socket_leg)
        + channel_event("DialEnd", "PJSIP/tester-00000001", "+593987654321", "1795.1", DestChannel=socket_leg)
    )
    assert b"Privilege: dialplan" not in stream
    assert [(c.uuid, c.channel, c.number) for c in tracked([BANNER + stream])] == [
        (call, "PJSIP/tester-00000001", "+593987654321")]


def test_called_number_is_the_first_channels_extension() -> None:
    """SIP into Dial(Local/7000@…) whose ;2 half runs the step: the number dialled is the SIP channel's 5551000."""
    call, linkedid = str(uuidlib.uuid4()), "1795.1"
    half = "Local/7000@avr-00000000;2"
    stream = (
        channel_event("Newchannel", "PJSIP/trunk-00000001", "+593987654321", linkedid, Exten="5551000")
        + channel_event("Newchannel", "Local/7000@avr-00000000;1", "+593987654321", linkedid, Exten="7000")
        + channel_event("Newchannel", half, "+593987654321", linkedid, Exten="7000")
        + channel_event("Newexten", half, "+593987654321", linkedid, Exten="7000", Application="Dial",
                        AppData=f"AudioSocket/127.0.0.1:5001/{call},120")
    )
    assert [(c.uuid, c.channel, c.called) for c in tracked([BANNER + stream])] == [(call, half, "5551000")]


def test_a_channel_name_seen_again_is_a_new_channel() -> None:
    """Asterisk restarted under a connection that did not notice, or a Hangup was missed: a new channel
    with an old name (and a new Uniqueid) starts empty, never with the old call's dialled number."""
    first, second, leg = str(uuidlib.uuid4()), str(uuidlib.uuid4()), "PJSIP/trunk-00000000"
    stream = (
        channel_event("Newchannel", leg, "+593987654321", "1.1", Uniqueid="1.1", Exten="5551000")
        + channel_event("Newexten", leg, "+593987654321", "1.1", Uniqueid="1.1", Application="AudioSocket",
                        AppData=f"{first},avr-core:5001")
        + channel_event("Newchannel", leg, "<unknown>", "2.1", Uniqueid="2.1", Exten="s")
        + channel_event("Newexten", leg, "<unknown>", "2.1", Uniqueid="2.1", Exten="s", Application="AudioSocket",
                        AppData=f"{second},avr-core:5001")
    )
    assert [(c.uuid, c.number, c.called, c.uniqueid) for c in tracked([BANNER + stream])] == [
        (first, "+593987654321", "5551000", "1.1"), (second, "", "", "2.1")]


def test_a_renamed_channel_keeps_its_caller() -> None:
    """A Rename keeps the Uniqueid: the channel's later events under its new name are the same channel."""
    call = str(uuidlib.uuid4())
    stream = (
        channel_event("Newchannel", "PJSIP/trunk-00000001", "+593987654321", "1.1", Uniqueid="1.1")
        + channel_event("Newexten", "PJSIP/trunk-00000001<MASQ>", "+593987654321", "1.1", Uniqueid="1.1",
                        Application="AudioSocket", AppData=f"{call},avr-core:5001")
    )
    assert [(c.channel, c.called) for c in tracked([BANNER + stream])] == [("PJSIP/trunk-00000001<MASQ>", "5551000")]


def test_tracker_memory_is_bounded() -> None:
    """Channels that never hang up cannot grow the tracker past its cap."""
    tracker = CallTracker(max_channels=100)
    for index in range(1000):
        for message in messages(channel_event("Newchannel", f"PJSIP/x-{index}", "1", f"{index}.0")):
            tracker.feed(message)
    assert len(tracker) == 100


def test_tracker_memory_is_bounded_when_linkedids_change() -> None:
    """A channel whose Linkedid keeps changing (bridges, transfers) leaves nothing behind for each old one."""
    tracker = CallTracker(max_channels=100)

    def event(index: int) -> AmiMessage:
        message = AmiMessage(event="NewConnectedLine", channel=f"PJSIP/x-{index % 50}", linkedid=f"{index}.0",
                             uniqueid=f"{index % 50}.1", calleridnum="+593987654321")
        return message

    for index in range(1000):  # warm up: every structure at its working size
        tracker.feed(event(index))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(1000, 101000):
            tracker.feed(event(index))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tracker) == 50 and grown < 256 * 1024, f"grew {grown} bytes over 100,000 Linkedid changes"


def tracked(chunks: list[bytes], tracker: CallTracker | None = None) -> list[AmiCapture]:
    """The captures a tracker makes of a stream that arrives in these chunks."""
    parser, tracker = AmiParser(), CallTracker() if tracker is None else tracker  # an empty tracker is falsy
    return [capture for chunk in chunks for message in parser.feed(chunk) for capture in tracker.feed(message)]


def block(data: bytes, marker: bytes) -> bytes:
    """The one whole event of a CRLF stream that holds `marker`, with its blank line."""
    assert data.count(marker) == 1
    at = data.index(marker)
    return data[data.rindex(b"\r\n\r\n", 0, at) + 4:data.index(b"\r\n\r\n", at) + 4]


def test_withheld_local_call_is_captured_once_from_the_half_that_dials() -> None:
    """Real Asterisk 22: one capture, from the ;2 half that ran the AudioSocket step; Getvar prohib withholds it."""
    captures = tracked([WITHHELD])
    assert [(c.uuid, c.channel, c.number, c.name, c.called) for c in captures] == [
        (WITHHELD_UUID, WITHHELD_LEG, "+593987654321", "Juan Perez", "5551000")]
    caller = record_from_capture(captures[0], "prohib_not_screened", "EC").caller
    assert caller.presentation == "withheld" and caller.raw is None and caller.e164 is None
    assert caller.caller_number("e164") == "anonymous"
    assert record_from_capture(captures[0], "prohib", "EC").called_number == "5551000"


def test_withheld_local_call_byte_by_byte() -> None:
    """Fed one byte at a time, the withheld call gives the same one capture, for the ;2 half."""
    captures = tracked([WITHHELD[index:index + 1] for index in range(len(WITHHELD))])
    assert captures == tracked([WITHHELD]) and [(c.uuid, c.channel) for c in captures] == [
        (WITHHELD_UUID, WITHHELD_LEG)]


@given(st.lists(st.integers(min_value=0, max_value=len(WITHHELD)), max_size=12))
def test_withheld_local_call_split_anywhere(offsets: list[int]) -> None:
    """Split at any offsets, the withheld call gives one capture, for the ;2 half, never the ;1 half."""
    cuts = [0, *sorted(offsets), len(WITHHELD)]
    captures = tracked([WITHHELD[start:end] for start, end in zip(cuts, cuts[1:], strict=False)])
    assert [(c.uuid, c.channel) for c in captures] == [(WITHHELD_UUID, WITHHELD_LEG)]


def test_withheld_local_call_seen_with_call_events_only() -> None:
    """A manager user without dialplan events still captures the ;2 half (at its DialBegin), never the ;1 half."""
    _, *events = WITHHELD.split(b"\r\n", 1)[1].split(b"\r\n\r\n")
    call_only = b"\r\n\r\n".join(event for event in events if b"Privilege: dialplan" not in event)
    assert b"Event: Newexten" not in call_only and b"Event: DialBegin" in call_only
    captures = tracked([WITHHELD.split(b"\r\n", 1)[0] + b"\r\n" + call_only])
    assert [(c.uuid, c.channel) for c in captures] == [(WITHHELD_UUID, WITHHELD_LEG)]


def test_varset_of_the_uuid_only_binds() -> None:
    """The UUID's VarSet only binds: the capture waits for the AudioSocket step and has the caller as it is then."""
    step = block(WITHHELD, b"AppData: AudioSocket/127.0.0.1:25099/")
    before_step, rest = WITHHELD[:WITHHELD.index(step)], WITHHELD[WITHHELD.index(step):]
    assert b"Variable: UUID\r\nValue: " + WITHHELD_UUID.encode() in before_step
    assert tracked([before_step]) == []
    # Set(CALLERID(num)=…) after the Gosub: a NewCallerid, and every later event shows the new number.
    later = step.replace(b"Event: Newexten", b"Event: NewCallerid") + rest
    captures = tracked([before_step, later.replace(b"CallerIDNum: +593987654321", b"CallerIDNum: +34612345678")])
    assert [(c.uuid, c.channel, c.number) for c in captures] == [(WITHHELD_UUID, WITHHELD_LEG, "+34612345678")]


def test_audiosocket_leg_takes_the_caller_from_the_channel_that_owns_the_uuid() -> None:
    """Newexten filtered out: the AudioSocket channel is the step; the caller is the ;2 half that set the UUID."""
    tracker = CallTracker()
    captures = [capture for message in AmiParser().feed(WITHHELD) if message.value("event") != "Newexten"
                for capture in tracker.feed(message)]
    assert [(c.uuid, c.channel, c.number, c.called) for c in captures] == [
        (WITHHELD_UUID, WITHHELD_LEG, "+593987654321", "5551000")]


def test_nothing_after_the_step_captures_the_call_again() -> None:
    """A caller-ID change after the step, the step's events again, even after the Hangups: no second capture."""
    tracker = CallTracker()
    step = block(WITHHELD, b"AppData: AudioSocket/127.0.0.1:25099/")
    dial = block(WITHHELD, b"Event: DialBegin\r\nPrivilege: call,all\r\nChannel: " + WITHHELD_LEG.encode())
    socket_leg = block(WITHHELD, b"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: AudioSocket/")
    changed = step.replace(b"Event: Newexten", b"Event: NewCallerid").replace(
        b"CallerIDNum: +593987654321", b"CallerIDNum: +34612345678")
    hangups = WITHHELD.index(b"Event: Hangup\r\nPrivilege: call,all\r\nChannel: " + WITHHELD_LEG.encode())
    before_hangups, after_hangups = WITHHELD[:hangups], WITHHELD[hangups:]
    assert len(tracked([before_hangups], tracker)) == 1
    parser = AmiParser()
    parser.feed(b"Asterisk Call Manager/11.0.0\r\n")
    again = [capture for chunk in (changed, step, dial, socket_leg, after_hangups, step, dial, socket_leg)
             for message in parser.feed(chunk) for capture in tracker.feed(message)]
    assert again == []


@pytest.mark.parametrize(("escaped", "name"), [(rb"O\'Neil", "O'Neil"), (rb"Ana \"La\" Paez", 'Ana "La" Paez'),
                                               (rb"C:\\temp", "C:\\temp")])
def test_c_escaped_names_are_unescaped(escaped: bytes, name: str) -> None:
    """AMI escapes a caller name C-style in channel events; the capture has the name the channel holds."""
    stream = WITHHELD.replace(b"CallerIDName: Juan Perez", b"CallerIDName: " + escaped)
    captures = tracked([stream])
    assert [c.name for c in captures] == [name]
    assert record_from_capture(captures[0], "allowed_not_screened", "EC").caller.name == name


def test_presentation_that_could_not_be_asked_is_withheld() -> None:
    """No Getvar answer (None): the number is kept back, not forwarded on an allowed event's word."""
    capture = tracked([WITHHELD])[0]
    assert capture.presentation.startswith("0 ")  # the events say allowed: only the Getvar could tell
    caller = record_from_capture(capture, None, "EC").caller
    assert caller.presentation == "withheld" and caller.raw is None and caller.caller_number("e164") == "anonymous"
    assert record_from_capture(capture, "allowed_not_screened", "EC").caller.e164 == "+593987654321"


def test_ami_url() -> None:
    """The URL gives host, port (5038 by default) and URL-decoded credentials."""
    endpoint = parse_ami_url("ami://avr:p%40ss@pbx")
    assert (endpoint.host, endpoint.port, endpoint.username, endpoint.secret) == ("pbx", 5038, "avr", "p@ss")
    with pytest.raises(ValueError):
        parse_ami_url("http://pbx:5038")


@dataclass
class FakeManager:
    """A local Asterisk manager: banner, login, then the given event bytes; answers Getvar."""

    scripts: list[bytes]
    num_pres: str = "allowed_not_screened"
    getvar_error: bool = False  # answer Getvar as Asterisk does for a channel that is gone
    accept_login: bool = True
    logins: int = 0
    getvars: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)  # other channel variables' values
    asked: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        script = self.scripts[min(self.logins, len(self.scripts) - 1)]
        self.logins += 1
        try:
            while data := await reader.read(4096):
                for action in _actions(data):
                    if action.get("action") == "Login":
                        ok = self.accept_login
                        writer.write(b"Response: %s\r\nActionID: login\r\nMessage: %s\r\n\r\n" % (
                            b"Success" if ok else b"Error",
                            b"Authentication accepted" if ok else b"Authentication failed"))
                        if not ok:
                            writer.close()
                            return
                        writer.write(script)
                        if script.endswith(b"CUT"):
                            writer.close()
                            return
                    elif action.get("action") == "Getvar" and "channel" not in action:  # a global, as the probe
                        writer.write(f"Response: Success\r\nActionID: {action['actionid']}\r\n"
                                     f"Variable: {action['variable']}\r\nValue: \r\n\r\n".encode())
                    elif action.get("action") == "Getvar":
                        self.getvars.append(action["channel"])
                        if self.getvar_error:
                            writer.write(f"Response: Error\r\nActionID: {action['actionid']}\r\n"
                                         "Message: No such channel\r\n\r\n".encode())
                            continue
                        variable = action["variable"]
                        self.asked.append(variable)
                        value = self.num_pres if variable == "CALLERID(num-pres)" else self.variables.get(variable, "")
                        writer.write(f"Response: Success\r\nActionID: {action['actionid']}\r\n"
                                     f"Variable: {variable}\r\nValue: {value}\r\n\r\n".encode())
        except ConnectionError:
            pass
        finally:
            writer.close()


def _actions(data: bytes) -> list[dict[str, str]]:
    actions = []
    for block in data.split(b"\r\n\r\n"):
        fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
        if fields:
            actions.append({key.lower(): value for key, value in fields.items()})
    return actions


class Served(Protocol):
    """A fake peer: `handle` serves one connection; `port` is where it listens once started."""

    port: int

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...


ServedT = TypeVar("ServedT", bound=Served)


@contextlib.asynccontextmanager
async def fake_manager(manager: ServedT) -> AsyncIterator[ServedT]:
    """Serve `manager` on a loopback port of its own for the block."""
    server = await asyncio.start_server(manager.handle, "127.0.0.1", 0)
    manager.port = server.sockets[0].getsockname()[1]
    async with server:
        yield manager


async def caller_of(proxy_url: str, call: str) -> str:
    turns = await play_call(proxy_url, call, ["hola"])
    return turns[0].sentences[0]


async def test_listener_records_callers(tmp_path: Path) -> None:
    """Replaying the captured call, each UUID's turns carry the caller's number."""
    async with fake_manager(FakeManager([EVENTS])) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=3000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola +593987654321."
            assert await caller_of(proxy.url, APP_UUID) == "Hola +593987654321."
            ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
            assert b'"ami":"connected"' in b"".join(ready.chunks)
    assert api.received[0]["caller"]["source"] == "ami" and api.received[0]["caller_name"] == "Juan Perez"
    assert "Local/s@avr-00000000;2" in manager.getvars


async def test_presentation_only_change_is_honoured(tmp_path: Path) -> None:
    """No event says the number became prohib; the listener's Getvar finds out and withholds it."""
    async with fake_manager(FakeManager([EVENTS], num_pres="prohib")) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=3000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola anonymous."
    assert api.received[0]["caller"]["raw"] is None


async def test_getvar_error_withholds_the_number(tmp_path: Path) -> None:
    """The manager answers the presentation Getvar with an error: the call is withheld, not forwarded as allowed."""
    async with fake_manager(FakeManager([EVENTS], getvar_error=True)) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=3000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola anonymous."
    assert "Local/s@avr-00000000;2" in manager.getvars
    assert api.received[0]["caller_number"] == "anonymous" and api.received[0]["caller"]["raw"] is None
    assert "593987654321" not in orjson.dumps(api.received[0]).decode()


SIGNED = {"STIR_SHAKEN(count)": "1", "PJSIP_HEADER(read,Identity)": "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"}


@pytest.mark.parametrize(("variables", "expected"), [
    ({"PJSIP_HEADER(read,P-Asserted-Identity)": "<sip:+593987654321@carrier;verstat=TN-Validation-Passed>"},
     ("TN-Validation-Passed", None, True)),
    ({"PJSIP_HEADER(read,From)": "<sip:+593987654321@carrier;verstat=TN-Validation-Failed>"},
     ("TN-Validation-Failed", None, False)),
    ({**SIGNED, "STIR_SHAKEN(0,attestation)": "A", "STIR_SHAKEN(0,verify_result)": "success"}, (None, "A", True)),
    ({**SIGNED, "STIR_SHAKEN(0,attestation)": "", "STIR_SHAKEN(0,verify_result)": "would crash"},
     (None, None, False)),
    ({"STIR_SHAKEN(count)": "1", "STIR_SHAKEN(0,verify_result)": "missing_identity_hdr"}, (None, None, None)),
    ({"STIR_SHAKEN(count)": "0", "STIR_SHAKEN(0,attestation)": "A", "STIR_SHAKEN(0,verify_result)": "success"},
     (None, None, None)),
], ids=["pai_passed", "from_failed", "stir_passed", "stir_failed", "no_identity", "stir_none"])
async def test_pjsip_channel_assertion_is_read(tmp_path: Path, variables: dict[str, str],
                                               expected: tuple[object, ...]) -> None:
    """On a PJSIP channel the listener asks for the headers and the STIR/SHAKEN result, and the turns
    carry them; the result is asked only when there is one."""
    events = EVENTS.replace(b"Local/s@avr-00000000;2", b"PJSIP/carrier-00000007")
    async with fake_manager(FakeManager([events], variables=variables)) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=3000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola +593987654321."
    caller = api.received[0]["caller"]
    assert (caller["verstat"], caller["attestation"], caller["verified"]) == expected
    # verify_result only after an attestation: reading it after a failed x5u check crashes Asterisk 22.10.
    assert ("STIR_SHAKEN(0,verify_result)" in manager.asked) == bool(variables.get("STIR_SHAKEN(0,attestation)")
                                                                     and "PJSIP_HEADER(read,Identity)" in variables
                                                                     and variables["STIR_SHAKEN(count)"] == "1")
    assert "PJSIP_HEADER(read,From)" in manager.asked


async def test_hangup_of_the_captured_channel_ends_the_call(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """Replaying the real capture: the channel DIAL_UUID was captured on hangs up in it, so that call is
    ended (no avr-core call_ended needed) and the log says by whom; APP_UUID's channel never hangs up
    there, so it stays live."""
    async with fake_manager(FakeManager([EVENTS])) as manager:
        settings = make_settings(tmp_path, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}")
        async with running_proxy(settings) as proxy:

            async def statuses() -> dict[str, str]:
                reply = await http_request(f"{proxy.url}/debug", b"", method="GET")
                return {call["uuid"]: call["status"] for call in orjson.loads(b"".join(reply.chunks))["calls"]}

            for _ in range(300):
                if (await statuses()).get(DIAL_UUID) == "ended":
                    break
                await asyncio.sleep(0.01)
            assert await statuses() == {DIAL_UUID: "ended", APP_UUID: "live"}
    ended = [line for line in map(orjson.loads, logs()) if line["event"] == "call_event"]
    assert [(line["uuid"], line["type"], line["by"]) for line in ended] == [(DIAL_UUID, "call_ended", "ami")]


async def test_other_channels_are_not_asked_for_headers(tmp_path: Path) -> None:
    """A Local channel has no SIP headers: only the presentation is asked."""
    async with fake_manager(FakeManager([EVENTS])) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=3000)
        async with running_proxy(settings) as proxy:
            await caller_of(proxy.url, DIAL_UUID)
    assert set(manager.asked) == {"CALLERID(num-pres)"}
    assert api.received[0]["caller"]["verified"] is None


def captured_lines(lines: list[str]) -> dict[str, dict[str, str]]:
    """The `caller_captured` log lines by call UUID."""
    return {line["uuid"]: line for line in map(orjson.loads, lines) if line["event"] == "caller_captured"}


async def test_capture_log_shows_the_caller_as_stored(logs) -> None:  # type: ignore[no-untyped-def]
    """A call an earlier capture withheld is logged withheld by the AMI capture too, though its Getvar says
    allowed: no masked number of it in the log."""
    registry = CallRegistry(MemoryStore(), 3600)
    await registry.put(CallRecord(uuid=DIAL_UUID, caller=parse_caller("+593987654321", "Juan Perez", "prohib",
                                                                       source="agi")))
    async with fake_manager(FakeManager([EVENTS])) as manager:
        listener = AmiListener(registry, f"ami://avr:secret@127.0.0.1:{manager.port}", "EC")
        listener.start()
        try:
            await wait_for(lambda: len(captured_lines(logs())) == 2)
        finally:
            await listener.close()
    lines = captured_lines(logs())
    assert lines[APP_UUID]["presentation"] == "allowed" and lines[APP_UUID]["caller_number"].endswith("4321")
    assert lines[DIAL_UUID]["presentation"] == "withheld" and lines[DIAL_UUID]["caller_number"] == "anonymous"
    assert "4321" not in orjson.dumps(lines[DIAL_UUID]).decode()
    assert "Local/s@avr-00000000;2" in manager.getvars


async def test_reconnect_starts_with_an_empty_tracker(tmp_path: Path) -> None:
    """After a reconnect a channel name seen before (Asterisk restarted) does not bring back its old caller."""
    leg, call = "Local/s@avr-00000000;2", str(uuidlib.uuid4())
    before = channel_event("Newchannel", leg, "+593987654321", "1795.1") + b"CUT"
    after = (channel_event("Newchannel", leg, "<unknown>", "1.1", ConnectedLineNum="<unknown>")
             + channel_event("Newexten", leg, "<unknown>", "1.1", ConnectedLineNum="<unknown>", Application="Dial",
                             AppData=f"AudioSocket/127.0.0.1:5001/{call},120"))
    async with fake_manager(FakeManager([before, after])) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=5000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, call) == "Hola unknown."
    assert manager.logins == 2 and manager.getvars == [leg]


async def test_reconnect_mid_call_fails_closed_then_resumes(tmp_path: Path) -> None:
    """The stream cut before a capture's presentation was answered: that call is withheld (unknown presentation
    fails closed), and after the reconnect the next call gets its caller."""
    second_call = EVENTS.index(b"Event: Newexten\r\nPrivilege: dialplan,all\r\nChannel: Local/app")
    first, rest = EVENTS[:second_call + 40] + b"CUT", EVENTS[second_call:]
    app_leg = EVENTS[EVENTS.index(b"Event: NewCallerid"):EVENTS.index(b"Event: VarSet")].replace(
        b"Local/s@avr-00000000;2", b"Local/app@avr-0000000a;2")
    async with fake_manager(FakeManager([first, app_leg + rest])) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=5000)
        async with running_proxy(settings) as proxy:
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola anonymous."
            await wait_for(lambda: manager.logins >= 2)
            assert await caller_of(proxy.url, APP_UUID) == "Hola +593987654321."
            assert await caller_of(proxy.url, DIAL_UUID) == "Hola anonymous."


HOSTILE = [b"$(reboot); `id`", b"+593987654321;rm -rf /", b"\xff\xfe\x00\x01", b"9" * 4096,
           b"+593987654321\r\nEvent: Fake"]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_caller_ids(tmp_path: Path, value: bytes) -> None:
    """Shell code, control bytes, non-UTF-8, 4 KB values and injected lines: sanitised or refused, never a crash."""
    stream = EVENTS.replace(b"CallerIDNum: +593987654321", b"CallerIDNum: " + value).replace(
        b"CallerIDName: Juan Perez", b"CallerIDName: " + value)
    async with fake_manager(FakeManager([stream])) as manager, running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, ami_url=f"ami://avr:secret@127.0.0.1:{manager.port}",
                                 caller_wait_ms=2000)
        async with running_proxy(settings) as proxy:
            turns = await play_call(proxy.url, DIAL_UUID, ["hola"])
            assert turns[0].problems == [] and turns[0].status == 200
    sent = api.received[0]["caller_number"]
    assert len(sent) <= 32 and not set(sent) & set("$`;|() \r\n")


async def test_login_refused_is_reported(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """A wrong secret leaves turns working, /readyz showing AMI disconnected, and a log line with the reason."""
    async with fake_manager(FakeManager([EVENTS], accept_login=False)) as manager:
        settings = make_settings(tmp_path, ami_url=f"ami://avr:wrong@127.0.0.1:{manager.port}")
        async with running_proxy(settings) as proxy:
            await wait_for(lambda: manager.logins >= 1)
            ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
            assert ready.status == 200 and b'"ami":"disconnected"' in b"".join(ready.chunks)
            turns = await play_call(proxy.url, str(uuidlib.uuid4()), ["hola"])
            assert turns[0].problems == []
    await wait_for(lambda: any("login refused" in line for line in logs()))


async def test_workers_share_one_ami_connection(tmp_path: Path) -> None:
    """`serve --workers 2`: one worker logs in to the manager, the other stands by; captures still work."""
    async with fake_manager(FakeManager([EVENTS])) as manager:
        port = closed_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avr_llm_proxy", "serve", "--port", str(port), "--workers", "2", cwd=tmp_path,
            env=clean_environ(AMI_URL=f"ami://avr:secret@127.0.0.1:{manager.port}", AGI_LISTEN="", CALLERID_DIR="",
                              CALLER_WAIT_MS="3000"),
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_for(lambda: manager.logins >= 1, 30)
            url = f"http://127.0.0.1:{port}"
            readiness: set[str] = set()

            async def ami_state() -> str:
                ready = await http_request(f"{url}/readyz", b"", method="GET")
                return str(orjson.loads(b"".join(ready.chunks))["ami"])

            # The manager counts the login before the worker has read its answer: until then that worker
            # says "disconnected". Once one says "connected", both answer (the kernel picks which).
            for _ in range(200):
                if await ami_state() == "connected":
                    break
            for _ in range(200):
                readiness.add(await ami_state())
                if {"connected", "standby"} <= readiness:
                    break
            assert await caller_of(url, DIAL_UUID) == "Hola Juan, gracias por llamar."  # the demo API, by name
            await asyncio.sleep(3)  # longer than a standing-by worker's retry: it must still not log in
            assert manager.logins == 1
            assert "connected" in readiness and readiness <= {"connected", "standby"}
        finally:
            process.terminate()
            await process.wait()
