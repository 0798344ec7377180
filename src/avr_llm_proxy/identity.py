"""Who is calling: one `CallerId` from whatever Asterisk, avr-core or a dialplan gave us.

Asterisk never hides a withheld number from applications (presentation.json), so this is the
place that honours presentation: a withheld caller leaves here without number or name.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import phonenumbers

Presentation = Literal["allowed", "withheld", "unavailable"]
NumberFormat = Literal["e164", "national", "raw"]

WITHHELD = "anonymous"
NO_NUMBER = "unknown"
MAX_RAW_LENGTH = 32
MAX_NAME_LENGTH = 64

# Spellings seen in the field for "no number" (WIRE.md section 6); everything else listed there is withheld.
_UNAVAILABLE_SPELLINGS = frozenset({"", "unknown", "<unknown>", "unavailable", "none", "null", "n/a"})
_WITHHELD_SPELLINGS = frozenset(
    {"anonymous", "restricted", "private", "blocked", "withheld", "privado", "anonimo", "anónimo",
     "266696687", "+266696687", "presentation restricted"}
)
_NAME_PLACEHOLDERS = _UNAVAILABLE_SPELLINGS | _WITHHELD_SPELLINGS | {"anonymous caller", "unknown caller"}
_PRES_CODE = re.compile(r"^\s*(\d{1,3})\b")
_URI_PREFIX = re.compile(r"^(?:tel|sips?):", re.IGNORECASE)
_RAW_KEEP = re.compile(r"[^0-9A-Za-z+*#]")
_DIALLED = re.compile(r"^\+?[0-9*#]*[0-9][0-9*#]*$")
_NUMBER_TYPES = {value: name.lower() for name, value in vars(phonenumbers.PhoneNumberType).items()
                 if name.isupper()}


@dataclass(frozen=True, slots=True)
class CallerId:
    """A caller as the business API may see it; `raw` and the number forms are None unless allowed."""

    presentation: Presentation
    source: str
    raw: str | None = None
    e164: str | None = None
    national: str | None = None
    name: str | None = None
    valid: bool = False
    number_type: str | None = None
    region: str | None = None

    def caller_number(self, number_format: NumberFormat) -> str:
        """The `caller_number` payload value: one spelling for withheld, one for missing."""
        if self.presentation == "withheld":
            return WITHHELD
        if self.presentation == "unavailable" or not self.raw:
            return NO_NUMBER
        if self.valid and number_format == "e164" and self.e164:
            return self.e164
        if self.valid and number_format == "national" and self.national:
            return self.national
        return self.raw

    @property
    def loggable_number(self) -> str | None:
        """The number the logging chain may redact and show; None when there is none to show."""
        return (self.e164 or self.raw) if self.presentation == "allowed" else None

    @property
    def log_number(self) -> str:
        """The value a log line or /debug shows (redacted later): the number, or its placeholder."""
        return self.loggable_number or self.caller_number("raw")

    def shown(self, redact: Callable[[str], str]) -> str:
        """What an operator's view shows (`calls`, /debug, the console): the number as LOG_NUMBERS
        redacts it, or its placeholder (`anonymous`, `unknown`) as it is."""
        return redact(self.log_number) if self.loggable_number else self.log_number

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallerId:
        return cls(**{key: data.get(key) for key in cls.__slots__ if key in data})  # type: ignore[arg-type]


UNKNOWN_CALLER = CallerId(presentation="unavailable", source="none")

_VERSTAT = re.compile(r"(?:^|[;?&\s])verstat=([A-Za-z0-9-]{1,40})", re.IGNORECASE)
_VERSTAT_VALUE = re.compile(r"^[A-Za-z0-9-]{1,40}$")
# res_stir_shaken's verify_result for a verified identity: `success` (Asterisk 20.7+), older wordings.
_VERIFY_PASSED = frozenset({"success", "verification successful", "verification passed", "passed"})


@dataclass(frozen=True, slots=True)
class CallerTrust:
    """What the network asserted about the number: the carrier's `verstat` (P-Asserted-Identity or
    From) and Asterisk's own STIR/SHAKEN verification (attestation level and result)."""

    verstat: str | None = None
    attestation: str | None = None
    verify_result: str | None = None

    @property
    def verified(self) -> bool | None:
        """True only for `TN-Validation-Passed` or a passed verification at attestation A; False for a
        failed one (either); None when nothing was asserted, or only a partial attestation."""
        carrier = (self.verstat or "").lower()
        result = (self.verify_result or "").strip().lower()
        if carrier.startswith("tn-validation-failed") or (result and result not in _VERIFY_PASSED):
            return False
        if carrier == "tn-validation-passed" or (result in _VERIFY_PASSED and self.attestation == "A"):
            return True
        return None

    def as_list(self) -> list[str | None]:
        return [self.verstat, self.attestation, self.verify_result]


NO_TRUST = CallerTrust()


