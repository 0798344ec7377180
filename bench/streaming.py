"""Benchmark of streamed answers: how soon the caller gets the first sentence.

A local API emits its first sentence 200 ms after the request and the rest over 2 s (chunked
text/plain), or the same answer all at once after 2.2 s. For each turn this prints when the first
chunk reached the client (as avr-core would receive it) and, for the streaming API, how long after
the API wrote its first sentence the proxy's first chunk left (target: within 5 ms).

Usage: python bench/streaming.py [--turns 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from turns import free_port, started  # noqa: E402

FIRST = b"Hola Juan, gracias por llamar. "
REST = [b"Su pedido 1043 ", b"sale hoy del almacen ", b"y llega manana. ", b"Algo mas?"]


class Api:
    def __init__(self) -> None:
        self.first_written: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        streaming = payload["text"] == "stream"
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        if not streaming:
            await asyncio.sleep(2.2)
            return web.Response(text=(FIRST + b"".join(REST)).decode(), content_type="text/plain")
        await response.prepare(request)
        await asyncio.sleep(0.2)
        await response.write(FIRST)
        self.first_written[payload["conversation_id"]] = time.monotonic()
        for part in REST:
            await asyncio.sleep(0.5)
            await response.write(part)
        await response.write_eof()
        return response


async def first_chunk(port: int, call: str, text: str) -> tuple[float, float]:
    """(seconds to the first HTTP chunk, its arrival on the monotonic clock)."""
    body = orjson.dumps({"uuid": call, "message": text, "messages": [{"role": "user", "content": text}]})
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /prompt-stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await reader.readuntil(b"\r\n\r\n")
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    await reader.readexactly(size)
    arrived = time.monotonic()
    await reader.read()
    writer.close()
    return arrived - began, arrived


async def measure(turns: int) -> None:
    api = Api()
    app = web.Application()
    app.router.add_post("/api", api.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    api_port, port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    with tempfile.TemporaryDirectory() as workdir:
        env = {"PORT": str(port), "API_URL": f"http://127.0.0.1:{api_port}/api", "STORE_URL": "memory://",
               "CALLERID_DIR": "", "AGI_LISTEN": "", "CALLER_WAIT_MS": "0"}
        with started([sys.executable, "-m", "avr_llm_proxy", "serve"], port, env, workdir):
            await asyncio.sleep(0.3)
            streamed, whole, lag = [], [], []
            for _ in range(turns):
                call = str(uuidlib.uuid4())
                seconds, arrived = await first_chunk(port, call, "stream")
                streamed.append(seconds)
                lag.append((arrived - api.first_written[call]) * 1000)
                whole.append((await first_chunk(port, str(uuidlib.uuid4()), "whole"))[0])
    await runner.cleanup()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'first chunk, streaming API (first sentence at 200 ms), median':<66} {statistics.median(streamed):.3f} s")
    print(f"{'first chunk, same answer all at once (2.2 s), median':<66} {statistics.median(whole):.3f} s")
    print(f"{'API wrote its first sentence -> client has it, p50 / max':<66} "
          f"{statistics.median(lag):.2f} / {max(lag):.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    uvloop.run(measure(parser.parse_args().turns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
