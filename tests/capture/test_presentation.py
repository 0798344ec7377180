"""The whole presentation.json case table through every capture way: the outcome never depends on the way."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from avr_llm_proxy.calls import CallRecord
from avr_llm_proxy.capture.agi import AgiEnvironment, AgiParser, record_from_environment
from avr_llm_proxy.capture.ami import CallTracker, record_from_capture
from avr_llm_proxy.capture.call import parse_call
from avr_llm_proxy.capture.files import LegacyCallerFiles
from avr_llm_proxy.manager import AmiParser

from ..conftest import FIXTURES

CASES = json.loads((FIXTURES / "presentation.json").read_text(encoding="utf-8"))["cases"]
UUID = "858675a8-e2f7-4c71-ad18-2c76b7927da2"
PRES_TEXT = {0: "Presentation Allowed, Not Screened", 32: "Presentation Prohibited, Not Screened",
             35: "Presentation Prohibited, Network Number", 67: "Number Unavailable"}


def assert_outcome(record: CallRecord, case: dict[str, Any]) -> None:
    caller = record.caller
    assert caller.presentation == case["expect"], case["case"]
    if case["expect"] == "withheld":
        assert caller.caller_number("e164") == "anonymous" and caller.raw is None and caller.name is None
    elif case["expect"] == "unavailable":
        assert caller.caller_number("e164") == "unknown"
    else:
        assert caller.caller_number("e164") == "+593987654321" and caller.name == "Juan Perez"


def by_agi(case: dict[str, Any]) -> CallRecord:
    """agi_* as Asterisk sends them (absent values are `unknown`), plus the GET FULL VARIABLE answer."""
    env = (FIXTURES / "agi-env-pjsip.txt").read_text()
    number = case.get("agi_callerid") or case["num"] or "unknown"
    code = case["agi_callingpres"] if case["agi_callingpres"] is not None else 0  # unchanged by num-pres alone
    env = env.replace("agi_callerid: +593987654321", f"agi_callerid: {number}")
    env = env.replace("agi_calleridname: Juan Perez", f"agi_calleridname: {case['name'] or 'unknown'}")
    env = env.replace("agi_callingpres: 0", f"agi_callingpres: {code}")
    events = AgiParser().feed(env.encode())
    assert isinstance(events[0], AgiEnvironment)
    return record_from_environment(events[0], UUID, case["num_pres"], "EC")


def by_form(case: dict[str, Any]) -> CallRecord:
    body = f"uuid={UUID}&num={quote(case['num'], safe='')}&name={quote(case['name'], safe='')}&pres={case['num_pres']}"
    return parse_call("application/x-www-form-urlencoded", body.encode(), "EC")


def by_json(case: dict[str, Any]) -> CallRecord:
    body = {"uuid": UUID, "caller_number": case["num"], "caller_name": case["name"], "presentation": case["num_pres"]}
    return parse_call("application/json", orjson.dumps(body), "EC")


def by_ami(case: dict[str, Any]) -> CallRecord:
    """NewCallerid with CallerIDNum and CID-CallingPres as AMI shows them, VarSet UUID, the AudioSocket step,
    then the Getvar answer."""
    code = case["agi_callingpres"] if case["agi_callingpres"] is not None else 0
    common = (f"Channel: PJSIP/tester-00000001\r\nCallerIDNum: {case['ami_callerid_num']}\r\n"
              f"CallerIDName: {case['name'] or '<unknown>'}\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n")
    stream = (f"Asterisk Call Manager/11.0.0\r\nEvent: NewCallerid\r\n{common}"
              f"CID-CallingPres: {code} ({PRES_TEXT[code]})\r\n\r\n"
              f"Event: VarSet\r\n{common}Variable: UUID\r\nValue: {UUID}\r\n\r\n"
              f"Event: Newexten\r\n{common}Application: Dial\r\nAppData: AudioSocket/127.0.0.1:5001/{UUID},120\r\n\r\n")
    tracker = CallTracker()
    captures = [c for message in AmiParser().feed(stream.encode()) for c in tracker.feed(message)]
    assert len(captures) == 1
    return record_from_capture(captures[0], case["num_pres"], "EC")


WAYS = {"agi": by_agi, "curl_form": by_form, "json": by_json, "ami": by_ami}


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["case"][:48])
def test_case_table_through_each_way(way: str, case: dict[str, Any]) -> None:
    """Each real Asterisk case ends in its expected outcome whichever way captured it."""
    assert_outcome(WAYS[way](case), case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["case"][:48])
async def test_case_table_through_the_legacy_file(tmp_path: Path, case: dict[str, Any]) -> None:
    """The file carries a number only; avr-callerid-legacy.conf writes `anonymous` for a prohib presentation."""
    content = "anonymous" if case["num_pres"].startswith("prohib") else case["num"]
    (tmp_path / f"callerid-{UUID}.txt").write_text(content + "\n")
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    if not content:
        assert record is None  # an empty file waits for its number; the turn then says "unknown"
        return
    assert record is not None and record.caller.presentation == case["expect"]
    assert record.caller.caller_number("e164") == {"withheld": "anonymous", "unavailable": "unknown"}.get(
        case["expect"], "+593987654321")


def test_clock_is_not_involved() -> None:
    """The table tests above never depend on time (records are built, not stored)."""
    assert time.time() > 0
