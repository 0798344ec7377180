"""The Asterisk Manager Interface (AMI) protocol: framing, the `ami://` URL, and actions.

Sans-I/O parsing (`AmiParser`) for the capture listener, which reads events, and `ManagerClient`,
which sends call-control actions on a connection of its own (events off) and reads their responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_MESSAGE_BYTES = 64 * 1024

class AmiProtocolError(Exception):
    """The manager sent something that is not AMI (no banner, a message past the size cap)."""


class AmiMessage(dict[str, str]):
    """One AMI message, keys lower-cased; a repeated key keeps its values joined by newlines."""

    def value(self, key: str) -> str:
        return self.get(key, "")


class AmiParser:
    """Feed bytes, get messages: banner first, blocks split on an empty line, LF or CRLF."""

    def __init__(self) -> None:
        self._buffer = b""
        self.banner: str | None = None
        self.closed = False

    def feed(self, data: bytes) -> list[AmiMessage]:
        if not data:
            self.closed = True
            return []
        self._buffer += data
        if self.banner is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > 1024:
                    raise AmiProtocolError("no AMI banner")
                return []
            banner = self._buffer[:end].rstrip(b"\r").decode("utf-8", errors="replace")
            if not banner.startswith("Asterisk Call Manager/"):
                raise AmiProtocolError(f"not an AMI banner: {banner[:60]!r}")
            self.banner, self._buffer = banner, self._buffer[end + 1:]
        messages: list[AmiMessage] = []
        while True:
            end, size = self._block_end()
            if end < 0:
                if len(self._buffer) > MAX_MESSAGE_BYTES:
                    raise AmiProtocolError("message too large")
                return messages
            block, self._buffer = self._buffer[:end], self._buffer[end + size:]
            message = self._message(block)
            if message is not None:
                messages.append(message)

    def _block_end(self) -> tuple[int, int]:
        crlf, lf = self._buffer.find(b"\r\n\r\n"), self._buffer.find(b"\n\n")
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return crlf, 4
        return lf, 2

    @staticmethod
    def _message(block: bytes) -> AmiMessage | None:
        message = AmiMessage()
        for line in block.decode("utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                continue
            name, text = key.strip().lower(), value.strip()
            message[name] = f"{message[name]}\n{text}" if name in message else text
        return message if "event" in message or "response" in message else None


@dataclass(frozen=True, slots=True)
class AmiEndpoint:
    host: str
    port: int
    username: str
    secret: str


def parse_ami_url(url: str) -> AmiEndpoint:
    """`ami://user:secret@host:5038` (user and secret URL-encoded when they hold `@` or `:`)."""
    parts = urlsplit(url)
    if parts.scheme != "ami" or not parts.hostname or not parts.username or parts.password is None:
        raise ValueError("must look like ami://user:secret@host:5038")
    return AmiEndpoint(parts.hostname, parts.port or 5038, unquote(parts.username), unquote(parts.password))


def action_bytes(fields: dict[str, str]) -> bytes:
    return "".join(f"{key}: {value}\r\n" for key, value in fields.items()).encode() + b"\r\n"
