"""Play one call against a running proxy exactly as avr-core 1.4.1 would, and report what is heard.

The HTTP client here is deliberately raw (asyncio streams): it must see HTTP chunk boundaries as
avr-core does, since each chunk is JSON-parsed on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid as uuidlib
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import orjson

from .avr import FramingError, ReplyReader

SYSTEM_PROMPT = "You are an AI assistant. You must introduce yourself quickly and concisely."
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]


@dataclass
class HeardTurn:
    """One utterance and what the caller would hear back."""

    said: str
    status: int
    sentences: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)


async def http_request(
    url: str,
    body: bytes,
    content_type: str = "application/json",
    method: str = "POST",
    limit_s: float = 30.0,
    headers: dict[str, str] | None = None,
) -> HttpReply:
    """One HTTP/1.1 request on a fresh connection; the body comes back as the list of its HTTP chunks."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit_s)
    try:
        head = (
            f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
            f"Host: {_url_host(host)}:{port}\r\n"
            "Accept: application/json, text/plain, */*\r\nUser-Agent: axios/1.7.9\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            + "".join(f"{key}: {value}\r\n" for key, value in (headers or {}).items())
            + "\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        return await asyncio.wait_for(read_reply(reader), limit_s)
    finally:
        writer.close()
        await writer.wait_closed()


async def read_reply(reader: asyncio.StreamReader) -> HttpReply:
    """One response off a (possibly kept-alive) connection, its body as the list of HTTP chunks."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("response headers too large")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    chunks: list[bytes] = []
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    elif "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
        chunks = [data] if data else []
    else:
        data = await reader.read()
        chunks = [data] if data else []
    return HttpReply(status, headers, chunks)


def hear(reply: HttpReply, said: str) -> HeardTurn:
    """Apply avr-core's reading rules to one reply."""
    heard = HeardTurn(said=said, status=reply.status, chunks=reply.chunks)
    if not 200 <= reply.status < 300:
        heard.problems.append(f"HTTP {reply.status}: avr-core hangs up")
        return heard
    reader = ReplyReader()
    for number, chunk in enumerate(reply.chunks, 1):
        try:
            heard.sentences.extend(reader.chunk(chunk))
        except FramingError as exc:
            heard.problems.append(f"chunk {number}: {exc}")
            return heard
    heard.problems.extend(f"ignored chunk of type {kind!r}" for kind in reader.ignored)
    dropped = reader.end()
    if dropped:
        heard.problems.append(f"unterminated text dropped by avr-core: {dropped!r}")
    return heard


async def register_caller(
    base_url: str, call_uuid: str, number: str, name: str | None, called: str | None, way: str,
    token: str | None = None, presentation: str | None = None,
) -> HttpReply:
    """Record the caller like a dialplan would: our JSON, or the form `CURL()` posts.

    With `token` (the proxy's CAPTURE_TOKEN) the capture is accepted from any network, as /call requires
    of a client outside TRUSTED_NETWORKS.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if way == "form":
        fields = {"uuid": call_uuid, "num": number, "name": name or "", "dnid": called or "",
                  "pres": presentation or ""}
        body = "&".join(f"{key}={quote(value, safe='')}" for key, value in fields.items()).encode()
        return await http_request(f"{base_url}/call", body, "application/x-www-form-urlencoded", headers=headers)
    payload = {"uuid": call_uuid, "caller_number": number, "caller_name": name, "called_number": called,
               "presentation": presentation}
    return await http_request(f"{base_url}/call", orjson.dumps(payload), headers=headers)


async def play_call(base_url: str, call_uuid: str, utterances: list[str]) -> list[HeardTurn]:
    """Send each utterance as avr-core does, with the growing history, and collect what is heard."""
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    heard_turns = []
    for said in utterances:
        history.append({"role": "user", "content": said})
        body = orjson.dumps({"uuid": call_uuid, "message": said, "messages": history})
        heard = hear(await http_request(f"{base_url}/prompt-stream", body), said)
        history.extend({"role": "assistant", "content": sentence} for sentence in heard.sentences)
        heard_turns.append(heard)
    return heard_turns


def proxy_url(host: str, port: int) -> str:
    """The URL a client uses to reach a proxy that `serve` bound to HOST:PORT.

    A wildcard bind address (0.0.0.0, ::, or empty) accepts on every interface but cannot be connected
    to portably, so the client goes to the loopback address of the same family.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host or '127.0.0.1'}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://{_url_host(str(address))}:{port}"


def _url_host(host: str) -> str:
    """A host as it is written in a URL or Host header: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def new_call_uuid() -> str:
    return str(uuidlib.uuid4())
