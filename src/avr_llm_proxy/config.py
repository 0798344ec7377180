"""Every setting of avr-llm-proxy, typed, from the environment and an optional .env file.

This is the one module that reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal
from urllib.parse import SplitResult, urlsplit

import phonenumbers
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .extensions import Destinations, parse_destinations
from .privacy import parse_keys
from .speech import sentences

_DIALABLE = re.compile(r"^\+?[0-9]{2,20}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTEXT = re.compile(r"[A-Za-z0-9_-]{1,79}")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DEFAULT_FALLBACK = "Disculpe, en este momento no puedo responder. Por favor, intente de nuevo en unos minutos."


class SettingsError(Exception):
    """A setting has a value we cannot run with; the message names it and what is accepted."""


def _split(value: str) -> SplitResult | None:
    """The URL's parts, or None when urllib cannot read them (its errors quote the URL, password included)."""
    try:
        parts = urlsplit(value)
        return parts if parts.port is None or parts.port > 0 else None
    except ValueError:
        return None


def without_credentials(url: str) -> str:
    """`url` for a message, with whatever stands between its scheme and its last `@` (user:password) as `***`.

    The last `@`, not the end of the host part: a password holding an unencoded `/` or `@` goes whole too.
    """
    if "@" not in url:
        return url
    scheme = _SCHEME.match(url)
    return f"{scheme.group() if scheme else ''}***@{url.rpartition('@')[2]}"


