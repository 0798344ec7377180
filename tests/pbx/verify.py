"""What every real call must show: its own caller on each of avr-core's turns, and no withheld number anywhere."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

from avr_llm_proxy.app import keys_for
from avr_llm_proxy.calls import CallRegistry
from avr_llm_proxy.privacy import mask_number
from avr_llm_proxy.stores import open_store
from tests.pbx.avr_core import UTTERANCES
from tests.pbx.conftest import Stack


@dataclass(frozen=True)
class Expected:
    """What the business API must receive on every turn of one call."""

    number: str
    presentation: str
    name: str | None = None
    hidden: str | None = None  # a number the caller withheld: it must not be seen anywhere
    verified: bool | None = None  # caller.verified, which every way reads off a SIP channel


@dataclass(frozen=True)
class Placed:
    """A call placed to `exten` (also its dialled number), described by `label`, captured by `source`."""

    exten: str
    label: str
    expected: Expected
    source: str


async def finish(stack_: Stack, calls: list[Placed], variables: tuple[str, ...]) -> dict[str, str]:
    """Wait until each call has played its turns; the call UUID of each extension (from its VarSet)."""
    with contextlib.suppress(TimeoutError):  # check() then names the calls that did not finish
        await stack_.avr.wait_for(len(calls), within=60)
    return {stack_.ami.extens[channel]: value for variable in variables
            for channel, value in stack_.ami.variables(variable).items()
            if value and channel in stack_.ami.extens}


async def stored_records(stack_: Stack) -> list[bytes]:
    """Every call record in the proxy's store, opened with its key, as the record's own JSON."""
    settings = stack_.proxy.settings
    registry = CallRegistry(open_store(settings.store_url), settings.caller_ttl_seconds,
                            sealer=keys_for(settings).sealer)
    try:
        return [record.to_bytes() for record, _ in await registry.newest(1000)]
    finally:
        await registry.store.close()


async def check(stack_: Stack, calls: list[Placed], uuids: dict[str, str], logs: list[str],
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
            problems.append(f"{call.exten} {call.label}: no AudioSocket call (uuid {uuid})")
            continue
        heard = [turn.problems or turn.sentences for turn in played.turns]
        if played.error or len(played.turns) != len(UTTERANCES) or any(turn.problems for turn in played.turns):
            problems.append(f"{call.exten} {call.label}: avr-core {played.error or heard}")
        seen = [(p["caller_number"], p["caller"]["presentation"], p["caller_name"], p["called_number"],
                 p["caller"]["source"], p["caller"]["verified"]) for p in by_call.get(uuid, [])]
        want = call.expected
        turn = (want.number, want.presentation, want.name, call.exten, call.source, want.verified)
        expected = [turn] * len(UTTERANCES)
        if seen != expected:
            problems.append(f"{call.exten} {call.label}: API saw {seen}, not {expected[0]}")
    log = stack_.pbx.asterisk.log()[-3000:].splitlines()
    assert not problems, "\n".join([*problems, "Asterisk's log ends:", *log])
    records = await stored_records(stack_)
    if stack_.proxy.settings.ami_url:  # the channel's hangup, seen over AMI, ends each call in its record
        placed = {uuids[call.exten] for call in calls if call.exten in uuids}
        for _ in range(100):
            ended = {orjson.loads(record)["uuid"] for record in records if orjson.loads(record).get("ended_at")}
            if placed <= ended:
                break
            await asyncio.sleep(0.1)
            records = await stored_records(stack_)
        assert placed <= ended, f"not ended: {placed - ended}"
    shown = {call.expected.number for call in calls if call.expected.presentation == "allowed"}
    # The records as stored are readable here: an allowed caller's number is in them.
    assert all(any(number.encode() in record for record in records) for number in shown)
    # Every way records the caller's channel, which call control acts on (a Local or a PJSIP channel).
    channels = {orjson.loads(record)["uuid"]: orjson.loads(record).get("channel") for record in records}
    unplaced = {call.exten: channels.get(uuids.get(call.exten, "")) for call in calls}
    assert all(str(channel).startswith(("Local/", "PJSIP/")) for channel in unplaced.values()), unplaced
    files = [path.read_bytes() for path in stack_.pbx.callerid_dir.glob("callerid-*.txt")
             if path.name[len("callerid-"):-len(".txt")] in uuids.values()]
    for number in {call.expected.hidden for call in calls} - {None}:
        assert number is not None
        digits = number.lstrip("+")
        assert not any(digits in str(payload) for payload in stack_.api.received), f"{number} reached the API"
        assert not any(digits.encode() in record for record in records), f"{number} is in a call record"
        if captured_before:  # recorded while it was allowed: only where it went after matters
            continue
        assert not any(digits in line or mask_number(number) in line for line in logs), f"{number} was logged"
        assert not any(digits.encode() in data for data in files), f"{number} is in a legacy caller file"
