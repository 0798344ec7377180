"""identity.py: presentation honoured, withheld numbers never leave, numbers normalised."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.identity import clean_name, dialled_number, parse_caller, parse_presentation, parse_trust

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


# (spelling, region, caller_number as e164, as national, valid) — Ecuador first, then other regions.
SPELLINGS = [
    ("+593987654321", "EC", "+593987654321", "0987654321", True),
    ("593987654321", "EC", "+593987654321", "0987654321", True),
    ("0987654321", "EC", "+593987654321", "0987654321", True),
    ("987654321", "EC", "+593987654321", "0987654321", True),
    ("00593987654321", "EC", "+593987654321", "0987654321", True),
    ("+593 98 765 4321", "EC", "+593987654321", "0987654321", True),
    ("098-765-4321", "EC", "+593987654321", "0987654321", True),
    ("098.765.4321", "EC", "+593987654321", "0987654321", True),
    ("(098) 765 4321", "EC", "+593987654321", "0987654321", True),
    ("  0987654321  ", "EC", "+593987654321", "0987654321", True),
    ("(02) 234-5678", "EC", "+59322345678", "022345678", True),
    ("022345678", "EC", "+59322345678", "022345678", True),
    ("+59322345678", "EC", "+59322345678", "022345678", True),
    ("tel:+593987654321", "EC", "+593987654321", "0987654321", True),
    ("tel:+593-98-765-4321;ext=12", "EC", "+593987654321", "0987654321", True),
    ("sip:+593987654321@pbx.example.com", "EC", "+593987654321", "0987654321", True),
    ("sip:0987654321@10.0.0.1;user=phone", "EC", "+593987654321", "0987654321", True),
    ("<sip:0987654321@pbx>", "EC", "+593987654321", "0987654321", True),
    ("0987654321x123", "EC", "+593987654321", "0987654321", True),
    ("٠٩٨٧٦٥٤٣٢١", "EC", "+593987654321", "0987654321", True),
    ("０９８７６５４３２１", "EC", "+593987654321", "0987654321", True),
    ("0987\u200b654321", "EC", "+593987654321", "0987654321", True),
    ("😀0987654321", "EC", "+593987654321", "0987654321", True),
    ("+593987654321;rm -rf /", "EC", "+593987654321", "0987654321", True),
    ("+34612345678", "EC", "+34612345678", "612345678", True),
    ("0034612345678", "EC", "+34612345678", "612345678", True),
    ("612345678", "ES", "+34612345678", "612345678", True),
    ("+34 612 34 56 78", "ES", "+34612345678", "612345678", True),
    ("+14155550123", "EC", "+14155550123", "4155550123", True),
    ("(415) 555-0123", "US", "+14155550123", "4155550123", True),
    ("1-415-555-0123", "US", "+14155550123", "4155550123", True),
    ("1-800-FLOWERS", "US", "+18003569377", "8003569377", True),
    ("+44 20 7946 0958", "EC", "+442079460958", "02079460958", True),
    ("020 7946 0958", "GB", "+442079460958", "02079460958", True),
    ("+57 301 2345678", "EC", "+573012345678", "3012345678", True),
    ("3012345678", "CO", "+573012345678", "3012345678", True),
    ("101", "EC", "101", "101", False),
    ("1234", "EC", "1234", "1234", False),
    ("911", "EC", "911", "911", False),
    ("*98", "EC", "*98", "*98", False),
    ("ABC", "EC", "ABC", "ABC", False),
    ("00", "EC", "00", "00", False),
    ("0987654321000000000000000000000000000000", "EC", "09876543210000000000000000000000",
     "09876543210000000000000000000000", False),
    ("+", "EC", "unknown", "unknown", False),
    ("", "EC", "unknown", "unknown", False),
    ("<unknown>", "EC", "unknown", "unknown", False),
    ("anonymous", "EC", "anonymous", "anonymous", False),
    ("+266696687", "EC", "anonymous", "anonymous", False),
    ("0000000000", "EC", "anonymous", "anonymous", False),
]


@pytest.mark.parametrize(("spelling", "region", "e164", "national", "valid"), SPELLINGS)
def test_number_spellings(spelling: str, region: str, e164: str, national: str, valid: bool) -> None:
    """International, national, trunk and 00 prefixes, separators, URIs, extensions, letters, other scripts."""
    caller = parse_caller(spelling, source="http", region=region)
    assert (caller.caller_number("e164"), caller.caller_number("national"), caller.valid) == (e164, national, valid)
    if not valid and caller.presentation == "allowed":
        assert caller.caller_number("raw") == caller.raw == e164


def test_raw_format_keeps_the_given_spelling() -> None:
    """NUMBER_FORMAT=raw forwards the sanitised number as captured."""
    assert parse_caller("098-765-4321", source="http").caller_number("raw") == "0987654321"
    assert parse_caller("+593 98 765 4321", source="http").caller_number("raw") == "+593987654321"


@given(st.text(max_size=200), st.sampled_from(["e164", "national", "raw"]), st.sampled_from(["EC", "ES", "US", "GB"]))
def test_caller_number_is_always_one_of_the_documented_values(text: str, fmt: str, region: str) -> None:
    """Whatever the input, caller_number is E.164, the chosen format, a placeholder or the sanitised raw value."""
    caller = parse_caller(text, source="http", region=region)
    value = caller.caller_number(fmt)  # type: ignore[arg-type]
    allowed = {"anonymous", "unknown", caller.e164, caller.national, caller.raw}
    assert value in allowed and value.isprintable() and len(value) <= 32
    if caller.presentation != "allowed":
        assert caller.raw is None and caller.e164 is None
    if caller.presentation == "withheld":
        assert caller.name is None


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [(("5551000",), "5551000"), (("+593987654321",), "+593987654321"), (("*97",), "*97"), (("#31#100",), "#31#100"),
     ((5551000,), "5551000"), ((" 555-1000 ",), "5551000"), (("tel:+5551000",), "+5551000"),
     (("5551000;rm -rf /",), "5551000"), (("٥٥٥١٠٠٠",), "5551000"),
     (("s", "5551000"), "5551000"), (("unknown", "", None, "s", "5552000"), "5552000"),
     (("5551000", "5552000"), "5551000"), (("alice", "arg2", "5551000"), "5551000"),
     (("s",), None), (("unknown",), None), (("",), None), ((None,), None), ((), None), (("*",), None),
     (("#",), None), (("++5551000",), None), (("555a1000",), None), (("<unknown>",), None)],
)
def test_dialled_number(candidates: tuple[object, ...], expected: str | None) -> None:
    """The first candidate made of digits (with `+`, `*`, `#`), sanitised; words Asterisk puts there are skipped."""
    assert dialled_number(*candidates) == expected


@pytest.mark.parametrize(("verstat", "attestation", "result", "expected"), [
    ("TN-Validation-Passed", None, None, ("TN-Validation-Passed", None, True)),
    ('"Juan" <sip:+15551234567;verstat=TN-Validation-Passed@carrier.example;user=phone>', None, None,
     ("TN-Validation-Passed", None, True)),
    ("<sip:+15551234567@carrier.example;user=phone;verstat=TN-Validation-Failed>", None, None,
     ("TN-Validation-Failed", None, False)),
    ("<tel:+15551234567;verstat=No-TN-Validation>", None, None, ("No-TN-Validation", None, None)),
    ("TN-Validation-Passed-B", None, None, ("TN-Validation-Passed-B", None, None)),
    (None, "A", "success", (None, "A", True)),
    (None, "b", "success", (None, "B", None)),
    (None, "A", "signature_validation", (None, "A", False)),
    ("TN-Validation-Passed", "A", "signature_validation", ("TN-Validation-Passed", "A", False)),
    ("<sip:+1555@x>", "Z", None, (None, None, None)),
    ("verstat=$(reboot)", "A; rm -rf /", "success\r\nX: y", (None, None, None)),
    (None, None, None, (None, None, None)),
])
def test_trust_from_what_the_network_asserted(verstat: str | None, attestation: str | None, result: str | None,
                                              expected: tuple[str | None, str | None, bool | None]) -> None:
    """verstat from a bare value or a header; verified only for TN-Validation-Passed or a passed
    verification at attestation A, false for any failure, null otherwise; junk is dropped."""
    trust = parse_trust(verstat, attestation, result)
    assert (trust.verstat, trust.attestation, trust.verified) == expected
