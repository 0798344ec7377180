"""Benchmark of the turn path: added latency, saturation throughput and memory per tracked call.

Everything is measured in one run on this machine, so the figures compare like with like:

1. paced calls: N concurrent calls, each speaking every 2 s, first straight to a fake business API
   (answering in 0 ms), then through `avr-llm-proxy serve`; the proxy's added latency is the
   difference of the percentiles;
2. saturation: C keep-alive connections sending avr-core-shaped turns as fast as answers come back;
3. memory: `serve` with the memory store, RSS before and after recording M calls.

Every turn's reply is read the way avr-core reads it and must greet the call's own number; a wrong
turn fails the run. Usage: python bench/turns.py [--calls 100] [--seconds 20] [--tracked 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop

from avr_llm_proxy.simulate import hear, read_reply

HERE = Path(__file__).resolve().parent
SYSTEM = {"role": "system", "content": "You are an AI assistant. You must introduce yourself quickly and concisely."}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port}")


@contextmanager
def started(args: list[str], port: int, env: dict[str, str] | None = None, cwd: str | None = None,
            ) -> Iterator[subprocess.Popen[bytes]]:
    log = open(os.path.join(cwd or tempfile.gettempdir(), f"bench-{port}.log"), "wb")
    process = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=cwd, stdout=log, stderr=log)
    try:
        wait_port(port, process)
        yield process
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (uvicorn workers), in KiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection, as avr-core's axios agent keeps one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, list[bytes]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n".encode() + body
        )
        reply = await read_reply(self.reader)
        return reply.status, reply.chunks

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with suppress(ConnectionError):
                await self.writer.wait_closed()


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def number_for(index: int) -> str:
    return f"+59398{index:07d}"


def turn_body(call: str, said: str, history: list[dict[str, str]]) -> bytes:
    return orjson.dumps({"uuid": call, "message": said, "messages": [SYSTEM, *history]})


def check_reply(status: int, chunks: list[bytes], number: str, tally: Tally) -> None:
    from avr_llm_proxy.simulate import HttpReply

    heard = hear(HttpReply(status, {}, chunks), "")
    if heard.problems or not heard.sentences or number not in heard.sentences[0]:
        tally.wrong.append(f"{status} {heard.sentences[:1]} {heard.problems[:1]} expected {number}")


async def paced_calls(port: int, calls: int, seconds: float, through_proxy: bool, first: Tally | None = None) -> Tally:
    """`calls` concurrent calls, each speaking every 2 s (at least once); direct to the API or through the
    proxy. With `first`, each call's first turn is tallied there, apart from the others."""
    tally = Tally()
    stop = time.monotonic() + seconds

    async def one(index: int) -> None:
        call, number = str(uuidlib.uuid4()), number_for(index)
        connection = Connection(port)
        await asyncio.sleep(index * 2.0 / calls)
        try:
            if through_proxy:
                await connection.post("/call", orjson.dumps({"uuid": call, "caller_number": number}))
            history: list[dict[str, str]] = []
            next_turn = time.monotonic()
            while time.monotonic() < stop or not history:
                said = f"frase {len(history)}"
                turn_tally = first if first is not None and not history else tally
                history.append({"role": "user", "content": said})
                if through_proxy:
                    body = turn_body(call, said, history)
                else:
                    body = orjson.dumps({"phone": "593985059132", "text": said, "caller_number": number,
                                         "conversation_id": call})
                started_at = time.perf_counter()
                status, chunks = await connection.post("/prompt-stream" if through_proxy else "/api", body)
                turn_tally.latencies.append(time.perf_counter() - started_at)
                if through_proxy:
                    check_reply(status, chunks, number, turn_tally)
                elif number.encode() not in b"".join(chunks):
                    turn_tally.wrong.append("direct API answer without the number")
                next_turn += 2.0
                await asyncio.sleep(max(0.0, next_turn - time.monotonic()))
        finally:
            await connection.close()

    await asyncio.gather(*(one(index) for index in range(calls)))
    return tally


