"""What the console shows, read from the store: every worker's and replica's calls, not this process's.

`ConsoleFeed` polls the store only while a page is open (nobody watching costs nothing), every
POLL_S, and hands each subscriber the table when it changed: one row per call, numbers masked as
the logs mask them. A call's timeline (`timeline()`) is its record's marks (capture, start, end,
action) and the turns every process added to the store, with digit runs in what was said masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from ..calls import CallRecord, CallRegistry
from ..control import describe
from ..privacy import scrub_text
from ..stores import StoreError

POLL_S = 0.5
KEEP_ALIVE_S = 15.0
MAX_ROWS = 50
CHART_MINUTES = 60
CHART_CALLS = 300  # the newest calls the latency chart reads the turns of,
CHART_TURNS = 120  # their newest turns at most
# In what callers said: runs of 6 or more digits (an order or ID number, a phone number) are masked.
SPOKEN_NUMBER = re.compile(r"\+?\d(?:[\s().-]?\d){5,}")


def _percentile(values: list[float] | None, share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 2)


class ConsoleFeed:
    """The live calls table, polled from the store while anyone subscribes, pushed when it changes."""

    def __init__(self, registry: CallRegistry, redact: Callable[[str], str], circuit: Callable[[], Any]) -> None:
        self.registry = registry
        self.redact = redact
        self.circuit = circuit
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._polling: asyncio.Task[None] | None = None
        self._last: bytes = b""
        self._tails: dict[str, tuple[int, dict[str, Any] | None]] = {}  # uuid: (turns, its last turn)
        self._counted: tuple[float, int] | None = None  # when, and the turns of all calls then

    def number(self, record: CallRecord) -> str:
        return record.caller.shown(self.redact)

    def spoken(self, text: str) -> str:
        return scrub_text(text, self.redact, SPOKEN_NUMBER)

    async def events(self) -> AsyncIterator[bytes]:
        """Server-Sent Events for one page: the table now, then each change, a comment now and then."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self._subscribers.add(queue)
        if self._polling is None or self._polling.done():
            self._polling = asyncio.create_task(self._poll(), name="console-feed")
        try:
            if self._last:
                yield self._last
            while True:
                try:
                    async with asyncio.timeout(KEEP_ALIVE_S):
                        yield await queue.get()
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self._subscribers.discard(queue)

    async def _poll(self) -> None:
        while self._subscribers:
            with contextlib.suppress(StoreError):
                event = b"event: calls\ndata: " + orjson.dumps(await self.table()) + b"\n\n"
                if event != self._last:
                    self._last = event
                    for queue in list(self._subscribers):
                        if queue.full():  # a page that does not read: it gets the newest table later
                            queue.get_nowait()
                        queue.put_nowait(event)
            await asyncio.sleep(POLL_S)
        self._last = b""

    async def rows(self, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
        """The newest calls of the store, every process's, one row each (also /debug's)."""
        return [await self._row(record, turns) for record, turns in await self.registry.newest(limit)]

    async def table(self) -> dict[str, Any]:
        """The newest calls as rows, the circuit, and the turns per second over all calls."""
        rows = await self.rows()
        now, total = time.monotonic(), sum(row["turns"] for row in rows)
        rate = 0.0
        if self._counted is not None and now > self._counted[0]:
            rate = max(0.0, (total - self._counted[1]) / (now - self._counted[0]))
        self._counted = (now, total)
        self._tails = {row["uuid"]: self._tails[row["uuid"]] for row in rows if row["uuid"] in self._tails}
        return {"circuit": self.circuit(), "turns_per_s": round(rate, 1), "calls": rows}

    async def _row(self, record: CallRecord, turns: int) -> dict[str, Any]:
        last = await self._last_turn(record.uuid, turns)
        status = "ended" if record.ended_at else "live"
        if status == "live" and last and str(last.get("status", "")).startswith("fallback"):
            status = "fallback"
        return {
            "uuid": record.uuid, "number": self.number(record), "presentation": record.caller.presentation,
            "source": record.caller.source, "called": record.called_number, "turns": turns,
            "latency_ms": last.get("latency_ms") if last else None, "status": status,
            "last_status": last.get("status") if last else None, "last_turn_at": last.get("at") if last else None,
            "started_at": record.started_at or record.captured_at,
            "action": describe(record.action) if record.action else None,
        }

    async def _last_turn(self, uuid: str, turns: int) -> dict[str, Any] | None:
        """The call's newest turn, read from the store only when its count moved since the last poll."""
        known = self._tails.get(uuid)
        if known is not None and known[0] == turns:
            return known[1]
        entries = await self.registry.timeline(uuid, newest=1)  # every entry is a turn
        last = entries[-1] if entries else None
        self._tails[uuid] = (turns, last)
        return last

    async def latency(self, now: float | None = None) -> dict[str, Any]:
        """API latency and the proxy's added latency (a turn's time less the API's), p50 and p99 per minute
        over the last hour, from the turns the store keeps of its newest calls, every worker's."""
        now = time.time() if now is None else now
        first = int(now // 60) - CHART_MINUTES + 1
        api: dict[int, list[float]] = {}
        added: dict[int, list[float]] = {}
        for record, _ in await self.registry.newest(CHART_CALLS):
            if (record.started_at or record.captured_at) < now - 2 * 3600:
                continue
            for entry in await self.registry.timeline(record.uuid, newest=CHART_TURNS):
                minute = int(float(entry.get("at") or 0) // 60)
                if entry.get("kind") != "turn" or minute < first or entry.get("status") == "superseded":
                    continue
                spent, waited = float(entry.get("elapsed_ms") or 0.0), float(entry.get("latency_ms") or 0.0)
                api.setdefault(minute, []).append(waited)
                added.setdefault(minute, []).append(max(0.0, spent - waited))
        return {"first_minute": first * 60, "minutes": [
            {"turns": len(api.get(minute, [])), "api_p50": _percentile(api.get(minute), 0.5),
             "api_p99": _percentile(api.get(minute), 0.99), "added_p50": _percentile(added.get(minute), 0.5),
             "added_p99": _percentile(added.get(minute), 0.99)}
            for minute in range(first, first + CHART_MINUTES)]}

    async def timeline(self, uuid: str) -> dict[str, Any] | None:
        """One call's page: its marks and turns in order, what was said masked; None when unknown."""
        record = await self.registry.get(uuid)
        if record is None:
            return None
        marks: list[dict[str, Any]] = [{"at": record.captured_at, "kind": "capture", "source": record.caller.source,
                                        "number": self.number(record), "presentation": record.caller.presentation}]
        marks += [{"at": at, "kind": kind} for kind, at in (("start", record.started_at), ("end", record.ended_at))
                  if at]
        if record.action:
            marks.append({"at": record.action.get("at"), "kind": "action", "action": describe(record.action)})
        for entry in await self.registry.timeline(uuid):
            if entry.get("kind") == "turn":
                marks.append({**entry, "said": self.spoken(str(entry.get("said", ""))),
                              "spoken": [self.spoken(str(text)) for text in entry.get("spoken") or []]})
        marks.sort(key=lambda mark: mark.get("at") or 0.0)
        return {"uuid": uuid, "number": self.number(record), "presentation": record.caller.presentation,
                "called": record.called_number, "turns": await self.registry.turns(uuid), "events": marks}
