"""privacy.py and the logging chain: numbers are masked wherever they appear."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.observability import Logfmt, RedactNumbers
from avr_llm_proxy.privacy import hash_number, mask_number, number_redactor, scrub_text


def test_mask_keeps_country_code_and_last_four() -> None:
    """The documented example, and national numbers without a country code."""
    assert mask_number("+593987654321") == "+593*****4321"
    assert mask_number("+14155550123") == "+1******0123"
    assert mask_number("0987654321") == "******4321"
    assert mask_number("101") == "***"


def test_hash_is_stable_and_keyed() -> None:
    """The same number gives the same token under one key and another under a different key."""
    assert hash_number("+593987654321", b"k" * 16) == hash_number("+593987654321", b"k" * 16)
    assert hash_number("+593987654321", b"k" * 16) != hash_number("+593987654321", b"j" * 16)
    assert "987654321" not in hash_number("+593987654321", b"k" * 16)


def test_scrub_finds_numbers_in_free_text() -> None:
    """A number inside an exception message or a dump is masked too."""
    assert scrub_text("llamada de +593 98 765 4321 fallida", mask_number) == "llamada de +593*****4321 fallida"


def test_processor_masks_every_field_but_identifiers() -> None:
    """The chain's processor masks number fields and free text, and leaves uuids alone."""
    processor = RedactNumbers("masked", b"")
    event = processor(
        None, "info",
        {"event": "turn", "uuid": "1795483111.1", "caller_number": "+593987654321", "detail": "from 0987654321"},
    )
    assert event == {"event": "turn", "uuid": "1795483111.1", "caller_number": "+593*****4321",
                     "detail": "from ******4321"}


def test_full_policy_keeps_numbers() -> None:
    """LOG_NUMBERS=full is the operator's explicit choice."""
    assert number_redactor("full", b"")("+593987654321") == "+593987654321"
    event = RedactNumbers("full", b"")(None, "info", {"caller_number": "+593987654321"})
    assert event["caller_number"] == "+593987654321"


def test_exceptions_are_scrubbed(logs) -> None:  # type: ignore[no-untyped-def]
    """A traceback carrying a number is masked before it is rendered."""
    log = structlog.get_logger("test")
    try:
        raise ValueError("bad caller +593987654321")
    except ValueError:
        log.exception("boom")
    rendered = "\n".join(logs())
    assert "boom" in rendered and "+593987654321" not in rendered and "+593*****4321" in rendered


def test_addresses_and_uniqueids_are_not_numbers() -> None:
    """IPv4 addresses and Asterisk uniqueids stay readable; the phone number next to them does not."""
    text = "client 10.20.30.40 uniqueid 1770758888.32 listen 127.0.0.1:4573 caller 0987654321"
    assert scrub_text(text, mask_number) == text.replace("0987654321", "******4321")


KEYS = st.text(alphabet=st.sampled_from("abcz_09= \t\x00é"), min_size=1, max_size=8) | st.sampled_from(
    Logfmt.LEADING_KEYS)
VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.sampled_from(
    ['a "b" c', "a\\b c", "x=y", "line\nbreak", "\\", ""])


@given(st.dictionaries(KEYS, VALUES, max_size=12))
def test_logfmt_renders_as_structlogs_renderer(event: dict[str, Any]) -> None:
    """The line renderer is structlog's LogfmtRenderer, made faster: the same line for any event, the
    same error for a key it cannot render."""
    ours = Logfmt()
    theirs = structlog.processors.LogfmtRenderer(key_order=list(Logfmt.LEADING_KEYS), drop_missing=True,
                                                 bool_as_flag=False)  # as configured before
    try:
        expected = theirs(None, "info", dict(event))
    except ValueError as exc:
        with pytest.raises(ValueError, match="Invalid key") as raised:
            ours(None, "info", dict(event))
        assert str(raised.value) == str(exc)
        return
    assert ours(None, "info", dict(event)) == expected
    assert ours(None, "info", dict(event)) == expected  # the key now known