async def saturate(port: int, connections: int, seconds: float) -> tuple[float, Tally]:
    """Turns per second with `connections` keep-alive clients sending back to back."""
    tally = Tally()
    setup = Connection(port)
    calls = [(str(uuidlib.uuid4()), number_for(index)) for index in range(connections * 4)]
    for call, number in calls:
        await setup.post("/call", orjson.dumps({"uuid": call, "caller_number": number}))
    await setup.close()
    stop = time.monotonic() + seconds
    done = 0

    async def worker(offset: int) -> None:
        nonlocal done
        connection = Connection(port)
        index = offset
        try:
            while time.monotonic() < stop:
                call, number = calls[index % len(calls)]
                started_at = time.perf_counter()
                status, chunks = await connection.post("/prompt-stream", turn_body(call, "hola", [
                    {"role": "user", "content": "hola"}]))
                tally.latencies.append(time.perf_counter() - started_at)
                check_reply(status, chunks, number, tally)
                done += 1
                index += connections
        finally:
            await connection.close()

    began = time.monotonic()
    await asyncio.gather(*(worker(offset) for offset in range(connections)))
    return done / (time.monotonic() - began), tally


async def track_calls(port: int, count: int, connections: int = 32) -> None:
    async def worker(offset: int) -> None:
        connection = Connection(port)
        try:
            for index in range(offset, count, connections):
                body = orjson.dumps({"uuid": str(uuidlib.uuid4()), "caller_number": number_for(index)})
                status, _ = await connection.post("/call", body)
                if status != 200:
                    raise SystemExit(f"/call answered {status}")
        finally:
            await connection.close()

    await asyncio.gather(*(worker(offset) for offset in range(connections)))


def proxy_env(api_port: int, port: int, store_url: str) -> dict[str, str]:
    return {"PORT": str(port), "API_URL": f"http://127.0.0.1:{api_port}/api", "STORE_URL": store_url,
            "CALLERID_DIR": "", "CALLER_WAIT_MS": "500", "AGI_LISTEN": ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="concurrent paced calls (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each paced phase")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections when saturating")
    parser.add_argument("--saturate-seconds", type=float, default=10)
    parser.add_argument("--tracked", type=int, default=100_000, help="calls recorded for the memory figure")
    args = parser.parse_args()

    python = sys.executable
    proxy = [python, "-m", "avr_llm_proxy", "serve"]
    api_port, proxy_port = free_port(), free_port()
    results: list[tuple[str, str]] = []
    wrong = 0
    with tempfile.TemporaryDirectory() as workdir, started([python, str(HERE / "fake_api.py"), str(api_port)],
                                                            api_port):
        with started(proxy, proxy_port, proxy_env(api_port, proxy_port, f"sqlite:///{workdir}/calls.db"), workdir):
            direct = uvloop.run(paced_calls(api_port, args.calls, args.seconds, through_proxy=False))
            via = uvloop.run(paced_calls(proxy_port, args.calls, args.seconds, through_proxy=True))
            rate, saturated = uvloop.run(saturate(proxy_port, args.connections, args.saturate_seconds))
        wrong += len(direct.wrong) + len(via.wrong) + len(saturated.wrong)
        results += [
            (f"paced: {args.calls} calls, a turn every 2 s, API direct p50 / p99",
             f"{direct.pct(0.5):.2f} / {direct.pct(0.99):.2f} ms ({len(direct.latencies)} turns)"),
            ("paced: through avr-llm-proxy p50 / p99",
             f"{via.pct(0.5):.2f} / {via.pct(0.99):.2f} ms ({len(via.latencies)} turns)"),
            ("added latency p50 / p99",
             f"{via.pct(0.5) - direct.pct(0.5):.2f} / {via.pct(0.99) - direct.pct(0.99):.2f} ms"),
            (f"saturation: {args.connections} keep-alive connections",
             f"{rate:.0f} turns/s (p50 {saturated.pct(0.5):.1f} ms, p99 {saturated.pct(0.99):.1f} ms)"),
        ]
        memory_port = free_port()
        with started(proxy, memory_port, proxy_env(api_port, memory_port, "memory://"), workdir) as process:
            time.sleep(0.5)
            before = rss_kib(process.pid)
            uvloop.run(track_calls(memory_port, args.tracked))
            time.sleep(0.5)
            after = rss_kib(process.pid)
        per_call = (after - before) * 1024 / args.tracked
        results.append((f"memory: {args.tracked} tracked calls (memory store), RSS delta per call",
                        f"{per_call:.0f} bytes ({before // 1024} -> {after // 1024} MiB)"))
    results.append(("wrong turns (missing or misattributed number, bad framing)", str(wrong)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    for name, value in results:
        print(f"{name:<70} {value}")
    for problem in (direct.wrong + via.wrong + saturated.wrong)[:5]:
        print(f"  wrong: {problem}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
