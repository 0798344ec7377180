"""Call control over real sockets: an answer's action reaches a manager on a real TCP port as the exact
AMI actions, after the message; everything refused leaves the manager untouched and the message spoken."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from avr_llm_proxy.simulate import http_request, play_call

from ..capture.test_ami import fake_manager
from ..conftest import FakeApi, clean_environ, make_settings, running_api, running_proxy, wait_for
from .test_upstream_conditions import streamed

CHANNEL = "PJSIP/carrier-00000007"
NUMBER = "+593987654321"
BANNER = b"Asterisk Call Manager/9.0.0\r\n"


@dataclass
class FakeManager:
    """A manager on a real port: logs every action of every connection, answers Success, or Error where told."""

    errors: dict[str, str] = field(default_factory=dict)  # action name -> the Message of its Error
    connections: list[list[bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        actions: list[bytes] = []
        self.connections.append(actions)
        writer.write(BANNER)
        buffer = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    actions.append(block + b"\r\n\r\n")
                    fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
                    error = self.errors.get(fields.get("Action", ""))
                    answer = f"Response: Error\r\nMessage: {error}" if error else "Response: Success"
                    writer.write(f"{answer}\r\nActionID: {fields.get('ActionID', '')}\r\n\r\n".encode())
        writer.close()

    def control_actions(self) -> list[bytes]:
        """The actions sent on the call-control connection (the one that logs in with events off)."""
        return [action for actions in self.connections if actions and b"Events: off" in actions[0]
                for action in actions[1:]]


def answering(body: dict[str, Any]) -> Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]:
    async def custom(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(body)
    return custom


async def capture(url: str, call: str, channel: str | None = CHANNEL, number: str = NUMBER,
                  presentation: str = "allowed") -> None:
    body = {"uuid": call, "caller_number": number, "presentation": presentation}
    if channel is not None:
        body["channel"] = channel
    assert (await http_request(f"{url}/call", orjson.dumps(body))).status == 200


def settings_for(tmp_path: Path, api: FakeApi, manager: FakeManager | None, **extra: Any) -> Any:
    ami = {"ami_url": f"ami://proxy:secret@127.0.0.1:{manager.port}"} if manager else {}
    return make_settings(tmp_path, **{"api_url": api.url, "transfer_allow": "1001,_2XXX", "action_delay_ms": 50,
                                       **ami, **extra})


def lines(logs: Callable[[], list[str]], event: str) -> list[dict[str, Any]]:
    return [parsed for parsed in map(orjson.loads, logs()) if parsed["event"] == event]


def setvar(action_id: int, variable: str, value: str) -> bytes:
    return (f"Action: Setvar\r\nActionID: act-{action_id}\r\nChannel: {CHANNEL}\r\nVariable: {variable}\r\n"
            f"Value: {value}\r\n\r\n").encode()


async def test_transfer_sends_the_exact_actions_after_the_message(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """Login with events off, three Setvars, then the Redirect to TRANSFER_CONTEXT, extension `to`,
    priority 1; the caller heard the message first; the outcome is in the log, metrics and EVENTS_URL."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api, running_api() as events:
        api.custom = answering({"message": "Le paso con un asesor.",
                                "action": {"type": "transfer", "to": "1001", "reason": "billing"}})
        settings = settings_for(tmp_path, api, manager, events_url=events.url)
        async with running_proxy(settings) as proxy:
            await capture(proxy.url, call)
            heard = await play_call(proxy.url, call, ["quiero hablar con alguien"])
            assert heard[0].sentences == ["Le paso con un asesor."]
            await wait_for(lambda: len(manager.control_actions()) == 4)
            await wait_for(lambda: bool(lines(logs, "action_sent")))
            metrics = b"".join((await http_request(f"{proxy.url}/metrics", b"", method="GET")).chunks).decode()
            await wait_for(lambda: any(e["type"] == "call_transferred" for e in events.received))
            debug = orjson.loads(b"".join((await http_request(f"{proxy.url}/debug", b"", method="GET")).chunks))
    assert debug["calls"][0]["uuid"] == call and debug["calls"][0]["action"] == "transfer 1001: sent"
    login = next(actions[0] for actions in manager.connections if b"Events: off" in actions[0])
    assert login == b"Action: Login\r\nActionID: act-1\r\nUsername: proxy\r\nSecret: secret\r\nEvents: off\r\n\r\n"
    assert manager.control_actions() == [
        setvar(2, "AVR_CONVERSATION_ID", call),
        setvar(3, "AVR_CALLER_NUMBER", NUMBER),
        setvar(4, "AVR_TRANSFER_REASON", "billing"),
        f"Action: Redirect\r\nActionID: act-5\r\nChannel: {CHANNEL}\r\nContext: avr-transfer\r\nExten: 1001\r\n"
        "Priority: 1\r\n\r\n".encode(),
    ]
    listing = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "calls"],
                                      env=clean_environ(STORE_URL=settings.store_url), capture_output=True,
                                      text=True, timeout=60, cwd=tmp_path)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(call))
    assert row.endswith("transfer 1001: sent"), listing.stdout + listing.stderr
    sent = lines(logs, "action_sent")[0]
    assert (sent["uuid"], sent["type"], sent["to"], sent["outcome"]) == (call, "transfer", "1001", "sent")
    assert 'avr_llm_proxy_actions_total{outcome="sent",type="transfer"} 1.0' in metrics
    announced = next(e for e in events.received if e["type"] == "call_transferred")
    assert announced["uuid"] == call and announced["payload"]["action"]["to"] == "1001"
    assert announced["caller_number"] == NUMBER


