"""A minimal, fast business API for benchmarks: answers every POST at once with the seed's shape.

`{"message": "Hola <caller_number>, en que puedo ayudarte?"}`, like ../shared/baseline/fake-api.js,
so a benchmark can check that every turn carried the right caller. Run: python bench/fake_api.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import orjson


class _Api(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        try:
            caller = orjson.loads(b"".join(self.body)).get("caller_number", "unknown")
        except orjson.JSONDecodeError:
            caller = "unknown"
        self.body = []
        out = orjson.dumps({"message": f"Hola {caller}, en que puedo ayudarte?"})
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
        )


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Api, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))
