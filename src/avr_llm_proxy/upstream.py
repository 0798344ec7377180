"""The business API client: the seed's payload out, the answer's text back, piece by piece.

One pool of keep-alive connections (http1.py) for the process. Every request has three deadlines
(connect, first byte, total), a retry only where it cannot do harm (a refused or reset connection,
before any answer; a 429/503 whose Retry-After fits in the deadline), and an `Idempotency-Key` of
`<uuid>:<turn>` so a retried turn is not processed twice. Failures are `UpstreamError`s with a reason
code.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .answers import AnswerDecoder, AnswerError
from .breaker import CircuitBreaker
from .calls import CallRecord
from .http1 import ConnectFailed, ConnectionLost, ConnectTimeout, HttpError, Pool, Response
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
    with_history: bool = False  # HISTORY_DAYS is on: `caller.history` is sent, null when there is none
    with_contact: bool = False  # LOOKUP_URL is set: `caller.contact` likewise

    @property
    def caller(self) -> CallerId:
        return self.record.caller if self.record else UNKNOWN_CALLER


@dataclass(slots=True)
class AnswerInfo:
    """What a turn learns about its answer besides the text: the HTTP status, for the log line, and the
    call action it asks for, if any (control.py judges it)."""

    status: int | None = None
    action: object | None = None
    tool_calls: tuple[tuple[str, str], ...] = ()  # (function name, arguments JSON), OpenAI-style answers


class Upstream(Protocol):
    """Whatever answers a turn: the business API, an OpenAI-compatible server, or the built-in demo."""

    name: str
    breaker: CircuitBreaker

    async def start(self) -> None: ...

    def answer(self, request: UpstreamRequest, info: AnswerInfo) -> AsyncGenerator[str, None]:
        """The answer's text in pieces (concatenate them); raises UpstreamError."""
        ...

    async def close(self) -> None: ...


def build_payload(request: UpstreamRequest) -> dict[str, Any]:
    """The seed's four keys, then the additive ones; a withheld caller carries no number anywhere."""
    caller, record = request.caller, request.record
    fields: dict[str, Any] = {
        "e164": caller.e164,
        "raw": caller.raw,
        "national": caller.national,
        "presentation": caller.presentation,
        "valid": caller.valid,
        "type": caller.number_type,
        "region": caller.region,
        "source": caller.source,
        "verstat": record.trust.verstat if record else None,
        "attestation": record.trust.attestation if record else None,
        "verified": record.trust.verified if record else None,
    }
    if request.with_history:
        fields["history"] = record.history.payload() if record and record.history else None
    if request.with_contact:
        fields["contact"] = record.contact if record else None
    return {
        "phone": request.phone,
        "text": request.text,
        "caller_number": caller.caller_number(request.number_format),
        "conversation_id": request.uuid,
        "caller_name": caller.name,
        "caller": fields,
        "called_number": record.called_number if record else None,
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


class HttpClient:
    """POST a JSON body and stream back the answer's text, under the deadlines, with the safe retries."""

    def __init__(self, deadlines: Deadlines, headers: dict[str, str] | None = None) -> None:
        self.deadlines = deadlines
        self.headers = {"User-Agent": "avr-llm-proxy", "Accept": "application/json, text/event-stream, text/plain",
                        "Content-Type": "application/json", **(headers or {})}
        self._pool: Pool | None = None

    async def start(self) -> None:
        self._pool = Pool(self.deadlines.connect)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _response(self, url: str, body: bytes, extra: dict[str, str] | None, deadline: float) -> Response:
        """The response (status 2xx), after at most one connection retry and one Retry-After wait;
        `extra`: headers of this request on top of the client's."""
        headers = {**self.headers, **extra} if extra else self.headers
        if self._pool is None:
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
                    response = await self._pool.request(url, body, headers)
            except ConnectTimeout:
                raise UpstreamError("connect_timeout") from None
            except TimeoutError:
                raise UpstreamError("timeout" if remaining <= self.deadlines.first_byte else "first_byte_timeout") \
                    from None
            except HttpError as exc:
                # Refused, or a kept-alive connection the server closed before answering: nothing was
                # processed that a second attempt could repeat (and the Idempotency-Key covers the rest).
                if _safe_to_retry(exc) and not reconnected:
                    reconnected = True
                    UPSTREAM_RETRIES.labels(reason="connection").inc()
                    continue
                raise _http_error(exc) from None
            if response.status in (429, 503):
                wait = retry_after(response.headers.get("retry-after"))
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
                     ) -> AsyncGenerator[str, None]:
        """The answer's text pieces; a whole (non-streamed) answer comes as one piece at the end."""
        deadline = asyncio.get_running_loop().time() + self.deadlines.total
        response = await self._response(url, body, headers, deadline)
        info.status = response.status
        try:
            decoder = AnswerDecoder(response.headers.get("content-type", ""))
            limit = MAX_STREAM_BYTES if decoder.streaming else MAX_WHOLE_ANSWER_BYTES
            async for chunk in _chunks(response, deadline, limit):
                for piece in decoder.feed(chunk):
                    yield piece
            for piece in decoder.end():
                yield piece
            info.action = decoder.action
            info.tool_calls = tuple((name, arguments) for name, arguments in decoder.tool_calls.values())
        except AnswerError as exc:
            raise UpstreamError(str(exc), response.status) from None
        finally:
            # A response read to its end leaves its connection for the next turn; any other is closed.
            response.release()

    async def read(self, url: str, body: bytes, limit: int, headers: dict[str, str] | None = None) -> bytes:
        """The whole body of a 2xx answer, at most `limit` bytes, under the deadlines."""
        deadline = asyncio.get_running_loop().time() + self.deadlines.total
        response = await self._response(url, body, headers, deadline)
        try:
            return b"".join([chunk async for chunk in _chunks(response, deadline, limit)])
        finally:
            response.release()


async def _chunks(response: Response, deadline: float, limit: int) -> AsyncGenerator[bytes, None]:
    """A response's body as it arrives, until `deadline` (loop time) and `limit` bytes."""
    size = 0
    while True:
        try:
            chunk = response.read_nowait()
            if chunk is None:  # nothing arrived yet: wait, under the whole answer's deadline
                async with asyncio.timeout_at(deadline):
                    chunk = await response.read()
        except TimeoutError:
            raise UpstreamError("timeout", response.status) from None
        except HttpError as exc:
            raise _http_error(exc, response.status) from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise UpstreamError("answer_too_large", response.status)
        yield chunk


def _safe_to_retry(exc: HttpError) -> bool:
    if isinstance(exc, ConnectFailed):
        return isinstance(exc.cause, ConnectionRefusedError)
    return isinstance(exc, ConnectionLost) and exc.early


def _http_error(exc: HttpError, status: int | None = None) -> UpstreamError:
    if isinstance(exc, ConnectFailed):
        return UpstreamError("unreachable", status, type(exc.cause).__name__)
    if isinstance(exc, ConnectionLost):
        return UpstreamError("connection_lost", status, str(exc))
    return UpstreamError("bad_response", status, str(exc))


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

    def answer(self, request: UpstreamRequest, info: AnswerInfo) -> AsyncGenerator[str, None]:
        """The client's own stream, not a generator around it: one layer less to resume per piece."""
        body = orjson.dumps(build_payload(request))
        headers = {"Idempotency-Key": f"{request.uuid}:{request.turn}"}
        if self.signing_secret:
            headers["X-Signature"] = signature(self.signing_secret, body)
        return self.client.stream(self.url, body, info, headers)
