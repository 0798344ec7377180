"""Benchmark of what knowing the caller adds to a turn: caller history and one CRM lookup per call.

For SQLite and Redis, `avr-llm-proxy serve` runs twice against a fast fake API that is also a fake CRM:
with both features off, then with HISTORY_DAYS=30 and LOOKUP_URL (LOOKUP_TIMEOUT_MS at its default).
Every number first makes one earlier call (so it has a history), then paced calls (a turn every 2 s
each) give the added latency against the API called directly, for every turn and for a call's first
turn (the one that may wait for the lookup and the history note). Both features are read from the call
record, so later turns should cost what they cost with both off. The fake API checks what each turn
carried: with both on, `caller.history` (one earlier call) and `caller.contact` (the CRM's answer for
that very number) on every turn and exactly one CRM request per call; with both off, neither key.
Redis database 14 is used and flushed. Usage: python bench/known_caller.py [--calls 50] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import uuid as uuidlib
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import orjson
import redis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_api import _Api  # noqa: E402
from turns import (  # noqa: E402
    Connection,
    Tally,
    check_reply,
    free_port,
    number_for,
    paced_calls,
    proxy_env,
    started,
    turn_body,
)

REDIS_URL = "redis://127.0.0.1:6379/14"
ENCRYPTION_KEY = "YmVuY2gta2V5LTAxMjM0NTY3ODlhYmNkZWYwMTIzNDU="
HISTORY_DAYS = 30


def contact_for(number: object) -> dict[str, str]:
    """What the fake CRM knows of a number: its own customer id, so a misattributed contact shows."""
    return {"customer_id": f"C-{str(number)[-7:]}", "tier": "gold"}


class _KnownApi(_Api):
    """fake_api's answer on /api, a fake CRM on /crm, and on /stats what both saw since the last /stats."""

    seen: ClassVar[Counter[str]] = Counter()
    looked_up: ClassVar[set[str]] = set()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        if self.url == b"/api":
            self._saw_turn()
            super().on_message_complete()
            return
        body, self.body = b"".join(self.body), []
        if self.url == b"/crm":
            asked = orjson.loads(body)
            self.seen["crm"] += 1
            self.looked_up.add(str(asked.get("conversation_id")))
            self._answer(orjson.dumps(contact_for(asked.get("caller_number"))))
        else:
            self._answer(orjson.dumps({**self.seen, "crm_calls": len(self.looked_up)}))
            self.seen.clear()
            self.looked_up.clear()

    def _saw_turn(self) -> None:
        try:
            payload = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            return
        caller: dict[str, Any] = payload.get("caller") or {}
        self.seen["turns"] += 1
        history = caller.get("history")
        if isinstance(history, dict) and history.get("calls") == 1:
            self.seen["history"] += 1
        if caller.get("contact") == contact_for(payload.get("caller_number")):
            self.seen["contact"] += 1
        if "history" not in caller and "contact" not in caller:
            self.seen["bare"] += 1

    def _answer(self, out: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
        )


