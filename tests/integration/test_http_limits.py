"""The HTTP listener's read deadlines and connection limit, on real sockets against the served app.

READ_TIMEOUT_S is lowered for these tests; what is asserted is that late requests are answered 408
and closed, that idle kept-alive connections are not, and that the service goes on, never a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from avr_llm_proxy import http_protocol
from avr_llm_proxy.simulate import http_request, read_reply

from ..conftest import make_settings, running_api, running_proxy

READ_TIMEOUT_S = 0.5


@pytest.fixture(autouse=True)
def short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_protocol, "READ_TIMEOUT_S", READ_TIMEOUT_S)
    # Each test sees its own first refusal line.
    monkeypatch.setattr(http_protocol.BoundedHttpToolsProtocol, "refused_log", http_protocol.LogThrottle())


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes (a liveness bound far past the deadline)."""
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), 30)
    return b""


HALF_SENT = {
    "head": b"POST /call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
    "body": b"POST /call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"uuid\"",
}


@pytest.mark.parametrize("phase", sorted(HALF_SENT))
async def test_half_sent_request_is_answered_408_and_closed(
        tmp_path: Path, phase: str, logs: Callable[[], list[str]]) -> None:
    """A head or a body that stops arriving: 408, a closed connection, one log line; the service goes on."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
        writer.write(HALF_SENT[phase])
        await writer.drain()
        answer = await read_all(reader)
        writer.close()
        healthy = await http_request(f"{proxy.url}/healthz", b"", method="GET")
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b"request not received in time")
    assert healthy.status == 200
    refused = [line for line in logs() if '"request_refused"' in line]
    assert len(refused) == 1 and f'"{phase}_timeout"' in refused[0]
    assert not [line for line in logs() if '"error"' in line and "Traceback" in line]


async def test_silent_connection_is_closed_without_an_answer(tmp_path: Path) -> None:
    """A connection that never sends a byte is closed at the deadline, with nothing written to it."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
        answer = await read_all(reader)
        writer.close()
    assert answer == b"" and reader.at_eof()


async def test_kept_alive_connection_is_idle_under_keep_alive_and_timed_per_request(tmp_path: Path) -> None:
    """Between requests only the keep-alive timeout applies (avr-core reuses its connections); the next
    request's head is timed from its first byte."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    async with running_proxy(make_settings(tmp_path)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
        writer.write(request)
        assert (await asyncio.wait_for(read_reply(reader), 10)).status == 200
        await asyncio.sleep(READ_TIMEOUT_S * 4)  # idle, past the read deadline
        writer.write(request)
        assert (await asyncio.wait_for(read_reply(reader), 10)).status == 200
        writer.write(request[:20])
        answer = await read_all(reader)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_slow_but_complete_requests_are_answered(tmp_path: Path) -> None:
    """A request whose head and body each arrive within the deadline is served, in pieces included."""
    body = b'{"uuid": "../x"}'
    head = (b"POST /call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    async with running_proxy(make_settings(tmp_path)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
        for piece in (head[:10], head[10:], body[:5], body[5:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(READ_TIMEOUT_S / 4)
        reply = await asyncio.wait_for(read_reply(reader), 10)
        writer.close()
    assert reply.status == 400 and b"invalid_uuid" in b"".join(reply.chunks)


async def test_two_thousand_trickling_connections_are_all_closed(tmp_path: Path) -> None:
    """2,000 clients sending a byte of a head now and then (a slowloris) are all closed at the read
    deadline, and the service answers meanwhile and after."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        port = port_of(proxy.url)
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2000)]
        closed = 0

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal closed
            head = b"POST /prompt-stream HTTP/1.1\r\nHost: x\r\n" + b"X" * 10_000
            with contextlib.suppress(ConnectionError):
                for byte in head:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(4096), READ_TIMEOUT_S / 5) == b"":
                            break
            closed += 1
            writer.close()

        tasks = [asyncio.create_task(trickle(reader, writer)) for reader, writer in connections]
        healthy_during = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        async with asyncio.timeout(60):  # a liveness bound: the deadline is 0.5 s
            await asyncio.gather(*tasks)
        healthy_after = await http_request(f"{proxy.url}/healthz", b"", method="GET")
    assert closed == 2000
    assert healthy_during.status == 200 and healthy_after.status == 200


async def test_connections_past_the_limit_are_answered_503(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CONNECTIONS a request gets 503 at once instead of queueing; room comes back as
    connections close."""
    monkeypatch.setattr(http_protocol, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(http_protocol, "READ_TIMEOUT_S", 30.0)  # the held connections must stay
    async with running_proxy(make_settings(tmp_path)) as proxy:
        held = [await asyncio.open_connection("127.0.0.1", port_of(proxy.url)) for _ in range(4)]
        busy = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        for _, writer in held:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer in held))
        statuses = []
        async with asyncio.timeout(10):  # the server sees the closes on its next reads
            while not statuses or statuses[-1] != 200:
                statuses.append((await http_request(f"{proxy.url}/healthz", b"", method="GET")).status)
    assert busy.status == 503 and statuses[-1] == 200


async def slow_answer(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    await asyncio.sleep(READ_TIMEOUT_S * 3)
    return web.json_response({"message": "Hola, ya le atiendo."})


@pytest.mark.parametrize("behind", [b"GET /healthz HTTP/1.1\r\nHo", b"POST /call HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"u"],
                         ids=["half_head", "half_body"])
async def test_a_late_pipelined_request_is_timed_after_the_answer_before_it(tmp_path: Path, behind: bytes) -> None:
    """A turn whose answer takes longer than the read deadline, with half a request pipelined behind it:
    the turn is answered whole, and only then is the late request answered 408 and the connection closed."""
    body = orjson.dumps({"uuid": str(uuidlib.uuid4()), "message": "hola", "messages": [
        {"role": "user", "content": "hola"}]})
    async with running_api() as api:
        api.custom = slow_answer
        async with running_proxy(make_settings(tmp_path, api_url=api.url, caller_wait_ms=0)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
            writer.write(b"POST /prompt-stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s%s" % (len(body), body, behind))
            await writer.drain()
            answer = await read_all(reader)
            writer.close()
    first, _, rest = answer.partition(b"\r\n0\r\n\r\n")  # the end of the turn's chunked answer
    assert first.startswith(b"HTTP/1.1 200 ") and b"ya le atiendo" in first
    assert rest.startswith(b"HTTP/1.1 408 ") and b"HTTP/1.1 408" not in first
