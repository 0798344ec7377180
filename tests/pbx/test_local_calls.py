"""Real calls through every shipped subroutine, placed by AMI Originate on a real Asterisk 22.

Each call is a Local channel: its `;2` half runs the test's dialplan (the shipped subroutine, then
AudioSocket to avr-core's stand-in), its `;1` half plays a tone. avr-core's stand-in posts three
turns per call to the proxy; the business API must see that call's own caller on each of them, and a
withheld number must reach neither the API nor the store nor a log line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LOG_LINES
from tests.pbx.asterisk import PROXY_AMI_SECRET, READONLY_AMI_USER
from tests.pbx.conftest import Pbx, Stack, stack
from tests.pbx.dialplans import FREEPBX_VARIABLE, SOURCES, context
from tests.pbx.verify import Expected, Placed, check, finish

SHELL_NAME = 'Ana "La Jefa" $(reboot); `id` & O\'Neil | >x'
CALLERS: dict[str, tuple[str | None, Expected]] = {  # Originate's CallerID, and what the API must see
    "e164": ('"Juan Perez" <+593987654321>', Expected("+593987654321", "allowed", "Juan Perez")),
    "national": ("<0991234567>", Expected("+593991234567", "allowed")),
    "anonymous": ('"Anonymous" <anonymous>', Expected("anonymous", "withheld")),
    "none": (None, Expected("unknown", "unavailable")),
    "shell_name": ('"{}" <+34612345678>'.format(SHELL_NAME.replace('"', '\\"')),
                   Expected("+34612345678", "allowed", SHELL_NAME)),
}
WITHHELD = {
    "before": ('"Pedro Paez" <+593991117771>', Expected("anonymous", "withheld", hidden="+593991117771")),
    "after": ('"Pedro Paez" <+593991117772>', Expected("anonymous", "withheld", hidden="+593991117772")),
}
BATCH = 20


@dataclass(frozen=True)
class Call:
    context: str
    caller_id: str | None
    expected: Expected


def plan(way: str, form: str, presentations: tuple[str, ...], batch: int) -> list[Call]:
    """The calls of one test: each caller ID with and without the argument, the withheld ones, a batch."""
    calls = [Call(context(way, form, argument, "plain"), *case)
             for argument in ("usage", "none") for case in CALLERS.values()]
    calls += [Call(context(way, form, "usage", presentation), *WITHHELD[presentation])
              for presentation in presentations]
    calls += [Call(context(way, form, "usage", "plain"), f'"Caller {n}" <+5939870000{n:02d}>',
                   Expected(f"+5939870000{n:02d}", "allowed", f"Caller {n}"))
              for n in range(batch)]
    return calls


async def place(stack_: Stack, calls: list[Call], first: int, source: str) -> tuple[list[Placed], dict[str, str]]:
    """Originate every call at once, to extensions from `first` on; wait for their turns."""
    placed = [Placed(str(first + n), f"{call.context} {call.caller_id}", call.expected, source)
              for n, call in enumerate(calls)]
    await asyncio.gather(*(stack_.ami.originate(f"Local/{where.exten}@{call.context}", call.caller_id)
                           for where, call in zip(placed, calls, strict=True)))
    return placed, await finish(stack_, placed, ("UUID", FREEPBX_VARIABLE))


async def run_way(pbx: Pbx, tmp_path: Path, way: str, form: str) -> None:
    """One capture way in one form: every caller ID, with and without the argument, withheld, 20 at once."""
    alone = ("before", "after") if way == "ami" else ("before",)
    start = len(LOG_LINES)
    async with stack(pbx, tmp_path, ami=way == "ami") as running:
        placed, uuids = await place(running, plan(way, form, alone, BATCH), 5551000, SOURCES[way])
        await check(running, placed, uuids, LOG_LINES[start:])
    if way != "ami":
        # Withheld after the subroutine: only AMI, beside the way, can still see it before avr-core speaks.
        later = [Call(context(way, form, "usage", "after"), *WITHHELD["after"])] * 2
        async with stack(pbx, tmp_path / "with-ami", ami=True) as running:
            placed, uuids = await place(running, later, 5552000, "ami")  # AMI's capture withheld it
            await check(running, placed, uuids, [], captured_before=True)


@pytest.mark.parametrize("form", ["dial", "app"])
@pytest.mark.parametrize("way", ["agi", "curl", "legacy", "ami"])
async def test_capture_way(pbx: Pbx, tmp_path: Path, way: str, form: str) -> None:
    """Each shipped way, in the seed's Dial form and FreePBX's AudioSocket() form, gives each call its caller."""
    (tmp_path / "with-ami").mkdir()
    await run_way(pbx, tmp_path, way, form)


async def test_manager_user_without_getvar_withholds_and_says_so(pbx: Pbx, tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """An AMI user that reads events but may not Getvar: one warning at login, and every caller withheld."""
    url = f"ami://{READONLY_AMI_USER}:{PROXY_AMI_SECRET}@127.0.0.1:{pbx.asterisk.ports.ami}"
    calls = [Call(context("ami", "dial", "usage", "plain"), *CALLERS["e164"])] * 2
    async with stack(pbx, tmp_path, ami=True, ami_url=url) as running:
        placed, uuids = await place(running, calls, 5553000, "ami")
        withheld = [Placed(call.exten, call.label, Expected("anonymous", "withheld", hidden="+593987654321"), "ami")
                    for call in placed]
        await check(running, withheld, uuids, logs())
    refused = [line for line in logs() if '"ami_getvar_refused"' in line]
    assert len(refused) == 1 and "Permission denied" in refused[0] and "write = call,reporting" in refused[0]
    assert len([line for line in logs() if '"ami_presentation_unknown"' in line]) == len(calls)