async def test_hangup_from_a_streamed_answer(tmp_path: Path) -> None:
    """An NDJSON answer may send the action as a line of its own: the call is hung up after the message."""
    call = str(uuidlib.uuid4())
    body = b'{"message": "Gracias por llamar."}\n{"action": {"type": "hangup"}}\n{"message": " Adios."}\n'
    async with fake_manager(FakeManager()) as manager, running_api("raw") as api:
        api.answer = (200, {"Content-Type": "application/x-ndjson"}, body)
        async with running_proxy(settings_for(tmp_path, api, manager)) as proxy:
            await capture(proxy.url, call)
            heard = await play_call(proxy.url, call, ["eso es todo"])
            assert heard[0].sentences == ["Gracias por llamar.", "Adios."]
            await wait_for(lambda: len(manager.control_actions()) == 1)
    assert manager.control_actions() == [f"Action: Hangup\r\nActionID: act-2\r\nChannel: {CHANNEL}\r\n\r\n".encode()]


async def test_action_alone_is_carried_out_in_silence(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """An answer that is only an action: nothing is said (no fallback apology), the call is hung up, and
    EVENTS_URL hears call_hung_up."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api, running_api() as events:
        api.custom = answering({"action": {"type": "hangup", "reason": "silence"}})
        async with running_proxy(settings_for(tmp_path, api, manager, events_url=events.url)) as proxy:
            await capture(proxy.url, call)
            heard = await play_call(proxy.url, call, ["..."])
            await wait_for(lambda: any(e["type"] == "call_hung_up" for e in events.received))
    assert heard[0].sentences == [] and not heard[0].problems
    assert manager.control_actions() == [f"Action: Hangup\r\nActionID: act-2\r\nChannel: {CHANNEL}\r\n\r\n".encode()]
    assert not lines(logs, "upstream_failed")


async def test_withheld_caller_number_is_never_set(tmp_path: Path) -> None:
    """AVR_CALLER_NUMBER is empty for a withheld caller: the number never reaches the channel's variables."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = answering({"message": "Le paso.", "action": {"type": "transfer", "to": "2001"}})
        async with running_proxy(settings_for(tmp_path, api, manager)) as proxy:
            await capture(proxy.url, call, presentation="prohib")
            await play_call(proxy.url, call, ["hola"])
            await wait_for(lambda: len(manager.control_actions()) == 4)
    sent = b"".join(manager.control_actions())
    assert setvar(3, "AVR_CALLER_NUMBER", "") in manager.control_actions()
    assert b"593987654321" not in sent and b"Exten: 2001" in sent


REFUSED = [
    ({"type": "transfer", "to": "3001"}, "destination_not_allowed"),
    ({"type": "transfer", "to": "1001\r\nAction: Originate"}, "invalid_destination"),
    ({"type": "transfer", "to": "1001,1"}, "invalid_destination"),
    ({"type": "transfer", "to": "1001\n"}, "invalid_destination"),
    ({"type": "transfer", "to": "PJSIP/1001"}, "invalid_destination"),
    ({"type": "transfer"}, "invalid_destination"),
    ({"type": "park"}, "unknown_type"),
    ("hangup", "not_an_object"),
]


@pytest.mark.parametrize(("action", "reason"), REFUSED, ids=[reason + str(i) for i, (_, reason) in enumerate(REFUSED)])
async def test_refused_actions_touch_nothing(tmp_path: Path, logs, action: Any, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A refused action: the message is still spoken, one action_refused line, nothing sent to the manager."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = answering({"message": "Un momento.", "action": action})
        async with running_proxy(settings_for(tmp_path, api, manager)) as proxy:
            await capture(proxy.url, call)
            heard = await play_call(proxy.url, call, ["hola"])
            await wait_for(lambda: bool(lines(logs, "action_refused")))
    assert heard[0].sentences == ["Un momento."]
    refused = lines(logs, "action_refused")
    assert [(line["uuid"], line["reason"]) for line in refused] == [(call, reason)]
    assert manager.control_actions() == []


async def test_one_action_per_call(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """A second transfer while the first is pending is refused; only one Redirect is sent."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = answering({"message": "Le paso.", "action": {"type": "transfer", "to": "1001"}})
        async with running_proxy(settings_for(tmp_path, api, manager, action_delay_ms=400)) as proxy:
            await capture(proxy.url, call)
            await play_call(proxy.url, call, ["uno", "dos"])
            await wait_for(lambda: bool(lines(logs, "action_sent")))
    assert [line["reason"] for line in lines(logs, "action_refused")] == ["one_action_per_call"]
    assert sum(b"Action: Redirect" in action for action in manager.control_actions()) == 1


async def test_ended_call_is_not_acted_on(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """The caller hung up while the message was being said: nothing is sent."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = answering({"message": "Adios.", "action": {"type": "hangup"}})
        async with running_proxy(settings_for(tmp_path, api, manager, action_delay_ms=500)) as proxy:
            await capture(proxy.url, call)
            await play_call(proxy.url, call, ["adios"])
            ended = orjson.dumps({"uuid": call, "type": "call_ended", "timestamp": "", "payload": {}})
            assert (await http_request(f"{proxy.url}/events", ended)).status == 200
            await wait_for(lambda: bool(lines(logs, "action_refused")))
    assert lines(logs, "action_refused")[0]["reason"] == "call_ended"
    assert manager.control_actions() == []


async def test_failed_redirect_is_logged_not_retried(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """The channel is gone when the Redirect arrives: the manager's message is logged, once."""
    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager(errors={"Redirect": "Channel does not exist"})) as manager, \
            running_api() as api:
        api.custom = answering({"message": "Le paso.", "action": {"type": "transfer", "to": "1001"}})
        async with running_proxy(settings_for(tmp_path, api, manager)) as proxy:
            await capture(proxy.url, call)
            await play_call(proxy.url, call, ["hola"])
            await wait_for(lambda: bool(lines(logs, "action_failed")))
            await asyncio.sleep(0.3)
    failed = lines(logs, "action_failed")
    assert [line["outcome"] for line in failed] == ["failed: Channel does not exist"]
    assert sum(b"Action: Redirect" in action for action in manager.control_actions()) == 1


async def test_no_channel_and_no_ami(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """Without the caller's channel, or without AMI_URL, nothing is sent and the line says why; start-up
    warns once when call control is configured without AMI_URL."""
    first, second = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = answering({"message": "Adios.", "action": {"type": "hangup"}})
        async with running_proxy(settings_for(tmp_path, api, manager)) as proxy:
            await capture(proxy.url, first, channel=None)
            await play_call(proxy.url, first, ["adios"])
            await wait_for(lambda: bool(lines(logs, "action_refused")))
        async with running_proxy(settings_for(tmp_path, api, None)) as proxy:
            await capture(proxy.url, second)
            await play_call(proxy.url, second, ["adios"])
            await wait_for(lambda: len(lines(logs, "action_refused")) == 2)
    assert [(line["uuid"], line["reason"]) for line in lines(logs, "action_refused")] == [
        (first, "no_channel"), (second, "no_ami_url")]
    assert len(lines(logs, "call_control_off")) == 1
    assert manager.control_actions() == []


TOOL_STREAM = [
    b'data: {"choices":[{"delta":{"role":"assistant","content":"Le paso con ventas."}}]}\n\n',
    b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    b'"function":{"name":"transfer_call","arguments":""}}]}}]}\n\n',
    b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"to\\": \\"10"}}]}}]}\n\n',
    b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"01\\", \\"reason\\": '
    b'\\"ventas\\"}"}}]}}]}\n\n',
    b'data: {"choices":[{"delta":{},"finish_reason":"tool_calls"}]}\n\n',
    b"data: [DONE]\n\n",
]


