"""Benchmark of the stores side by side, in one run: memory, SQLite and Redis.

For each store, `avr-llm-proxy serve` against the fast fake API: paced calls (a turn every 2 s each)
for the added latency against the API called directly, then saturation with keep-alive connections.
Then what one Redis round trip (a record's GET, as a turn does) costs from Python on loopback.
Redis database 14 is used and flushed. Usage: python bench/stores.py [--calls 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from turns import Tally, free_port, paced_calls, proxy_env, saturate, started  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"


async def redis_round_trips(count: int) -> Tally:
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.set("avrlp:bench", b"x" * 400)
    tally = Tally()
    for _ in range(count):
        began = time.perf_counter()
        await client.get("avrlp:bench")
        tally.latencies.append(time.perf_counter() - began)
    await client.delete("avrlp:bench")
    await client.aclose()
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--saturate-seconds", type=float, default=5)
    args = parser.parse_args()
    redis.Redis.from_url(REDIS_URL).flushdb()
    api_port = free_port()
    rows: list[tuple[str, str]] = []
    wrong = 0
    with tempfile.TemporaryDirectory() as workdir, started([sys.executable, str(Path(__file__).parent / "fake_api.py"),
                                                            str(api_port)], api_port):
        direct = uvloop.run(paced_calls(api_port, args.calls, args.seconds, through_proxy=False))
        rows.append(("API called directly p50 / p99", f"{direct.pct(0.5):.2f} / {direct.pct(0.99):.2f} ms"))
        for name, url in (("memory", "memory://"), ("sqlite", f"sqlite:///{workdir}/calls.db"), ("redis", REDIS_URL)):
            port = free_port()
            env = {**proxy_env(api_port, port, url), "ENCRYPTION_KEY": "YmVuY2gta2V5LTAxMjM0NTY3ODlhYmNkZWYwMTIzNDU="}
            with started([sys.executable, "-m", "avr_llm_proxy", "serve"], port, env, workdir):
                via = uvloop.run(paced_calls(port, args.calls, args.seconds, through_proxy=True))
                rate, saturated = uvloop.run(saturate(port, 50, args.saturate_seconds))
            wrong += len(via.wrong) + len(saturated.wrong)
            rows.append((f"{name}: added latency p50 / p99",
                         f"{via.pct(0.5) - direct.pct(0.5):.2f} / {via.pct(0.99) - direct.pct(0.99):.2f} ms"))
            rows.append((f"{name}: saturation, 50 connections", f"{rate:.0f} turns/s"))
    trips = uvloop.run(redis_round_trips(2000))
    redis.Redis.from_url(REDIS_URL).flushdb()
    rows.append(("one Redis GET from Python, loopback, p50 / p99", f"{trips.pct(0.5):.3f} / {trips.pct(0.99):.3f} ms"))
    rows.append(("wrong turns", str(wrong)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for name, value in rows:
        print(f"{name:<52} {value}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