class Settings(BaseSettings):
    """The settings table of the README, one field each; a secret is a field with `repr=False`."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    host: str = Field("127.0.0.1", validation_alias="HOST", description="HTTP listen address")
    port: int = Field(6017, ge=1, le=65535, validation_alias="PORT", description="HTTP listen port")
    api_url: str = Field(
        "",
        validation_alias=AliasChoices("API_URL", "CLIPP_API_URL"),
        description="business API that receives each turn; empty: the built-in demo API",
    )
    bot_phone: str = Field(
        "593985059132",
        validation_alias=AliasChoices("BOT_PHONE", "CLIPP_PHONE"),
        max_length=64,
        description="the bot's own number, sent as `phone`",
    )
    bot_phone_map: str = Field(
        "", validation_alias="BOT_PHONE_MAP", description="DID=phone pairs: which bot number answers which DID"
    )
    store_url: str = Field(
        "sqlite:///avr-llm-proxy.db",
        validation_alias="STORE_URL",
        description="memory://, sqlite:///path",
    )
    store_timeout_ms: int = Field(1000, ge=50, le=30_000, validation_alias="STORE_TIMEOUT_MS",
                                  description="deadline of one store operation")
    history_days: int = Field(0, ge=0, le=3650, validation_alias="HISTORY_DAYS",
                              description="days a caller's earlier calls are kept (0: not kept)")
    caller_ttl_seconds: int = Field(3600, ge=60, le=7 * 86400, validation_alias="CALLER_TTL_SECONDS")
    caller_wait_ms: int = Field(500, ge=0, le=10_000, validation_alias="CALLER_WAIT_MS")
    default_region: str = Field("EC", validation_alias="DEFAULT_REGION")
    number_format: Literal["e164", "national", "raw"] = Field("e164", validation_alias="NUMBER_FORMAT")
    agi_listen: str = Field("127.0.0.1:4573", validation_alias="AGI_LISTEN")
    ami_url: str = Field("", validation_alias="AMI_URL")
    callerid_dir: str = Field("/tmp", validation_alias="CALLERID_DIR")
    api_timeout_ms: int = Field(8000, ge=100, le=120_000, validation_alias="API_TIMEOUT_MS")
    api_connect_timeout_ms: int = Field(1000, ge=50, le=60_000, validation_alias="API_CONNECT_TIMEOUT_MS")
    api_first_byte_timeout_ms: int = Field(6000, ge=50, le=120_000, validation_alias="API_FIRST_BYTE_TIMEOUT_MS")
    breaker_failures: int = Field(5, ge=1, le=1000, validation_alias="BREAKER_FAILURES")
    breaker_cooldown_ms: int = Field(10_000, ge=100, le=600_000, validation_alias="BREAKER_COOLDOWN_MS")
    keep_stale_turns: bool = Field(False, validation_alias="KEEP_STALE_TURNS")
    filler_after_ms: int = Field(0, ge=0, le=60_000, validation_alias="FILLER_AFTER_MS")
    filler_message: str = Field("Un momento, por favor.", min_length=1, max_length=200,
                                validation_alias="FILLER_MESSAGE")
    upstream: Literal["api", "openai"] = Field("api", validation_alias="UPSTREAM")
    openai_base_url: str = Field("https://api.openai.com/v1", validation_alias="OPENAI_BASE_URL")
    openai_api_key: str = Field("", validation_alias="OPENAI_API_KEY", repr=False)
    openai_model: str = Field("gpt-4o-mini", min_length=1, max_length=200, validation_alias="OPENAI_MODEL")
    system_prompt: str = Field(
        "You are a friendly phone assistant. The caller's number is {caller_number} and their name is "
        "{caller_name}. Answer briefly, in the caller's language, in plain sentences without markdown.",
        min_length=1, max_length=20_000, validation_alias="SYSTEM_PROMPT",
    )
    fallback_message: str = Field(DEFAULT_FALLBACK, min_length=1, max_length=500, validation_alias="FALLBACK_MESSAGE")
    log_numbers: Literal["masked", "hash", "full"] = Field("masked", validation_alias="LOG_NUMBERS")
    hash_key: str = Field("", validation_alias="HASH_KEY", repr=False)
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", validation_alias="LOG_LEVEL")
    debug_token: str = Field("", validation_alias="DEBUG_TOKEN", repr=False)
    encryption_key: str = Field("", validation_alias="ENCRYPTION_KEY", repr=False)
    trusted_networks: str = Field(
        "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7", validation_alias="TRUSTED_NETWORKS"
    )
    capture_token: str = Field("", validation_alias="CAPTURE_TOKEN", repr=False)
    api_token: str = Field("", validation_alias="API_TOKEN", repr=False)
    api_signing_secret: str = Field("", validation_alias="API_SIGNING_SECRET", repr=False)
    webhook_secret: str = Field("", validation_alias="WEBHOOK_SECRET", repr=False)
    events_url: str = Field("", validation_alias="EVENTS_URL")
    lookup_url: str = Field("", validation_alias="LOOKUP_URL", description="CRM lookup, once per call")
    lookup_timeout_ms: int = Field(800, ge=50, le=10_000, validation_alias="LOOKUP_TIMEOUT_MS")
    callerid_file_owners: str = Field("", validation_alias="CALLERID_FILE_OWNERS")
    transfer_allow: str = Field("", validation_alias="TRANSFER_ALLOW",
                                description="extensions and patterns a caller may be transferred to")
    transfer_context: str = Field("avr-transfer", validation_alias="TRANSFER_CONTEXT")
    action_delay_ms: int = Field(0, ge=0, le=60_000, validation_alias="ACTION_DELAY_MS",
                                 description="wait before a call action (0: the estimated speaking time)")
    speech_chars_per_second: float = Field(14.0, gt=0, le=100, validation_alias="SPEECH_CHARS_PER_SECOND")
    call_control: Literal["off", "on"] = Field("off", validation_alias="CALL_CONTROL")
    console: Literal["on", "off"] = Field("on", validation_alias="CONSOLE",
                                          description="the operator console, and each turn kept for its timeline")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576, validation_alias="MAX_BODY_BYTES")

    @field_validator("api_url", "openai_base_url", "events_url", "lookup_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = _split(value)
        if value and (parts is None or parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError("must be an http:// or https:// URL with a host, or empty for the built-in demo API")
        return value

    @field_validator("bot_phone_map")
    @classmethod
    def _phone_map(cls, value: str) -> str:
        for pair in filter(None, (part.strip() for part in value.split(","))):
            did, sep, phone = pair.partition("=")
            if not sep or not _DIALABLE.match(did.strip()) or not _DIALABLE.match(phone.strip()):
                raise ValueError("must be comma-separated DID=phone pairs of digits, e.g. 5551000=593985059132")
        return value

    @field_validator("fallback_message", "filler_message")
    @classmethod
    def _speakable(cls, value: str) -> str:
        if not sentences(value):
            raise ValueError("must contain words to speak (the caller hears it)")
        return value

    @field_validator("store_url")
    @classmethod
    def _store_scheme(cls, value: str) -> str:
        if value == "memory://" or (value.startswith("sqlite:///") and len(value) > len("sqlite:///")):
            return value
        parts = _split(value)
        if value.startswith(("redis://", "rediss://")) and parts is not None and parts.hostname:
            return value
        raise ValueError("must be memory://, sqlite:///<path> or redis://host:port/db")

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("must be a two-letter region phonenumbers knows, e.g. EC, ES, US")
        return region

    @field_validator("agi_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port (e.g. 127.0.0.1:4573), or empty to disable")
        return value

    @field_validator("hash_key")
    @classmethod
    def _hash_key(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("must be a secret of 16 or more characters")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _encryption_key(cls, value: str) -> str:
        if value:
            parse_keys(value)
        return value

    @field_validator("api_token", "openai_api_key", "capture_token")
    @classmethod
    def _header_value(cls, value: str) -> str:
        """These go out in an Authorization header (CAPTURE_TOKEN from `simulate`): a CR or LF would add headers."""
        if _CONTROL.search(value):
            raise ValueError("must not contain CR, LF or other control characters (it is sent in an HTTP header)")
        return value

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in filter(None, (item.strip() for item in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not a network; use CIDRs like 10.0.0.0/8") from None
        return value

    @field_validator("callerid_file_owners")
    @classmethod
    def _owners(cls, value: str) -> str:
        for part in filter(None, (item.strip() for item in value.split(","))):
            if not part.isdigit():
                raise ValueError("must be comma-separated numeric user ids, e.g. 0,1000")
        return value

    @model_validator(mode="after")
    def _shared_store_needs_key(self) -> Settings:
        if self.store_url.startswith(("redis://", "rediss://")) and not self.encryption_key:
            raise ValueError("STORE_URL=redis://… needs ENCRYPTION_KEY, the same on every replica "
                             "(openssl rand -base64 32): records in Redis are sealed with it")
        return self

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(part.strip(), strict=False)
                for part in self.trusted_networks.split(",") if part.strip()]

    @property
    def file_owners(self) -> frozenset[int]:
        """Users whose legacy caller files are trusted: CALLERID_FILE_OWNERS, else root and this process."""
        given = {int(part) for part in self.callerid_file_owners.split(",") if part.strip()}
        return frozenset(given or {0, os.getuid()})

    @field_validator("transfer_allow")
    @classmethod
    def _destinations(cls, value: str) -> str:
        parse_destinations(value)
        return value

    @field_validator("transfer_context")
    @classmethod
    def _context(cls, value: str) -> str:
        if not _CONTEXT.fullmatch(value):
            raise ValueError("must be a dialplan context name: letters, digits, - and _ (at most 79)")
        return value

    @property
    def destinations(self) -> Destinations:
        return parse_destinations(self.transfer_allow)

    @field_validator("ami_url")
    @classmethod
    def _ami(cls, value: str) -> str:
        if value:
            parts = _split(value)
            if (parts is None or parts.scheme != "ami" or not parts.hostname or not parts.username
                    or parts.password is None):
                raise ValueError("must look like ami://user:secret@host:5038, or be empty to disable")
        return value

    @property
    def bot_phones(self) -> dict[str, str]:
        """BOT_PHONE_MAP as DID digits -> bot phone."""
        pairs = (part.partition("=") for part in self.bot_phone_map.split(",") if part.strip())
        return {did.strip().lstrip("+"): phone.strip() for did, _, phone in pairs}

    @property
    def sqlite_path(self) -> str | None:
        """The database path when the store is SQLite."""
        return self.store_url.removeprefix("sqlite:///") if self.store_url.startswith("sqlite:///") else None


# What an error may show of a value: nothing of a secret, a URL only without its credentials.
SECRET_SETTINGS = frozenset(name for name, field in Settings.model_fields.items() if not field.repr)
URL_SETTINGS = frozenset(name for name in Settings.model_fields if name.endswith("_url"))


def _env_names(field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    return [str(choice) for choice in alias.choices] if isinstance(alias, AliasChoices) else [str(alias)]


def _described(loc: tuple[int | str, ...], given: object) -> str:
    """`setting NAME (got 'value')` for an error at `loc`, the value shown only as far as it is no secret."""
    if not loc:
        return "settings"
    for name, field in Settings.model_fields.items():
        names = _env_names(field)
        if str(loc[0]) in (name, *names):
            label = "setting " + names[0] + "".join(f" (or {other})" for other in names[1:])
            if name in SECRET_SETTINGS:
                return f"{label} (value hidden)"
            shown = without_credentials(str(given)) if name in URL_SETTINGS else str(given)
            return f"{label} (got {shown[:60]!r})"
    return f"setting {loc[0]}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation error into one line that names the setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"invalid {_described(first['loc'], first.get('input'))}: {message}") from None
