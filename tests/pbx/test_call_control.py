"""Call control on a real Asterisk 22: an answer's action moves or ends a real call.

Calls are placed as in test_local_calls.py (a Local channel whose `;2` half runs a shipped capture
subroutine and then Dial(AudioSocket)); the business API answers the first turn with an action. The
proxy (AMI_URL with the manager user the README gives) must land a transferred caller's channel in the
shipped `[avr-transfer]` context at the right extension, with the three variables set before it gets
there; end a call it is told to hang up; and leave alone a call whose destination is not allowed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import LOG_LINES
from tests.pbx.avr_core import UTTERANCES
from tests.pbx.conftest import Pbx, Stack, stack
from tests.pbx.dialplans import context
from tests.pbx.verify import stored_records

LINGER_S = 6.0  # avr-core's stand-in keeps a call this long after its turns, unless Asterisk ends it first


@dataclass(frozen=True)
class Case:
    exten: str
    way: str
    number: str
    action: dict[str, Any]
    outcome: str  # how the proxy records it


TRANSFER = {"type": "transfer", "to": "1001", "reason": "billing"}
CASES = (
    Case("5561001", "agi", "+593987650101", TRANSFER, "sent"),
    Case("5561002", "curl", "+593987650102", {**TRANSFER, "to": "2345"}, "sent"),  # by the pattern _2XXX
    Case("5561003", "legacy", "+593987650103", TRANSFER, "sent"),
    Case("5561004", "ami", "+593987650104", TRANSFER, "sent"),
    Case("5562001", "agi", "+593987650201", {"type": "hangup", "reason": "done"}, "sent"),
    Case("5563001", "agi", "+593987650301", {**TRANSFER, "to": "3001"}, "refused: destination_not_allowed"),
)


async def answering(_: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
    """The business API: each call's first turn asks for its case's action."""
    case = next(case for case in CASES if case.exten == payload["called_number"])
    body: dict[str, Any] = {"message": "Le paso con un asesor." if case.action["type"] == "transfer" else "Adios."}
    if payload["text"] == UTTERANCES[0]:
        body["action"] = case.action
    return web.json_response(body)


def channel_events(running: Stack, channel: str) -> list[Any]:
    return [event for event in running.ami.events if event.value("channel") == channel]


async def test_actions_move_end_or_leave_real_calls(pbx: Pbx, tmp_path: Path) -> None:
    start = len(LOG_LINES)
    async with stack(pbx, tmp_path, ami=True, linger=LINGER_S, transfer_allow="1001,_2XXX",
                     action_delay_ms=200) as running:
        running.api.custom = answering
        await asyncio.gather(*(
            running.ami.originate(f"Local/{case.exten}@{context(case.way, 'dial', 'usage', 'plain')}",
                                  f'"Cliente" <{case.number}>')
            for case in CASES))
        deadline = time.monotonic() + 60
        while len([call for call in running.avr.calls.values() if call.ended]) < len(CASES):
            assert time.monotonic() < deadline, f"calls not ended: {running.avr.calls}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the transferred calls' dialplan runs on
        uuids = {running.ami.extens[channel]: (channel, value)
                 for channel, value in running.ami.variables("UUID").items() if channel in running.ami.extens}
        records = {orjson.loads(record)["uuid"]: orjson.loads(record) for record in await stored_records(running)}
    logs = [orjson.loads(line) for line in LOG_LINES[start:]]
    problems = []
    for case in CASES:
        channel, call = uuids[case.exten]
        events = channel_events(running, channel)
        landed = [i for i, event in enumerate(events) if event.value("event") == "Newexten"
                  and event.value("context") == "avr-transfer" and event.value("priority") == "1"]
        variables = {event.value("variable"): (i, event.value("value")) for i, event in enumerate(events)
                     if event.value("event") == "VarSet" and event.value("variable").startswith("AVR_")}
        heard = running.avr.calls[call]
        recorded = records[call].get("action", {})
        if recorded.get("outcome") != case.outcome:
            problems.append(f"{case.exten}: recorded {recorded}")
        if case.action["type"] == "transfer" and case.outcome == "sent":
            expected = {"AVR_CONVERSATION_ID": call, "AVR_CALLER_NUMBER": case.number,
                        "AVR_TRANSFER_REASON": "billing"}
            if not landed or events[landed[0]].value("exten") != case.action["to"]:
                problems.append(f"{case.exten}: never in avr-transfer,{case.action['to']},1")
            elif {name: value for name, (_, value) in variables.items()} != expected \
                    or any(i > landed[0] for i, _ in variables.values()):
                problems.append(f"{case.exten}: variables {variables}, in avr-transfer at event {landed[0]}")
            if f"avr-llm-proxy: call {call} to {case.action['to']}, reason billing" not in pbx.asterisk.log():
                problems.append(f"{case.exten}: the shipped context's NoOp did not show the call")
        else:
            if landed or variables:
                problems.append(f"{case.exten}: moved although it should not be: {landed} {variables}")
        hung_up = any(event.value("event") == "Hangup" for event in events)
        if not hung_up:
            problems.append(f"{case.exten}: the channel never hung up")
        if heard.closed_by_asterisk != (case.outcome == "sent"):
            problems.append(f"{case.exten}: AudioSocket closed by Asterisk: {heard.closed_by_asterisk}")
        said = [line for line in logs if line.get("uuid") == call and line["event"].startswith("action_")]
        if len(said) != 1:
            problems.append(f"{case.exten}: action log lines {said}")
    assert not problems, "\n".join([*problems, "Asterisk's log ends:", *pbx.asterisk.log()[-3000:].splitlines()])
