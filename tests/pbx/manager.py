"""The tests' own AMI client: places calls with Originate and waits for their hang-up.

It frames the stream with the product's `AmiParser`: the parser is what the replayed captures test;
here it only reads a real manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

from avr_llm_proxy.manager import AmiMessage, AmiParser


class Manager:
    """One logged-in AMI connection; `action` sends and returns the response; channels' extensions and
    variables are kept from their events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self._responses: dict[str, asyncio.Future[AmiMessage]] = {}
        self.var_sets: list[tuple[str, str, str]] = []
        self.extens: dict[str, str] = {}  # channel -> the extension it was created for (Newchannel)
        self.events: list[AmiMessage] = []  # every event, in order
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        parser = AmiParser()
        while data := await self.reader.read(65536):
            for message in parser.feed(data):
                waiter = self._responses.pop(message.value("actionid"), None)
                if "response" in message and waiter is not None and not waiter.done():
                    waiter.set_result(message)
                if "event" in message:
                    self.events.append(message)
                if message.value("event") == "Newchannel":
                    self.extens[message.value("channel")] = message.value("exten")
                if message.value("event") == "VarSet":
                    self.var_sets.append((message.value("channel"), message.value("variable"), message.value("value")))

    async def action(self, name: str, **fields: str) -> AmiMessage:
        action_id = f"t{next(self._ids)}"
        waiter: asyncio.Future[AmiMessage] = asyncio.get_running_loop().create_future()
        self._responses[action_id] = waiter
        lines = {"Action": name, "ActionID": action_id, **fields}
        self.writer.write("".join(f"{key}: {value}\r\n" for key, value in lines.items()).encode() + b"\r\n")
        await self.writer.drain()
        async with asyncio.timeout(10):
            return await waiter

    def variables(self, name: str) -> dict[str, str]:
        """Every channel's last value of the variable `name` set so far (VarSet events), by channel."""
        return {channel: value for channel, variable, value in self.var_sets if variable == name}

    async def originate(self, channel: str, caller_id: str | None, application: str = "Milliwatt",
                        data: str = "") -> None:
        """Place a call; the `;1` half of a Local channel runs `application`, the `;2` half the dialplan."""
        fields = {"Channel": channel, "Application": application, "Async": "true"}
        if data:
            fields["Data"] = data
        if caller_id is not None:
            fields["CallerID"] = caller_id
        answer = await self.action("Originate", **fields)
        assert answer.value("response") == "Success", answer

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def manager(port: int, username: str, secret: str) -> AsyncIterator[Manager]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Manager(reader, writer)
    try:
        answer = await client.action("Login", Username=username, Secret=secret, Events="call,dialplan")
        assert answer.value("response") == "Success", answer
        yield client
    finally:
        await client.close()
