"""The Asterisk Manager Interface (AMI) protocol: framing, the `ami://` URL, and actions.

Sans-I/O parsing (`AmiParser`) for the capture listener, which reads events, and `ManagerClient`,
which sends call-control actions on a connection of its own (events off) and reads their responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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


class ManagerError(Exception):
    """An action the manager refused or could not be asked; the message is what to log."""


class ManagerClient:
    """Sends actions on a manager connection of its own, with events off, and returns each response.

    It connects when first needed and again after the connection drops; an action in flight when it
    drops fails (it may or may not have run), and is never sent twice.
    """

    def __init__(self, endpoint: AmiEndpoint, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[AmiMessage]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()

    async def send(self, action: str, **fields: str) -> AmiMessage:
        """The response to one action; raises ManagerError when it is an error or does not come in time."""
        try:
            async with asyncio.timeout(self.timeout_s):
                writer = await self._connected()
                return await self._exchange(writer, action, fields)
        except (OSError, asyncio.IncompleteReadError, AmiProtocolError) as exc:
            raise ManagerError(f"manager unreachable: {type(exc).__name__}") from None
        except TimeoutError:
            raise ManagerError(f"no answer from the manager within {self.timeout_s:g} s") from None

    async def _exchange(self, writer: asyncio.StreamWriter, action: str, fields: dict[str, str]) -> AmiMessage:
        action_id = f"act-{next(self._ids)}"
        waiter: asyncio.Future[AmiMessage] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = waiter
        try:
            writer.write(action_bytes({"Action": action, "ActionID": action_id, **fields}))
            await writer.drain()
            answer = await waiter
        finally:
            self._pending.pop(action_id, None)
        if answer.value("response").lower() != "success":
            raise ManagerError(answer.value("message")[:200] or "error")
        return answer

    async def _connected(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
            self._writer = writer
            self._reading = asyncio.create_task(self._read(reader, writer), name="ami-actions")
            try:
                await self._exchange(writer, "Login", {"Username": self.endpoint.username,
                                                       "Secret": self.endpoint.secret, "Events": "off"})
            except ManagerError as exc:
                writer.close()
                raise ManagerError(f"login refused: {exc}") from None
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = AmiParser()
        try:
            while data := await reader.read(65536):
                for message in parser.feed(data):
                    waiter = self._pending.get(message.value("actionid"))
                    if "response" in message and waiter is not None and not waiter.done():
                        waiter.set_result(message)
        except (OSError, AmiProtocolError):
            pass
        finally:
            writer.close()
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ManagerError("the manager closed the connection"))

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