@pytest.mark.parametrize("control", ["on", "off"])
async def test_openai_tools(tmp_path: Path, control: str) -> None:
    """CALL_CONTROL=on offers transfer_call and end_call; a streamed tool call, its arguments in pieces,
    becomes the transfer, and the text before it is spoken. Off: no tools offered, none acted on."""
    async def chat(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        return await streamed(request, [(0.0, chunk) for chunk in TOOL_STREAM], "text/event-stream")

    call = str(uuidlib.uuid4())
    async with fake_manager(FakeManager()) as manager, running_api() as api:
        api.custom = chat
        settings = settings_for(tmp_path, api, manager, upstream="openai", call_control=control,
                                openai_base_url=api.url.split("/api/")[0] + "/v1")
        async with running_proxy(settings) as proxy:
            await capture(proxy.url, call)
            heard = await play_call(proxy.url, call, ["con ventas por favor"])
            if control == "on":
                await wait_for(lambda: len(manager.control_actions()) == 4)
            else:
                await asyncio.sleep(0.5)
    assert heard[0].sentences == ["Le paso con ventas."]
    offered = api.received[0].get("tools")
    if control == "off":
        assert offered is None and manager.control_actions() == []
        return
    assert [tool["function"]["name"] for tool in offered] == ["transfer_call", "end_call"]
    assert "extensions and patterns: 1001,_2XXX." in offered[0]["function"]["description"]
    sent = b"".join(manager.control_actions())
    assert b"Variable: AVR_TRANSFER_REASON\r\nValue: ventas\r\n" in sent and b"Exten: 1001\r\n" in sent
