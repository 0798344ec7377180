"""Benchmark of caller capture: FastAGI sessions per second and added set-up time, AMI events per second.

1. FastAGI: `avr-llm-proxy serve` (SQLite store, as by default) and a fake Asterisk that runs
   sessions with the captured PJSIP environment (tests/fixtures/agi-env-pjsip.txt), 50 in flight:
   environment, GET FULL VARIABLE, SET VARIABLE UUID, close. The time from connect to the server's
   close is what the AGI() line adds to the call's set-up.
2. AMI: the parser and the call tracker on the captured call's events (ami-local-call.txt), repeated
   with distinct channels and UUIDs, fed in 64 KiB reads as the listener reads them.

Usage: python bench/capture.py [--sessions 5000] [--in-flight 50] [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import uvloop

from avr_llm_proxy.capture.ami import CallTracker
from avr_llm_proxy.manager import AmiParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from turns import Tally, free_port, started  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


async def agi_sessions(port: int, sessions: int, in_flight: int, per_second: float = 0) -> tuple[float, Tally]:
    """Run sessions with `in_flight` at once; with `per_second`, start them at that pace instead."""
    env = (FIXTURES / "agi-env-pjsip.txt").read_bytes().replace(b"agi_network_script: test",
                                                                b"agi_network_script: callerid")
    tally = Tally()
    queue = iter(range(sessions))

    async def one(index: int) -> None:
        started_at = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(env.replace(b"+593987654321", b"+59398%07d" % index).replace(
            b"858675a8-e2f7-4c71-ad18-2c76b7927da2", str(uuidlib.uuid4()).encode()))
        uuid_set = False
        while line := await reader.readline():
            if line.startswith(b"GET FULL VARIABLE"):
                writer.write(b"200 result=1 (allowed_not_screened)\n")
            else:
                uuid_set = uuid_set or line.startswith(b"SET VARIABLE UUID")
                writer.write(b"200 result=1\n")
        writer.close()
        tally.latencies.append(time.perf_counter() - started_at)
        if not uuid_set:
            tally.wrong.append(f"session {index} got no UUID")

    async def worker() -> None:
        for index in queue:
            await one(index)

    began = time.perf_counter()
    if per_second:
        tasks = []
        for index in range(sessions):
            await asyncio.sleep(max(0.0, began + index / per_second - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return sessions / (time.perf_counter() - began), tally


def ami_stream(calls: int) -> bytes:
    events = (FIXTURES / "ami-local-call.txt").read_bytes().replace(b"\n", b"\r\n")
    parts = [b"Asterisk Call Manager/11.0.0\r\n"]
    for index in range(calls):
        parts.append(events.replace(b"avr-00000000;2", b"avr-%08x;2" % index)
                     .replace(b"avr-0000000a;2", b"app-%08x;2" % index)
                     .replace(b"9a05bdfe-fb2c-492e-a462-b7e152a95121", str(uuidlib.uuid4()).encode())
                     .replace(b"ab4df463-b871-4281-9969-d26cf223634a", str(uuidlib.uuid4()).encode()))
    return b"".join(parts)


def ami_rate(calls: int) -> tuple[float, int, int]:
    data = ami_stream(calls)
    parser, tracker = AmiParser(), CallTracker()
    events = captures = 0
    began = time.perf_counter()
    for offset in range(0, len(data), 65536):
        for message in parser.feed(data[offset:offset + 65536]):
            events += 1
            captures += len(tracker.feed(message))
    return events / (time.perf_counter() - began), events, captures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--paced", type=float, default=200, help="sessions/s for the set-up time figure")
    parser.add_argument("--calls", type=int, default=20000, help="calls replayed through the AMI parser")
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "memory"))
    args = parser.parse_args()
    port, agi_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as workdir:
        store = f"sqlite:///{workdir}/c.db" if args.store == "sqlite" else "memory://"
        env = {"PORT": str(port), "AGI_LISTEN": f"127.0.0.1:{agi_port}", "STORE_URL": store, "CALLERID_DIR": ""}
        with started([sys.executable, "-m", "avr_llm_proxy", "serve"], port, env, workdir):
            rate, tally = uvloop.run(agi_sessions(agi_port, args.sessions, args.in_flight))
            _, paced = uvloop.run(agi_sessions(agi_port, int(args.paced * 10), 0, args.paced))
    events_rate, events, captures = ami_rate(args.calls)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{f'FastAGI sessions/s, {args.in_flight} in flight ({args.store} store)':<62} {rate:.0f}")
    print(f"{'  set-up time at that saturation p50 / p99':<62} {tally.pct(0.5):.2f} / {tally.pct(0.99):.2f} ms")
    print(f"{f'FastAGI added set-up time at {args.paced:.0f} calls/s p50 / p99':<62} "
          f"{paced.pct(0.5):.2f} / {paced.pct(0.99):.2f} ms")
    print(f"{'AMI events/s parsed and tracked':<62} {events_rate:.0f} ({events} events, {captures} captures)")
    print(f"{'sessions without a UUID':<62} {len(tally.wrong) + len(paced.wrong)}")
    return 1 if tally.wrong or paced.wrong or captures != 2 * args.calls else 0


if __name__ == "__main__":
    raise SystemExit(main())
