"""How a caller's number may appear outside the call: masked, keyed-hashed or (by choice) in full."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Literal

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

NumberPolicy = Literal["masked", "hash", "full"]

# Runs of 5+ digits, optionally with a leading + and separators, are treated as phone numbers.
NUMBER_PATTERN = re.compile(r"\+?\d(?:[\s().-]?\d){4,}")


def mask_number(number: str) -> str:
    """Keep the country code and last 4 digits: `+593987654321` -> `+593*****4321`."""
    digits = "".join(ch for ch in number if ch.isdigit())
    if len(digits) <= 4:
        return "*" * len(digits)
    code = _country_code(digits) if number.lstrip().startswith("+") else ""
    hidden = len(digits) - 4 - len(code)
    prefix = "+" + code if number.lstrip().startswith("+") else ""
    if hidden < 1:
        return prefix + "*" * (len(digits) - len(code))
    return prefix + "*" * hidden + digits[-4:]


def _country_code(digits: str) -> str:
    for size in (1, 2, 3):
        if int(digits[:size] or 0) in COUNTRY_CODE_TO_REGION_CODE:
            return digits[:size]
    return ""


def hash_number(number: str, key: bytes) -> str:
    """A keyed hash that follows one caller across calls without revealing the number."""
    digits = "".join(ch for ch in number if ch.isdigit() or ch == "+")
    return "h:" + hmac.new(key, digits.encode(), hashlib.sha256).hexdigest()[:16]


def number_redactor(policy: NumberPolicy, key: bytes) -> Callable[[str], str]:
    """The function that turns one number into what the logs may show under `policy`."""
    if policy == "full":
        return lambda number: number
    if policy == "hash":
        return lambda number: hash_number(number, key)
    return mask_number


# Digit runs that are not phone numbers: IPv4 addresses and Asterisk uniqueids (`1770758888.32`).
_NOT_A_NUMBER = re.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}|\d{9,10}\.\d{1,6})$")


def scrub_text(text: str, redact: Callable[[str], str]) -> str:
    """Redact every number-like run inside free text (messages, exceptions, dumps)."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        return found if _NOT_A_NUMBER.match(found) else redact(found)

    return NUMBER_PATTERN.sub(replace, text)
