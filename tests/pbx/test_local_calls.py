"""Real calls through every shipped subroutine, placed by AMI Originate on a real Asterisk 22.

Each call is a Local channel: its `;2` half runs the test's dialplan (the shipped subroutine, then
AudioSocket to avr-core's stand-in), its `;1` half plays a tone. avr-core's stand-in posts three
turns per call to the proxy; the business API must see that call's own caller on each of them, and a
withheld number must reach neither the API nor the store nor a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from avr_llm_proxy.privacy import mask_number
from tests.conftest import LOG_LINES
from tests.pbx.avr_core import UTTERANCES
from tests.pbx.conftest import Pbx, Stack, stack
from tests.pbx.dialplans import FREEPBX_VARIABLE, context


@dataclass(frozen=True)
class Caller:
    """A caller ID set by Originate, and what the business API must receive for it."""

    caller_id: str | None
    number: str
    presentation: str
    name: str | None = None
    hidden: str | None = None  # a withheld number: it must not be seen anywhere


SHELL_NAME = "Ana $(reboot); `id` & O'Neil | >x"
CALLERS = {
    "e164": Caller('"Juan Perez" <+593987654321>', "+593987654321", "allowed", "Juan Perez"),
    "national": Caller("<0991234567>", "+593991234567", "allowed"),
    "anonymous": Caller('"Anonymous" <anonymous>', "anonymous", "withheld"),
    "none": Caller(None, "unknown", "unavailable"),
    "shell_name": Caller(f'"{SHELL_NAME}" <+34612345678>', "+34612345678", "allowed", SHELL_NAME),
}
WITHHELD = {
    "before": Caller('"Pedro Paez" <+593991117771>', "anonymous", "withheld", hidden="+593991117771"),
    "after": Caller('"Pedro Paez" <+593991117772>', "anonymous", "withheld", hidden="+593991117772"),
}
BATCH = 20


@dataclass(frozen=True)
class Call:
    exten: str
    context: str
    caller: Caller


def plan(way: str, form: str, presentations: tuple[str, ...], batch: int) -> list[Call]:
    """The calls of one test: each caller ID with and without the argument, the withheld ones, a batch."""
    calls = [Call("", context(way, form, argument, "plain"), caller)
             for argument in ("usage", "none") for caller in CALLERS.values()]
    calls += [Call("", context(way, form, "usage", presentation), WITHHELD[presentation])
              for presentation in presentations]
    calls += [Call("", context(way, form, "usage", "plain"),
                   Caller(f'"Caller {n}" <+5939870000{n:02d}>', f"+5939870000{n:02d}", "allowed", f"Caller {n}"))
              for n in range(batch)]
    return [Call(f"55510{n:02d}", call.context, call.caller) for n, call in enumerate(calls)]


async def place(stack_: Stack, calls: list[Call]) -> dict[str, str]:
    """Place every call at once and wait until each has played its turns; the UUID of each extension."""
    await asyncio.gather(*(stack_.ami.originate(f"Local/{call.exten}@{call.context}", call.caller.caller_id)
                           for call in calls))
    with contextlib.suppress(TimeoutError):  # check() then names the calls that did not finish
        await stack_.avr.wait_for(len(calls), within=60)
    uuids: dict[str, str] = {}
    for variable in ("UUID", FREEPBX_VARIABLE):
        for channel, value in stack_.ami.variables(variable).items():
            found = re.match(r"Local/(\d+)@[^;]+;2$", channel)
            if found and value:
                uuids[found.group(1)] = value
    return uuids


def check(stack_: Stack, calls: list[Call], uuids: dict[str, str], store: Path, logs: list[str],
          captured_before: bool = False) -> None:
    """Every call's three turns carried its own caller; no withheld number went anywhere.

    captured_before: the number was withheld after a capture had recorded it (as it was then): it must
    still never reach the API, and the call's record ends withheld.
    """
    by_call: dict[str, list[dict[str, Any]]] = {}
    for payload in stack_.api.received:
        by_call.setdefault(payload["conversation_id"], []).append(payload)
    problems = []
    for call in calls:
        uuid = uuids.get(call.exten)
        played = stack_.avr.calls.get(uuid or "")
        if uuid is None or played is None:
            problems.append(f"{call.exten} {call.context}: no AudioSocket call (uuid {uuid})")
            continue
        heard = [turn.problems or turn.sentences for turn in played.turns]
        if played.error or len(played.turns) != len(UTTERANCES) or any(turn.problems for turn in played.turns):
            problems.append(f"{call.exten} {call.context}: avr-core {played.error or heard}")
        seen = [(p["caller_number"], p["caller"]["presentation"], p["caller_name"], p["called_number"])
                for p in by_call.get(uuid, [])]
        expected = [(call.caller.number, call.caller.presentation, call.caller.name, call.exten)] * len(UTTERANCES)
        if seen != expected:
            problems.append(f"{call.exten} {call.context} {call.caller.caller_id}: API saw {seen}, not {expected[0]}")
    assert not problems, "\n".join([*problems, "Asterisk's log ends:", *stack_.pbx.asterisk.log()[-3000:].splitlines()])
    hidden = [call.caller.hidden for call in calls if call.caller.hidden]
    for number in hidden:
        digits = number.lstrip("+")
        assert not any(digits in str(payload) for payload in stack_.api.received), f"{number} reached the API"
        if captured_before:
            continue
        assert not any(digits in line or mask_number(number) in line for line in logs), f"{number} was logged"
        for path in store.parent.glob(store.name + "*"):
            assert digits.encode() not in path.read_bytes(), f"{number} is in {path.name}"


async def run_way(pbx: Pbx, tmp_path: Path, way: str, form: str) -> None:
    """One capture way in one form: every caller ID, with and without the argument, withheld, 20 at once."""
    alone = ("before", "after") if way == "ami" else ("before",)
    calls = plan(way, form, alone, BATCH)
    start = len(LOG_LINES)
    async with stack(pbx, tmp_path, ami=way == "ami") as running:
        check(running, calls, await place(running, calls), tmp_path / "calls.db", LOG_LINES[start:])
    if way != "ami":
        # Withheld after the subroutine: only AMI, beside the way, can still see it before avr-core speaks.
        later = [Call(f"55520{n:02d}", context(way, form, "usage", "after"), WITHHELD["after"]) for n in range(2)]
        async with stack(pbx, tmp_path / "with-ami", ami=True) as running:
            check(running, later, await place(running, later), tmp_path / "with-ami" / "calls.db", [],
                  captured_before=True)


@pytest.mark.parametrize("form", ["dial", "app"])
@pytest.mark.parametrize("way", ["agi", "curl", "legacy", "ami"])
async def test_capture_way(pbx: Pbx, tmp_path: Path, way: str, form: str) -> None:
    """Each shipped way, in the seed's Dial form and FreePBX's AudioSocket() form, gives each call its caller."""
    (tmp_path / "with-ami").mkdir()
    await run_way(pbx, tmp_path, way, form)