async def serve_fake(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_KnownApi, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def seen_by_fake(api_port: int) -> Counter[str]:
    """What the fake API and CRM saw since the last time it was asked (and forget it)."""
    connection = Connection(api_port)
    try:
        _, chunks = await connection.post("/stats", b"{}")
    finally:
        await connection.close()
    return Counter(orjson.loads(b"".join(chunks)))


async def earlier_calls(port: int, calls: int, connections: int = 10) -> Tally:
    """One short call (capture and one turn) for each number, so the paced calls have a history."""
    tally = Tally()

    async def worker(offset: int) -> None:
        connection = Connection(port)
        try:
            for index in range(offset, calls, connections):
                call, number = str(uuidlib.uuid4()), number_for(index)
                await connection.post("/call", orjson.dumps({"uuid": call, "caller_number": number}))
                status, chunks = await connection.post("/prompt-stream", turn_body(call, "hola", [
                    {"role": "user", "content": "hola"}]))
                check_reply(status, chunks, number, tally)
        finally:
            await connection.close()

    await asyncio.gather(*(worker(offset) for offset in range(connections)))
    return tally


async def known_calls(port: int, calls: int, seconds: float) -> tuple[Tally, Tally]:
    """`calls` concurrent calls through the proxy, each speaking every 2 s: (first turns, later turns)."""
    first = Tally()
    later = await paced_calls(port, calls, seconds, through_proxy=True, first=first)
    return first, later


def both(first: Tally, later: Tally) -> Tally:
    return Tally(first.latencies + later.latencies, first.wrong + later.wrong)


def checked(on: bool, calls: int, turns: int, seen: Counter[str]) -> list[str]:
    """What the fake API and CRM should have seen in the paced phase, and did not."""
    if not on:
        expected = {"turns": turns, "bare": turns, "history": 0, "contact": 0, "crm": 0}
    else:
        expected = {"turns": turns, "bare": 0, "history": turns, "contact": turns, "crm": calls, "crm_calls": calls}
    return [f"{key}: {seen[key]}, expected {value}" for key, value in expected.items() if seen[key] != value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50, help="concurrent paced calls (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8, help="length of each paced phase")
    parser.add_argument("--fake-api", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the fake API's own process
    args = parser.parse_args()
    if args.fake_api:
        uvloop.run(serve_fake(args.fake_api))
        return 0

    flush = redis.Redis.from_url(REDIS_URL).flushdb
    flush()
    api_port = free_port()
    rows: list[tuple[str, str]] = []
    wrong: list[str] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as workdir, started([sys.executable, str(Path(__file__).resolve()),
                                                            "--fake-api", str(api_port)], api_port):
        direct = uvloop.run(paced_calls(api_port, args.calls, args.seconds, through_proxy=False))
        uvloop.run(seen_by_fake(api_port))
        wrong += direct.wrong
        rows.append(("API called directly p50 / p99",
                     f"{direct.pct(0.5):.2f} / {direct.pct(0.99):.2f} ms ({len(direct.latencies)} turns)"))
        for name in ("sqlite", "redis"):
            measured: dict[bool, tuple[Tally, Tally]] = {}
            for on in (False, True):
                flush()
                port = free_port()
                url = REDIS_URL if name == "redis" else f"sqlite:///{workdir}/calls-{int(on)}.db"
                env = {**proxy_env(api_port, port, url), "ENCRYPTION_KEY": ENCRYPTION_KEY}
                if on:
                    env |= {"HISTORY_DAYS": str(HISTORY_DAYS), "LOOKUP_URL": f"http://127.0.0.1:{api_port}/crm"}
                with started([sys.executable, "-m", "avr_llm_proxy", "serve"], port, env, workdir):
                    wrong += uvloop.run(earlier_calls(port, args.calls)).wrong
                    uvloop.run(seen_by_fake(api_port))
                    first, later = uvloop.run(known_calls(port, args.calls, args.seconds))
                    seen = uvloop.run(seen_by_fake(api_port))
                every = both(first, later)
                wrong += every.wrong
                label = "on " if on else "off"
                problems += [f"{name} {label}: {problem}" for problem in checked(on, args.calls,
                                                                                 len(every.latencies), seen)]
                measured[on] = first, later
                rows.append((f"{name}, {label}: added latency p50 / p99",
                             f"{every.pct(0.5) - direct.pct(0.5):.2f} / {every.pct(0.99) - direct.pct(0.99):.2f} ms "
                             f"({len(every.latencies)} turns)"))
                if on:
                    rows.append((f"{name}, on : CRM requests / calls",
                                 f"{seen['crm']} / {args.calls} ({seen['crm_calls']} distinct calls)"))
                    rows.append((f"{name}, on : turns with caller.history / caller.contact",
                                 f"{seen['history']} / {seen['contact']} of {seen['turns']}"))
            (first_off, later_off), (first_on, later_on) = measured[False], measured[True]
            off, on_ = both(first_off, later_off), both(first_on, later_on)
            rows.append((f"{name}, on - off: every turn p50 / p99",
                         f"{on_.pct(0.5) - off.pct(0.5):+.2f} / {on_.pct(0.99) - off.pct(0.99):+.2f} ms"))
            rows.append((f"{name}, on - off: first turns p50 / p99",
                         f"{first_on.pct(0.5) - first_off.pct(0.5):+.2f} / "
                         f"{first_on.pct(0.99) - first_off.pct(0.99):+.2f} ms ({len(first_on.latencies)} turns)"))
            rows.append((f"{name}, on - off: later turns p50 / p99",
                         f"{later_on.pct(0.5) - later_off.pct(0.5):+.2f} / "
                         f"{later_on.pct(0.99) - later_off.pct(0.99):+.2f} ms ({len(later_on.latencies)} turns)"))
    flush()
    rows.append(("wrong turns", str(len(wrong))))
    rows.append(("failed checks", str(len(problems))))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    for name, value in rows:
        print(f"{name:<56} {value}")
    for problem in (wrong + problems)[:10]:
        print(f"  wrong: {problem}")
    return 1 if wrong or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
