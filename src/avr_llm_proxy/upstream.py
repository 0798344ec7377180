"""The business API client: the seed's payload out, reply text (or a typed failure) back.

One pooled aiohttp session for the process; every request has a deadline; nothing raises into a turn.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from .calls import CallRecord
from .identity import UNKNOWN_CALLER, CallerId, NumberFormat

MAX_REPLY_BYTES = 256 * 1024
_REPLY_KEYS = ("message", "text", "content", "response", "answer", "reply")


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    text: str
    status: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """Why the API gave us nothing to speak; `reason` is a short code for logs and metrics."""

    reason: str
    latency_ms: float
    status: int | None = None
    detail: str = ""


Answer = UpstreamReply | UpstreamFailure


class Upstream(Protocol):
    """Whatever answers a turn: the business API over HTTP, or the built-in demo."""

    name: str

    async def start(self) -> None: ...

    async def ask(self, payload: dict[str, Any]) -> Answer: ...

    async def close(self) -> None: ...


def build_payload(
    *, bot_phone: str, text: str, uuid: str, record: CallRecord | None, number_format: NumberFormat
) -> dict[str, Any]:
    """The seed's four keys, then the additive ones; a withheld caller carries no number anywhere."""
    caller: CallerId = record.caller if record else UNKNOWN_CALLER
    return {
        "phone": bot_phone,
        "text": text,
        "caller_number": caller.caller_number(number_format),
        "conversation_id": uuid,
        "caller_name": caller.name,
        "caller": {
            "e164": caller.e164,
            "raw": caller.raw,
            "national": caller.national,
            "presentation": caller.presentation,
            "valid": caller.valid,
            "type": caller.number_type,
            "region": caller.region,
            "source": caller.source,
        },
        "called_number": record.called_number if record else None,
    }


def _text_from_json(data: object) -> str | None:
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return None
    for key in _REPLY_KEYS:
        value = data.get(key)
        if isinstance(value, str):
            return value
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return None


def parse_reply(content_type: str, body: bytes, charset: str | None = None) -> str:
    """The text to speak from an API answer, or raise ValueError with a reason code.

    A declared text or JSON Content-Type is trusted (`text/plain` may well start with `[` or `<`);
    without one, or with a generic one, the body is sniffed.
    """
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    declared = content_type.split(";", 1)[0].strip()
    if not (declared.startswith("text/") or "json" in declared):
        declared = ""  # missing or generic (application/octet-stream): look at the body
    sniffed = text.lstrip()[:15].lower()
    if "json" in declared or (not declared and sniffed[:1] in ("{", "[", '"')):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ValueError("invalid_json") from None
        found = _text_from_json(data)
        if found is None:
            raise ValueError("no_message_in_json")
        return found
    if "html" in declared or (not declared and sniffed.startswith(("<!doctype", "<html"))):
        raise ValueError("html_answer")
    return text


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` (the rest is never read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class HttpUpstream:
    """POST each turn to `API_URL` under a total deadline of `API_TIMEOUT_MS`."""

    name = "http"

    def __init__(self, url: str, timeout_ms: int) -> None:
        self.url = url
        self.timeout = timeout_ms / 1000
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=30, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "avr-llm-proxy", "Accept": "application/json, text/plain;q=0.9"},
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, payload: dict[str, Any]) -> Answer:
        started = time.perf_counter()
        if self._session is None:
            return UpstreamFailure("not_started", 0.0)

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(
                    self.url,
                    data=orjson.dumps(payload),
                    headers={"Content-Type": "application/json"},
                    # A 301/302 would turn the POST into a bodiless GET: report it, fix API_URL.
                    allow_redirects=False,
                ) as response:
                    body = await _read_capped(response.content, MAX_REPLY_BYTES)
                    if body is None:
                        return UpstreamFailure("answer_too_large", elapsed(), response.status)
                    if 300 <= response.status < 400:
                        return UpstreamFailure("redirect", elapsed(), response.status,
                                               detail="the API redirects: point API_URL at the final address")
                    if not 200 <= response.status < 300:
                        return UpstreamFailure("http_status", elapsed(), response.status)
                    try:
                        text = parse_reply(response.headers.get("Content-Type", "").lower(), body, response.charset)
                    except ValueError as exc:
                        return UpstreamFailure(str(exc), elapsed(), response.status)
                    return UpstreamReply(text, response.status, elapsed())
        except TimeoutError:
            return UpstreamFailure("timeout", elapsed())
        except aiohttp.ClientConnectorError as exc:
            return UpstreamFailure("unreachable", elapsed(), detail=type(exc.os_error).__name__)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            return UpstreamFailure("connection_lost", elapsed(), detail=type(exc).__name__)
        except aiohttp.ClientError as exc:
            return UpstreamFailure("client_error", elapsed(), detail=type(exc).__name__)
