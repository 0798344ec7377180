"""config.py: typed settings from env and .env, the seed's names, one clear line on a bad value."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from avr_llm_proxy.config import SECRET_SETTINGS, Settings, SettingsError, load_settings, without_credentials


def test_defaults_are_the_documented_ones() -> None:
    """No environment: loopback, port 6017, SQLite store, demo API, masked numbers."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.host, settings.port, settings.api_url) == ("127.0.0.1", 6017, "")
    assert settings.store_url == "sqlite:///avr-llm-proxy.db" and settings.bot_phone == "593985059132"
    assert (settings.caller_wait_ms, settings.caller_ttl_seconds, settings.api_timeout_ms) == (500, 3600, 8000)
    assert settings.log_numbers == "masked" and settings.default_region == "EC" and settings.agi_listen


def test_seed_names_are_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing seed deployment's CLIPP_PHONE and CLIPP_API_URL keep working."""
    monkeypatch.setenv("CLIPP_PHONE", "593900000000")
    monkeypatch.setenv("CLIPP_API_URL", "http://api.example:8080/api/bot")
    settings = load_settings(_env_file=None)
    assert settings.bot_phone == "593900000000" and settings.api_url == "http://api.example:8080/api/bot"


def test_env_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .env file in the working directory is read; the environment wins over it."""
    (tmp_path / ".env").write_text("PORT=7001\nDEFAULT_REGION=es\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "7002")
    settings = load_settings()
    assert settings.port == 7002 and settings.default_region == "ES"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("PORT", "seventy", "PORT"),
        ("STORE_URL", "postgres://x", "memory://, sqlite:///<path> or redis://"),
        ("API_URL", "ftp://x", "http:// or https://"),
        ("NUMBER_FORMAT", "fancy", "e164"),
        ("DEFAULT_REGION", "XX", "two-letter region"),
        ("AGI_LISTEN", "nohost", "host:port"),
        ("CALLER_WAIT_MS", "-1", "CALLER_WAIT_MS"),
        ("HASH_KEY", "short", "16 or more"),
        ("ENCRYPTION_KEY", "not-base64!", "base64"),
        ("ENCRYPTION_KEY", "c2hvcnQ=", "32 bytes"),
        ("TRUSTED_NETWORKS", "10.0.0.0/8,example.com", "CIDR"),
        ("CALLERID_FILE_OWNERS", "asterisk", "numeric"),
        ("BOT_PHONE_MAP", "5551000:593985059132", "DID=phone"),
        ("BOT_PHONE_MAP", "5551000=$(id)", "DID=phone"),
    ],
)
def test_invalid_value_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str) -> None:
    """The error names the setting and what it accepts, on one line."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert "\n" not in message and words in message
    assert name in message


@pytest.mark.parametrize(("name", "value"), [("FALLBACK_MESSAGE", "..."), ("FALLBACK_MESSAGE", "😀"),
                                             ("API_URL", "http://"), ("CLIPP_API_URL", "ftp://x")])
def test_values_that_would_fail_silently_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A fallback with nothing to speak, or an API URL without a host, stops start-up."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert name in str(caught.value)


def test_bot_phone_map_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DID=phone pairs become a map keyed by the DID's digits."""
    monkeypatch.setenv("BOT_PHONE_MAP", " 5551000=593985059132, +5551001=593985059133 ,")
    assert load_settings(_env_file=None).bot_phones == {"5551000": "593985059132", "5551001": "593985059133"}


KEY = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("ENCRYPTION_KEY", "not-base64-SECRETVALUE123", "SECRETVALUE123"),
        ("HASH_KEY", "S3cretPw", "S3cretPw"),
        ("API_TOKEN", "tok-S3cretPw\r\nX-Injected: yes", "S3cretPw"),
        ("AMI_URL", "ami://user:S3cretPw@host:notaport", "S3cretPw"),
        ("STORE_URL", "redis://:S3cretPw@host:bad", "S3cretPw"),
        ("API_URL", "ftp://user:S3cretPw@host", "S3cretPw"),
        ("EVENTS_URL", "http://user:S3c/retPw@host", "S3c"),
    ],
)
def test_invalid_secret_is_named_not_shown(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                           secret: str) -> None:
    """The error names the setting but shows nothing of a secret, and a URL only without user:password@."""
    monkeypatch.setenv("ENCRYPTION_KEY", KEY)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert f"invalid setting {name}" in message and secret not in message
    assert "(value hidden)" in message or "://***@" in message


@pytest.mark.parametrize("name", ["API_TOKEN", "OPENAI_API_KEY", "CAPTURE_TOKEN"])
@pytest.mark.parametrize("value", ["tok\r\nX-Injected: yes", "tok\nX-Injected: yes", "tok\r", "tok\x00", "tok\x7f",
                                   "tok\tx", "tok\x85"])
def test_header_tokens_refuse_control_characters(name: str, value: str) -> None:
    """A token sent in an HTTP header may hold any bearer-token character, but no CR, LF or other control."""
    assert load_settings(_env_file=None, **{name.lower(): "Abc-._~+/ 019="})
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, **{name.lower(): value})
    assert name in str(caught.value) and "control characters" in str(caught.value)


def test_keys_and_tokens_are_secret_settings() -> None:
    """Every key, token and secret is hidden from errors and from the settings' repr."""
    secrets = {"hash_key", "encryption_key", "capture_token", "api_token", "api_signing_secret", "webhook_secret",
               "debug_token", "openai_api_key"}
    assert secrets <= SECRET_SETTINGS
    values = {name: f"secret-{name}-value" for name in secrets} | {"encryption_key": KEY}
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
    assert not any(value in repr(settings) for value in values.values())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:S3cretPw@host:6379/0", "redis://***@host:6379/0"),
        ("https://user:pass@api.example/bot?x=1", "https://***@api.example/bot?x=1"),
        ("ami://user:pa@ss/wd@host:5038", "ami://***@host:5038"),
        ("user:pass@host", "***@host"),
        ("sqlite:///var/lib/calls.db", "sqlite:///var/lib/calls.db"),
    ],
)
def test_without_credentials(url: str, shown: str) -> None:
    """Everything between the scheme and the last @ goes, so no piece of a badly encoded password stays."""
    assert without_credentials(url) == shown


@pytest.mark.parametrize(("name", "value"), [("AMI_URL", "ami://user:pw@host:notaport"),
                                             ("STORE_URL", "redis://host:bad/0"),
                                             ("API_URL", "http://host:0/api"),
                                             ("EVENTS_URL", "https://host:99999/events")])
def test_url_ports_are_checked(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A URL whose port is not a usable number stops start-up instead of failing when first used."""
    monkeypatch.setenv("ENCRYPTION_KEY", KEY)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert f"invalid setting {name}" in str(caught.value)
