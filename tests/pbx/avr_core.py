"""avr-core's part of a real call: an AudioSocket server that plays avr-core 1.4.1 towards the proxy.

Asterisk connects (`Dial(AudioSocket/host:port/<uuid>)` or `AudioSocket(<uuid>,host:port)`), sends the
UUID frame (kind 0x01, 16 bytes) and then 20 ms audio frames (kind 0x10). Like avr-core, this server
has nothing to say before the caller has spoken: it waits for `speech_frames` of audio, then posts
avr-core's `/prompt-stream` bodies (the growing history) for that UUID, one per utterance, and hangs
up (kind 0x00) when the last answer is heard, or `linger` seconds later unless Asterisk ends the
call first (`closed_by_asterisk`: a transfer or a hang-up took the caller away).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid as uuidlib
from dataclasses import dataclass, field

from avr_llm_proxy.simulate import HeardTurn, play_call

KIND_HANGUP, KIND_UUID, KIND_AUDIO = 0x00, 0x01, 0x10
UTTERANCES = ("hola, necesito ayuda", "quiero saber el estado de mi pedido", "gracias, eso es todo")


@dataclass
class AudioSocketCall:
    """One AudioSocket connection as this server saw it."""

    uuid: str
    audio_frames: int = 0
    turns: list[HeardTurn] = field(default_factory=list)
    error: str | None = None
    closed_by_asterisk: bool = False
    ended: bool = False


class AvrCore:
    """The AudioSocket server; `calls` fills in as Asterisk connects, `done` counts finished calls."""

    def __init__(self, proxy_url: str, port: int, speech_frames: int = 25, linger: float = 0.0) -> None:
        self.proxy_url = proxy_url
        self.port = port
        self.speech_frames = speech_frames
        self.linger = linger
        self.calls: dict[str, AudioSocketCall] = {}
        self.finished = asyncio.Condition()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, count: int, within: float) -> None:
        """Until `count` calls have played all their turns (or failed)."""
        async with asyncio.timeout(within), self.finished:
            await self.finished.wait_for(lambda: self._done() >= count)

    def _done(self) -> int:
        return sum(1 for call in self.calls.values() if call.error or len(call.turns) == len(UTTERANCES))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        call: AudioSocketCall | None = None
        try:
            kind, payload = await _frame(reader)
            if kind != KIND_UUID or len(payload) != 16:
                return
            call = self.calls[str(uuidlib.UUID(bytes=payload))] = AudioSocketCall(str(uuidlib.UUID(bytes=payload)))
            while call.audio_frames < self.speech_frames:
                kind, payload = await _frame(reader)
                if kind == KIND_HANGUP:
                    call.error = f"hung up after {call.audio_frames} audio frames"
                    return
                call.audio_frames += kind == KIND_AUDIO
            # Asterisk keeps sending audio while the turns run: read it, as avr-core streams it to ASR.
            drain = asyncio.create_task(_drain(reader))
            call.turns = await play_call(self.proxy_url, call.uuid, list(UTTERANCES))
            if self.linger:
                await asyncio.wait({drain}, timeout=self.linger)
            call.closed_by_asterisk = drain.done()
            drain.cancel()
            if call.closed_by_asterisk:
                return
            writer.write(struct.pack(">BH", KIND_HANGUP, 0))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if call is not None:
                call.error = f"{type(exc).__name__}: {exc}"
        finally:
            if call is not None:
                call.ended = True
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            async with self.finished:
                self.finished.notify_all()


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind, length = struct.unpack(">BH", await reader.readexactly(3))
    return kind, await reader.readexactly(length)


async def _drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while await reader.read(65536):
            pass
