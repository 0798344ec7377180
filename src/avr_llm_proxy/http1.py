"""Keep-alive HTTP/1.1 client connections to the business API, parsed by httptools.

A turn makes one small POST and reads a short answer. At avr-core's pace (one turn per call every
few seconds) each request runs with cold CPU caches, and there aiohttp's request machinery cost
~500 us per round trip on loopback against ~200 us for a bare asyncio connection (bench/turns.py,
profile in the commit). This module keeps only what a turn needs: a pool per origin, one write per
request, httptools for the response, body pieces handed over as they arrive. Deadlines and retries
are the caller's (upstream.py); here a failure is one of four named errors.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024
# Body bytes buffered ahead of the reader before the socket stops being read.
READ_AHEAD_BYTES = 256 * 1024


class HttpError(Exception):
    """The request got no usable response."""


class ConnectFailed(HttpError):
    """No connection could be opened; `cause` is the OSError (refused, unreachable, name unknown)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class ConnectTimeout(HttpError):
    """Opening the connection took longer than its deadline."""


class ConnectionLost(HttpError):
    """The connection ended before the response did; `early` when not one byte of it had arrived."""

    def __init__(self, detail: str, early: bool) -> None:
        super().__init__(detail)
        self.early = early


class ProtocolError(HttpError):
    """The server's bytes are not an HTTP/1.1 response we can read."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL split once: where to connect, and the request line and Host header to send."""

    scheme: str
    host: str
    port: int
    path: bytes
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:100]!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        host_header = name if port == default else f"{name}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, path.encode("ascii"), host_header.encode("idna"))

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


class Response:
    """The head of a response, then its body piece by piece through `read()`."""

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" once the body ended."""
        return await self._connection.read_body()

    def read_nowait(self) -> bytes | None:
        """As `read`, but None instead of waiting (most answers arrive whole with their head)."""
        return self._connection.body_ready()

    def release(self) -> None:
        """Hand the connection back for the next request when the body was read whole, else close it."""
        self._connection.finish()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the httptools parser of its current response."""

    def __init__(self, pool: Pool, origin: tuple[str, str, int]) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head_size = 0
        self._headers: dict[str, str] = {}
        self._head: asyncio.Future[Response] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._started = False  # a byte of the current response arrived
        self._complete = False
        self._until_close = False  # neither Content-Length nor chunked: the body ends with the connection
        self._keep_alive = False
        self._error: HttpError | None = None
        self.idle = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:  # nothing was asked (a server's 408 before it closes, say): not reusable any more
            self.close()
            return
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        if self._until_close and not self._complete and exc is None and self._head is None:
            self.on_message_complete()
        self._fail(ConnectionLost(f"connection closed: {exc or 'by the server'}", early=not self._started))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD_BYTES:
            raise ProtocolError("response headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = {}  # an interim response (103 Early Hints): the real one follows
            self._head_size = 0
            return
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is complete
        self._until_close = "content-length" not in self._headers and "chunked" not in self._headers.get(
            "transfer-encoding", "") and status not in (204, 304)
        if self._head is not None and not self._head.done():
            self._head.set_result(Response(self, status, self._headers))
            self._head = None

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_AHEAD_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is not None:  # the end of an interim (1xx) response
            return
        self._complete = True
        self._wake()

    # used by Pool and Response
    async def request(self, data: bytes) -> Response:
        assert self.transport is not None
        self._reset()
        if self.transport.is_closing() or self._error is not None:
            raise ConnectionLost("connection closed before the request", early=True)
        self._head = self._loop.create_future()
        self.transport.write(data)
        return await self._head

    async def read_body(self) -> bytes:
        while (data := self.body_ready()) is None:
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        return data

    def body_ready(self) -> bytes | None:
        """The body bytes buffered, b"" at the body's end, None while there are none yet."""
        if not self._body:
            if self._error is not None:
                raise self._error
            return b"" if self._complete else None
        data = b"".join(self._body) if len(self._body) > 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """Back to the pool if the response was read to its end and may be followed by another."""
        reusable = (self._complete and not self._body and self._error is None and not self._until_close
                    and self._keep_alive and self.transport is not None
                    and not self.transport.is_closing())
        if reusable:
            self.idle = True
            self._pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self._pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def _reset(self) -> None:
        self.idle = False
        self._headers = {}
        self._head_size = 0
        self._body.clear()
        self._buffered = 0
        self._started = self._complete = self._until_close = self._keep_alive = False

    def _wake(self) -> None:
        if self._body_waiter is not None and not self._body_waiter.done():
            self._body_waiter.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head = None
        self._wake()
        if isinstance(error, ProtocolError) and self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections per origin, at most `limit` open at once; idle ones close after `idle_s`."""

    def __init__(self, connect_timeout: float, limit: int = 512, idle_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.limit = limit
        self.idle_s = idle_s
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[tuple[_Connection, float]]] = {}
        self._open: set[_Connection] = set()
        self._slots: deque[asyncio.Future[None]] = deque()
        self._targets: dict[str, Target] = {}

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = Target.parse(url)
        return target

    async def request(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST `body` on a kept-alive connection to the origin, else a new one; returns once the head arrived."""
        target = self.target(url)
        head = [b"POST ", target.path, b" HTTP/1.1\r\nHost: ", target.host_header,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers.items():
            head += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        head += [b"\r\n", body]
        connection = self._pooled(target) or await self._connect(target)
        try:
            return await connection.request(b"".join(head))
        except BaseException:
            connection.close()  # cancelled or failed mid-request: its state is unknown
            raise

    def _pooled(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        now = asyncio.get_running_loop().time()
        while idle:
            connection, since = idle.pop()
            if now - since < self.idle_s and connection.transport is not None \
                    and not connection.transport.is_closing():
                return connection
            connection.close()
        return None

    async def _connect(self, target: Target) -> _Connection:
        """A new connection; at the limit, a connection of this origin handed back meanwhile, or an idle one's slot."""
        while len(self._open) >= self.limit:
            if self._evict_idle():
                break
            slot = asyncio.get_running_loop().create_future()
            self._slots.append(slot)
            try:
                await slot
            finally:
                if slot in self._slots:
                    self._slots.remove(slot)
            pooled = self._pooled(target)
            if pooled is not None:
                return pooled
        loop = asyncio.get_running_loop()
        context = None
        if target.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()  # loads the system's CAs: once, not per connection
            context = self._ssl
        connection = _Connection(self, target.origin)
        self._open.add(connection)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: connection, target.host, target.port, ssl=context,
                                             server_hostname=target.host if context else None)
        except TimeoutError:
            self.forget(connection)
            raise ConnectTimeout(f"no connection to {target.host}:{target.port} "
                                 f"within {self.connect_timeout:g} s") from None
        except OSError as exc:
            self.forget(connection)
            raise ConnectFailed(exc) from None
        except BaseException:
            self.forget(connection)
            raise
        return connection

    def give_back(self, connection: _Connection) -> None:
        self._idle.setdefault(connection.origin, []).append((connection, asyncio.get_running_loop().time()))
        self._wake_one()

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any origin, to make room for a new one."""
        oldest = min((idle[0] for idle in self._idle.values() if idle), key=lambda pair: pair[1], default=None)
        if oldest is None:
            return False
        oldest[0].close()
        return True

    def _wake_one(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def forget(self, connection: _Connection) -> None:
        """A connection closed: free its slot for a waiting request."""
        if connection in self._open:
            self._open.discard(connection)
            self._wake_one()
        for idle in self._idle.values():
            for index, (each, _) in enumerate(idle):
                if each is connection:
                    del idle[index]
                    return

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