def parse_trust(verstat: object = None, attestation: object = None, verify_result: object = None) -> CallerTrust:
    """The assertion from capture values: `verstat` as a bare value or inside a header (`<sip:+1…;
    verstat=TN-Validation-Passed@…>`, the first found of several), the attestation A, B or C, and the
    verification result as res_stir_shaken words it. Anything else is dropped; never raises."""
    found = None
    for text in (verstat if isinstance(verstat, (list, tuple)) else [verstat]):
        value = _clean(text, 2048)
        match = _VERSTAT.search(value) if "=" in value else _VERSTAT_VALUE.match(value)
        if match:
            found = match.group(match.lastindex or 0)
            break
    level = _clean(attestation, 8).upper()
    result = _clean(verify_result, 64)
    return CallerTrust(found, level if level in ("A", "B", "C") else None,
                       result if result and all(ch.isalnum() or ch in " _-." for ch in result) else None)


def parse_presentation(value: object) -> Presentation | None:
    """Read `agi_callingpres` codes, `CALLERID(num-pres)` names and AMI `CID-CallingPres`."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    code = _PRES_CODE.match(text)
    if code:
        bits = int(code.group(1)) & 0x60
        return "allowed" if bits == 0 else "withheld" if bits == 0x20 else "unavailable"
    if text.startswith("allowed"):
        return "allowed"
    if text.startswith(("prohib", "restricted", "withheld")):
        return "withheld"
    if text.startswith("unavailable"):
        return "unavailable"
    return None


_RANK: dict[Presentation | None, int] = {None: 0, "allowed": 1, "unavailable": 2, "withheld": 3}


def strictest(*values: object) -> Presentation | None:
    """The most private of several presentation readings: a restriction from any source wins."""
    return max((parse_presentation(value) for value in values), key=_RANK.__getitem__, default=None)


def _clean(value: object, limit: int) -> str:
    text = "" if value is None else str(value)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    return " ".join(text.split())[:limit]


def _ascii_digits(text: str) -> str:
    """Digits of any script (Arabic-Indic, full-width, …) as ASCII digits."""
    return "".join(str(unicodedata.digit(ch)) if ch.isdigit() and not ch.isascii() else ch for ch in text)


def sanitize_raw(value: object) -> str:
    """The number as given, reduced to dialable characters: no spaces, no shell metacharacters."""
    text = _ascii_digits(_clean(value, 256))
    text = _URI_PREFIX.sub("", text).split("@", 1)[0].split(";", 1)[0]
    return _RAW_KEEP.sub("", text)[:MAX_RAW_LENGTH]


def dialled_number(*candidates: object) -> str | None:
    """The first candidate that is a dialled number (digits, with `+`, `*`, `#`), reduced as `sanitize_raw`.

    Asterisk fills the dialled-number fields with words where there is none (`s` for a Gosub's
    extension, `unknown` for a Local channel's DNID): those are not numbers anyone dialled.
    """
    for candidate in candidates:
        number = sanitize_raw(candidate)
        if number and _DIALLED.match(number):
            return number
    return None


def _spelling_presentation(text: str) -> Presentation | None:
    lowered = text.strip().lower().strip("<>\"' ")
    if lowered in _UNAVAILABLE_SPELLINGS:
        return "unavailable"
    digits = lowered.lstrip("+")
    if lowered in _WITHHELD_SPELLINGS or (len(digits) >= 6 and set(digits) == {"0"}):
        return "withheld"
    return None


def clean_name(value: object, raw_number: str | None) -> str | None:
    """A displayable name, or None for placeholders and names that are only the number."""
    name = _clean(value, MAX_NAME_LENGTH).strip("\"' ")
    if not name or name.lower() in _NAME_PLACEHOLDERS or name.upper().startswith("CID:"):
        return None
    if raw_number and sanitize_raw(name) == raw_number:
        return None
    if not any(ch.isalpha() for ch in name):
        return None
    return name


def parse_caller(
    number: object,
    name: object = None,
    presentation: object = None,
    *,
    source: str,
    region: str = "EC",
) -> CallerId:
    """Build the caller from raw capture values; never raises on any input."""
    declared = parse_presentation(presentation)
    text = _clean(number, 256)
    spelled = _spelling_presentation(text)
    if declared == "withheld" or spelled == "withheld":
        return CallerId(presentation="withheld", source=source)
    raw = sanitize_raw(text)
    if declared == "unavailable" or spelled == "unavailable" or not raw.strip("+*#"):
        return CallerId(presentation="unavailable", source=source, name=clean_name(name, None))
    caller_name = clean_name(name, raw)
    candidate = "+" + raw[2:] if raw.startswith("00") else raw
    try:
        parsed = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return CallerId(presentation="allowed", source=source, raw=raw, name=caller_name)
    if not phonenumbers.is_valid_number(parsed):
        return CallerId(presentation="allowed", source=source, raw=raw, name=caller_name)
    parsed.extension = None  # "0987654321x123": the extension is not part of the number forms
    national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    return CallerId(
        presentation="allowed",
        source=source,
        raw=raw,
        e164=phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164),
        national="".join(ch for ch in national if ch.isdigit()),
        name=caller_name,
        valid=True,
        number_type=_NUMBER_TYPES.get(phonenumbers.number_type(parsed)),
        region=phonenumbers.region_code_for_number(parsed),
    )
