"""How a caller's number may appear outside the call: masked, keyed-hashed or (by choice) in full."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

NumberPolicy = Literal["masked", "hash", "full"]
KEY_FILE_NAME = "avr-llm-proxy.key"

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


def scrub_text(text: str, redact: Callable[[str], str], pattern: re.Pattern[str] = NUMBER_PATTERN) -> str:
    """Redact every number-like run (`pattern`) inside free text (messages, exceptions, dumps)."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        return found if _NOT_A_NUMBER.match(found) else redact(found)

    return pattern.sub(replace, text)


class SealError(Exception):
    """A sealed value that no configured key opens (wrong key, or damaged data)."""


class Sealer:
    """AES-GCM encryption of stored records, with a key id so keys can be rotated.

    A sealed value is `<key id>:` + 12-byte nonce + ciphertext and tag. The first key seals; every
    key opens, so an old key can stay in the list until its records have expired.
    """

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}
        self._primary_id = keys[0][0]
        self._primary = self._keys[self._primary_id]
        # One number-hash key per encryption key: records tagged under an older key stay erasable.
        self.hash_keys = [hmac.new(key, b"avr-llm-proxy number hash", hashlib.sha256).digest() for _, key in keys]
        self.hash_key = self.hash_keys[0]

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return self._primary_id.encode() + b":" + nonce + self._primary.encrypt(nonce, data, None)

    def open(self, sealed: bytes) -> bytes:
        key_id, sep, rest = sealed.partition(b":")
        cipher = self._keys.get(key_id.decode("ascii", errors="replace")) if sep else None
        if cipher is None or len(rest) < 28:
            raise SealError("no configured key opens this record")
        try:
            return cipher.decrypt(rest[:12], rest[12:], None)
        except InvalidTag:
            raise SealError("record does not decrypt (wrong key or damaged)") from None


def parse_keys(value: str) -> list[tuple[str, bytes]]:
    """ENCRYPTION_KEY: one base64 key of 32 bytes, or comma-separated `id:key` pairs (first seals)."""
    keys = []
    for index, part in enumerate(item.strip() for item in value.split(",") if item.strip()):
        key_id, sep, encoded = part.rpartition(":") if ":" in part else ("", "", part)
        key_id = key_id if sep else str(index)
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {key_id!r} is not base64") from None
        if len(key) != 32:
            raise ValueError(f"key {key_id!r} must be 32 bytes (openssl rand -base64 32)")
        if not key_id.isalnum() or len(key_id) > 16:
            raise ValueError(f"key id {key_id!r} must be 1-16 letters or digits")
        keys.append((key_id, key))
    return keys


def load_or_create_key_file(path: Path) -> tuple[list[tuple[str, bytes]], bool]:
    """The key in `path`, created (mode 0600) if missing; returns the keys and whether it was created.

    Written to a private temporary file and linked into place, so a second process starting at the same
    moment reads either no file or the whole key, never an empty one.
    """
    if path.exists():
        return parse_keys(path.read_text().strip()), False
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("file:" + base64.b64encode(os.urandom(32)).decode() + "\n")
    try:
        os.link(temporary, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        temporary.unlink()
    return parse_keys(path.read_text().strip()), created


@dataclass(frozen=True, slots=True)
class Keys:
    """The process's secrets: the record sealer (durable stores only) and the key for number hashes."""

    sealer: Sealer | None
    hash_key: bytes
    created: Path | None = None
    note: str = ""
    #: Hash keys of older encryption keys, still tried when erasing by number.
    older_hash_keys: tuple[bytes, ...] = ()


def resolve_keys(encryption_key: str, hash_key: str, key_dir: Path | None) -> Keys:
    """ENCRYPTION_KEY, else a key file in `key_dir` (created once, 0600); HASH_KEY, else derived."""
    created = None
    if encryption_key:
        keys = parse_keys(encryption_key)
    elif key_dir is not None:
        keys, fresh = load_or_create_key_file(key_dir / KEY_FILE_NAME)
        created = key_dir / KEY_FILE_NAME if fresh else None
    else:
        keys = []
    sealer = Sealer(keys) if keys else None
    if hash_key:
        return Keys(sealer, hash_key.encode(), created)
    if sealer is not None:
        return Keys(sealer, sealer.hash_key, created, older_hash_keys=tuple(sealer.hash_keys[1:]))
    note = "no HASH_KEY or ENCRYPTION_KEY: number hashes change when the process restarts"
    return Keys(None, os.urandom(32), created, note)
