"""The HTTP listener's protocol: uvicorn's httptools protocol with a cap on each request's head.

httptools sets no limit of its own: uvicorn keeps every header line it is given, and httptools joins
the pieces of a header that never ends, so one connection sending header lines for ever grew the
process by 500 MB in 1.5 s. Here the head is counted while it is parsed, and a request whose head
passes the cap is answered 400 and its connection closed at once.
"""

from __future__ import annotations

from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger("avr_llm_proxy.http_protocol")

MAX_HEAD_BYTES = 32 * 1024  # the request line and headers, as parsed
# Raw bytes read while a head is still incomplete: a read may also hold the start of the body (up to
# asyncio's 256 KiB per read), so this bound only stops a header that never ends.
MAX_RAW_HEAD_BYTES = 256 * 1024 + MAX_HEAD_BYTES


_BODY = b"request headers too large"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
              b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY))


class HeadTooLarge(Exception):
    """A request's head passed MAX_HEAD_BYTES: raised inside httptools' callbacks to stop the parse."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools, with each request's head counted as it arrives.

    A callback's exception comes out of httptools as a parser error, which uvicorn answers with 400
    and a closed connection: that answer is the one place where the reason is said.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._raw_head_bytes = 0
        self._in_head = True
        self._too_large = False

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
        self._head_bytes, self._in_head = 0, True

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._raw_head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large = True
            raise HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error; for a head past the cap, 431 with the reason instead."""
        if self.transport.is_closing():
            return
        if not self._too_large:
            super().send_400_response(msg)
            return
        log.warning("request_refused", reason="headers_too_large", limit_bytes=MAX_HEAD_BYTES)
        self.transport.write(_TOO_LARGE)
        self.transport.close()
