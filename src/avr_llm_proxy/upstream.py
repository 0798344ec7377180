"""The business API client: the seed's payload out, the answer's text back, piece by piece.

One pooled aiohttp session for the process. Every request has three deadlines (connect, first
byte, total), a retry only where it cannot do harm (a refused or reset connection, before any answer;
a 429/503 whose Retry-After fits in the deadline), and an `Idempotency-Key` of `<uuid>:<turn>` so a
retried turn is not processed twice. Failures are `UpstreamError`s with a reason code.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from .answers import AnswerDecoder, AnswerError
from .breaker import CircuitBreaker
from .calls import CallRecord
from .identity import UNKNOWN_CALLER, CallerId, NumberFormat
from .observability import UPSTREAM_RETRIES

MAX_WHOLE_ANSWER_BYTES = 256 * 1024
MAX_STREAM_BYTES = 1024 * 1024


class UpstreamError(Exception):
    """Why the API gave us nothing (more) to speak; `reason` is a short code for logs and metrics."""

    def __init__(self, reason: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """Everything an upstream may use to answer one turn."""

    uuid: str
    turn: int
    text: str
    record: CallRecord | None
    phone: str
    number_format: NumberFormat
    history: tuple[tuple[str, str], ...] = ()

    @property
    def caller(self) -> CallerId:
        return self.record.caller if self.record else UNKNOWN_CALLER


@dataclass(slots=True)
class AnswerInfo:
    """What a turn learns about its answer besides the text: the HTTP status, for the log line."""

    status: int | None = None


class Upstream(Protocol):
    """Whatever answers a turn: the business API, an OpenAI-compatible server, or the built-in demo."""

    name: str
    breaker: CircuitBreaker

    async def start(self) -> None: ...

    def answer(self, request: UpstreamRequest, info: AnswerInfo) -> AsyncIterator[str]:
        """The answer's text in pieces (concatenate them); raises UpstreamError."""
        ...

    async def close(self) -> None: ...


def build_payload(request: UpstreamRequest) -> dict[str, Any]:
    """The seed's four keys, then the additive ones; a withheld caller carries no number anywhere."""
    caller = request.caller
    return {
        "phone": request.phone,
        "text": request.text,
        "caller_number": caller.caller_number(request.number_format),
        "conversation_id": request.uuid,
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
        "called_number": request.record.called_number if request.record else None,
    }


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds: to connect, to the response's first byte (its headers), and for the whole answer."""

    connect: float
    first_byte: float
    total: float


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _refused_or_reset(exc: BaseException) -> bool:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, ConnectionRefusedError)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and isinstance(exc.__cause__ or exc, ConnectionResetError)


class HttpClient:
    """POST a JSON body and stream back the answer's text, under the deadlines, with the safe retries."""

    def __init__(self, deadlines: Deadlines, headers: dict[str, str] | None = None) -> None:
        self.deadlines = deadlines
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=30, ttl_dns_cache=60),
            # sock_connect only: aiohttp's `connect` would also count the wait for a pooled connection.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.deadlines.connect),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "avr-llm-proxy", "Accept": "application/json, text/event-stream, text/plain"},
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _response(
        self, url: str, body: bytes, headers: dict[str, str], deadline: float
    ) -> aiohttp.ClientResponse:
        """The response (status 2xx), after at most one connection retry and one Retry-After wait."""
        if self._session is None:
            raise UpstreamError("not_started")
        loop = asyncio.get_running_loop()
        reconnected = waited = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamError("timeout")
            try:
                # asyncio.timeout, not wait_for: no extra task per request (measured on the turn path).
                async with asyncio.timeout(min(self.deadlines.first_byte, remaining)):
                    response = await self._session.post(url, data=body, headers=headers, allow_redirects=False)
            except aiohttp.ConnectionTimeoutError:
                raise UpstreamError("connect_timeout") from None
            except TimeoutError:
                raise UpstreamError("timeout" if remaining <= self.deadlines.first_byte else "first_byte_timeout") \
                    from None
            except aiohttp.ClientError as exc:
                if _refused_or_reset(exc) and not reconnected:
                    reconnected = True
                    UPSTREAM_RETRIES.labels(reason="connection").inc()
                    continue
                raise _client_error(exc) from None
            if response.status in (429, 503):
                wait = retry_after(response.headers.get("Retry-After"))
                response.release()
                if wait is not None and not waited and wait < deadline - loop.time() - 0.05:
                    waited = True
                    UPSTREAM_RETRIES.labels(reason=f"http_{response.status}").inc()
                    await asyncio.sleep(wait)
                    continue
                raise UpstreamError("rate_limited" if response.status == 429 else "unavailable", response.status)
            if 300 <= response.status < 400:
                response.release()
                raise UpstreamError("redirect", response.status, "the API redirects: use the final address")
            if not 200 <= response.status < 300:
                response.release()
                raise UpstreamError("http_status", response.status)
            return response

    async def stream(self, url: str, body: bytes, info: AnswerInfo, headers: dict[str, str] | None = None,
                     ) -> AsyncIterator[str]:
        """The answer's text pieces; a whole (non-streamed) answer comes as one piece at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadlines.total
        response = await self._response(url, body, {**self.headers, **(headers or {})}, deadline)
        info.status = response.status
        try:
            decoder = AnswerDecoder(response.headers.get("Content-Type", ""), response.charset)
            limit = MAX_STREAM_BYTES if decoder.streaming else MAX_WHOLE_ANSWER_BYTES
            size = 0
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise UpstreamError("timeout", response.status)
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await response.content.readany()
                except TimeoutError:
                    raise UpstreamError("timeout", response.status) from None
                except aiohttp.ClientError as exc:
                    raise _client_error(exc, response.status) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise UpstreamError("answer_too_large", response.status)
                for piece in decoder.feed(chunk):
                    yield piece
            for piece in decoder.end():
                yield piece
        except AnswerError as exc:
            raise UpstreamError(str(exc), response.status) from None
        finally:
            # release() hands a fully read connection back to the pool; close() would drop keep-alive and
            # make every turn open a new TCP connection to the API (found by timing the upstream leg).
            response.release()


def _client_error(exc: aiohttp.ClientError, status: int | None = None) -> UpstreamError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("unreachable", status, type(exc.os_error).__name__)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        return UpstreamError("connection_lost", status, type(exc).__name__)
    return UpstreamError("client_error", status, type(exc).__name__)


def signature(secret: str, body: bytes, now: float | None = None) -> str:
    """`X-Signature`: `t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">`, so the API can check origin and age."""
    stamp = str(int(time.time() if now is None else now))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


class HttpUpstream:
    """The business API of the seed's contract at `API_URL`; `API_TOKEN` and `API_SIGNING_SECRET` optional."""

    name = "api"

    def __init__(self, url: str, deadlines: Deadlines, breaker: CircuitBreaker, token: str = "",
                 signing_secret: str = "") -> None:
        self.url = url
        self.client = HttpClient(deadlines, {"Authorization": f"Bearer {token}"} if token else None)
        self.breaker = breaker
        self.signing_secret = signing_secret

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def answer(self, request: UpstreamRequest, info: AnswerInfo) -> AsyncIterator[str]:
        body = orjson.dumps(build_payload(request))
        headers = {"Idempotency-Key": f"{request.uuid}:{request.turn}"}
        if self.signing_secret:
            headers["X-Signature"] = signature(self.signing_secret, body)
        async for piece in self.client.stream(self.url, body, info, headers):
            yield piece
