"""dialplan/: the shipped contexts are well-formed, shell-free, and speak the proxy's field names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from avr_llm_proxy.capture.agi import SCRIPT
from avr_llm_proxy.capture.call import parse_call

DIALPLAN = Path(__file__).parent.parent / "dialplan"
FILES = sorted(DIALPLAN.glob("*.conf"))


def lines_of(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith(";")]


def test_four_ways_are_shipped() -> None:
    """FastAGI, CURL, AMI-only and the safe legacy file: one context file each."""
    assert [path.stem for path in FILES] == [
        "avr-callerid-agi", "avr-callerid-ami", "avr-callerid-curl", "avr-callerid-legacy"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_context_is_a_gosub_that_sets_uuid(path: Path) -> None:
    """Each file is one context named like the file, a subroutine that sets UUID and returns."""
    lines = lines_of(path)
    assert lines[0] == f"[{path.stem}]"
    assert lines[1].startswith("exten => s,1,") and all(line.startswith("same => n,") for line in lines[2:])
    assert lines[-1].endswith("Return()")
    body = "\n".join(lines)
    assert "Set(UUID=${UUID()})" in body
    for line in lines[1:]:
        application = re.sub(r"^(?:exten => s,1,|same => n,)", "", line)
        assert application.count("(") == application.count(")"), line
        assert application.count("${") == application.count("}") == application.count("{"), line


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_no_shell(path: Path) -> None:
    """Nothing shipped hands caller data to a shell."""
    assert not re.search(r"\b(SHELL|System|TrySystem)\s*\(", "\n".join(lines_of(path)), re.IGNORECASE)


def test_agi_script_name_matches_server() -> None:
    """The AGI line asks for the script the FastAGI server serves."""
    assert f"/{SCRIPT}," in (DIALPLAN / "avr-callerid-agi.conf").read_text()


def test_curl_fields_are_what_call_parses() -> None:
    """The CURL() form, with the dialplan's functions evaluated, is a capture the proxy accepts."""
    line = next(line for line in lines_of(DIALPLAN / "avr-callerid-curl.conf") if "CURL(" in line)
    form = line.split("/call,", 1)[1].rsplit(")})", 1)[0]
    values = {"${UUID}": "4612dcbb-064e-4d3f-b752-0e2053645bfa",
              "${URIENCODE(${CALLERID(num)})}": "%2B593987654321", "${URIENCODE(${CALLERID(name)})}": "Juan%20Perez",
              "${CALLERID(num-pres)}": "allowed_not_screened", "${URIENCODE(${CALLERID(dnid)})}": "5551000"}
    for expression, value in values.items():
        form = form.replace(expression, value)
    assert "$" not in form
    record = parse_call("application/x-www-form-urlencoded", form.encode(), "EC")
    assert record.caller.e164 == "+593987654321" and record.caller.name == "Juan Perez"
    assert record.called_number == "5551000" and record.caller.presentation == "allowed"
