"""The HTTP listener: uvicorn's httptools protocol with bounds on each request's head and read time.

httptools sets no limit of its own: uvicorn keeps every header line it is given, and httptools joins
the pieces of a header that never ends, so one connection sending header lines for ever grew the
process by 500 MB in 1.5 s. Nor does uvicorn time a request that is still arriving: a client sending
half a head, or half a body, held its socket for as long as it liked. Here the head is counted while
it is parsed, and both the head and the body must arrive within READ_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .observability import REJECTED, LogThrottle

log = structlog.get_logger("avr_llm_proxy.http_protocol")

MAX_HEAD_BYTES = 32 * 1024  # the request line and headers, as parsed
# Raw bytes read while a head is still incomplete: a read may also hold the start of the body (up to
# asyncio's 256 KiB per read), so this bound only stops a header that never ends.
MAX_RAW_HEAD_BYTES = 256 * 1024 + MAX_HEAD_BYTES
# A request's head must arrive within this of the connection's opening (or of its first byte, on a
# kept-alive connection), and its body within this of the head. avr-core and CURL() take milliseconds.
READ_TIMEOUT_S = 10.0
# Connections (and running requests) per process; past it a request is answered 503 at once.
MAX_CONNECTIONS = 4096
KEEP_ALIVE_S = 75  # longer than avr-core's (Node's) keep-alive, so a reused connection is never closed under it


def _answer(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, len(body), body))


_TOO_LARGE = _answer(b"431 Request Header Fields Too Large", b"request headers too large")
_TIMED_OUT = _answer(b"408 Request Timeout", b"request not received in time")


def listener_options() -> dict[str, Any]:
    """uvicorn's options for the proxy's HTTP listener, the same for `serve` and the tests."""
    return {
        "http": BoundedHttpToolsProtocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        # On stop, turns under way finish (API_TIMEOUT_MS is 8 s by default); a connection that would
        # keep the process alive longer is closed.
        "timeout_graceful_shutdown": 30,
        "limit_concurrency": MAX_CONNECTIONS,
        "access_log": False,
        # The proxy decides who is local (/debug) from the socket, never from X-Forwarded-For.
        "proxy_headers": False,
        "server_header": False,  # nothing to gain from naming the server software to every client
        "log_config": None,  # uvicorn's own lines go through our chain (numbers redacted)
    }


class HeadTooLarge(Exception):
    """A request's head passed MAX_HEAD_BYTES: raised inside httptools' callbacks to stop the parse."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools, with each request's head counted as it arrives and its reading timed.

    A callback's exception comes out of httptools as a parser error, which uvicorn answers with 400
    and a closed connection: that answer is the one place where the reason is said.
    """

    refused_log = LogThrottle()  # one line a second for all connections: a flood must not flood the log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._in_head = True
        self._too_large = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._begun = False  # a byte of the current request has been parsed
        self._event_stream = False  # the current request asks for Server-Sent Events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._time_read()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > MAX_RAW_HEAD_BYTES:
                self._too_large = True
                self.send_400_response("")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._in_head, self._begun, self._event_stream = 0, True, True, False
        if self._read_timer is None and not self._owed():  # a kept-alive connection's next request
            self._time_read()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if name.lower() == b"accept":
            self._event_stream = b"text/event-stream" in value.lower()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._raw_head_bytes = False, 0
        super().on_headers_complete()
        self._stop_read_timer()
        if not self._owed():
            self._time_read()  # now for the body

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_read_timer()
        self._in_head, self._begun = True, False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._begun and self._read_timer is None and not self._owed() and not self.transport.is_closing():
            self._time_read()  # a request that came in during the answer is timed from its end

    def shutdown(self) -> None:
        """Graceful shutdown lets answers finish; an event stream (a console page) never does, so its
        connection is closed: the stream ends now instead of holding the shutdown for its 30 s (the
        browser's EventSource reconnects, to another worker or to this one restarted)."""
        super().shutdown()
        if self._event_stream and self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # connection_lost then tells the app its client left

    def _owed(self) -> bool:
        """An answer is still owed to a request before the one being read (pipelining): its client waits
        on us, it is not late. Once a head is read, uvicorn's `cycle` is that request's own; the ones it
        waits behind hold it in `pipeline`."""
        if self._in_head:
            return self.cycle is not None and not self.cycle.response_complete
        return bool(self.pipeline)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge

    def _time_read(self) -> None:
        self._read_timer = self.loop.call_later(READ_TIMEOUT_S, self._read_timed_out)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """The head or body is late: 408 and a closed connection; an idle new connection just closes.

        Reads are timed only while no answer is owed: a pipelined request behind a long answer is timed
        from that answer's end."""
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # uvicorn stopped reading (a pipelined request waits its turn): not late
            self._time_read()
            return
        if self._begun:
            # A 408 only where no other answer is under way: never inside one, nor after an early one.
            if self._in_head and not self._owed() or \
                    not self._in_head and self.cycle is not None and not self.cycle.response_started:
                self.transport.write(_TIMED_OUT)
            self._log_refused(f"{'head' if self._in_head else 'body'}_timeout", timeout_s=READ_TIMEOUT_S)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error; for a head past the cap, 431 with the reason instead."""
        if self.transport.is_closing():
            return
        if not self._too_large:
            super().send_400_response(msg)
            return
        self._log_refused("headers_too_large", limit_bytes=MAX_HEAD_BYTES)
        self.transport.write(_TOO_LARGE)
        self.transport.close()

    def _log_refused(self, reason: str, **fields: Any) -> None:
        REJECTED.labels(endpoint="http", reason=reason).inc()
        if (extra := self.refused_log.allow()) is not None:
            log.warning("request_refused", reason=reason, **fields, **extra)
