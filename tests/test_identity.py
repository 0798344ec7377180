"""identity.py: presentation honoured, withheld numbers never leave, numbers normalised."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.identity import clean_name, parse_caller, parse_presentation

from .conftest import FIXTURES

PRESENTATION = json.loads((FIXTURES / "presentation.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", PRESENTATION["cases"], ids=lambda c: c["case"][:40])
def test_presentation_cases_from_real_asterisk(case: dict[str, object]) -> None:
    """Each case Asterisk 22 showed ends in the expected outcome, from the dialplan's num-pres and from AGI."""
    expected = case["expect"]
    by_pres = parse_caller(case["num"], case["name"], case["num_pres"], source="http")
    assert by_pres.presentation == expected
    if case["agi_callingpres"] is not None:
        number = case.get("agi_callerid", case["num"])
        by_agi = parse_caller(number, case["name"], case["agi_callingpres"], source="agi")
        assert by_agi.presentation == expected
    if expected != "allowed":
        assert by_pres.raw is None and by_pres.e164 is None
        assert by_pres.caller_number("e164") in ("anonymous", "unknown")


@pytest.mark.parametrize("spelling", PRESENTATION["other_withheld_spellings_seen_in_the_field"])
def test_field_spellings_never_become_numbers(spelling: str) -> None:
    """Every withheld spelling seen in the field is "anonymous" or "unknown", one spelling each."""
    caller = parse_caller(spelling, source="http")
    assert caller.presentation in ("withheld", "unavailable")
    assert caller.caller_number("raw") == ("anonymous" if caller.presentation == "withheld" else "unknown")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "allowed"), ("35", "withheld"), (32, "withheld"), (67, "unavailable"), ("prohib", "withheld"),
     ("allowed_not_screened", "allowed"), ("0 (Presentation Allowed, Not Screened)", "allowed"),
     ("unavailable", "unavailable"), ("", None), (None, None), ("garbage", None)],
)
def test_presentation_parsing(value: object, expected: str | None) -> None:
    """AGI codes, num-pres names and AMI's `<int> (<text>)` all map to one presentation."""
    assert parse_presentation(value) == expected


@pytest.mark.parametrize(
    ("raw", "e164", "national"),
    [("+593987654321", "+593987654321", "0987654321"), ("0987654321", "+593987654321", "0987654321"),
     ("987654321", "+593987654321", "0987654321"), ("00593987654321", "+593987654321", "0987654321"),
     ("tel:+593-98-765-4321", "+593987654321", "0987654321"), ("+34 612 34 56 78", "+34612345678", "612345678")],
)
def test_number_forms(raw: str, e164: str, national: str) -> None:
    """The spellings the seed lists all become one E.164 number."""
    caller = parse_caller(raw, source="http", region="EC")
    assert caller.valid and caller.e164 == e164 and caller.national == national
    assert caller.caller_number("e164") == e164 and caller.caller_number("national") == national


def test_invalid_numbers_are_forwarded_raw_and_marked() -> None:
    """An extension like 101 is neither dropped nor mangled: raw, marked not valid."""
    caller = parse_caller("101", source="http")
    assert caller.presentation == "allowed" and not caller.valid
    assert caller.caller_number("e164") == "101"


def test_names_are_cleaned() -> None:
    """Placeholders and number-only names become None; control characters and length are cut."""
    assert clean_name("  Juan\x00 Perez\n ", None) == "Juan Perez"
    assert clean_name("Anonymous", None) is None
    assert clean_name("CID:0987654321", None) is None
    assert clean_name("0987654321", "0987654321") is None
    assert clean_name("x" * 500, None) == "x" * 64


@given(st.text(max_size=300), st.text(max_size=100), st.one_of(st.none(), st.text(max_size=20), st.integers()))
def test_no_input_crashes_or_escapes(number: str, name: str, pres: object) -> None:
    """Any string yields a caller whose caller_number is a placeholder, E.164 or a sanitised raw value."""
    caller = parse_caller(number, name, pres, source="http")
    value = caller.caller_number("e164")
    assert value in ("anonymous", "unknown") or value == caller.e164 or value == caller.raw
    assert len(value) <= 32 and value.isprintable() and " " not in value
