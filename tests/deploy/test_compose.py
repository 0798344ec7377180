"""deploy/: the compose drop-in against the Compose Specification, its essentials, the settings example, the unit.

compose-spec.json is the Compose Specification's schema/compose-spec.json, vendored byte for byte from
github.com/compose-spec/compose-spec at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6 (2026-06-23).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from avr_llm_proxy.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DROP_IN = DEPLOY / "compose.avr-llm-proxy.yml"
ENV_EXAMPLE = DEPLOY / "avr-llm-proxy.env.example"
UNIT = DEPLOY / "avr-llm-proxy.service"
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text(encoding="utf-8"))
COMPOSE_FILES = sorted(DEPLOY.glob("compose*.y*ml"))
# Settings of issue 8 (privacy and security), documented before or after the code reads them.
COMING = ("ENCRYPTION_KEY", "TRUSTED_NETWORKS", "CAPTURE_TOKEN", "API_TOKEN", "WEBHOOK_SECRET", "API_SIGNING_SECRET")
_VARIABLE = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return document


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        given = env.get(name)
        if operator in (":-", "-"):
            unset = given is None or (operator == ":-" and given == "")
            return default if unset else str(given)
        assert operator in (None, ""), f"unexpected ${{{name}{operator}…}} in the drop-in"
        return given or ""

    return _VARIABLE.sub(replace, value)


def env_lines() -> dict[str, str]:
    """The example's settings: `NAME=value` or `#NAME=value` lines (prose comments start with `# `)."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} appears twice in {ENV_EXAMPLE.name}"
            found[match.group(1)] = match.group(2)
    return found


def setting_names() -> dict[str, tuple[str, ...]]:
    """Every Settings field: its environment name(s), first one the main name."""
    names: dict[str, tuple[str, ...]] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names[field_name] = tuple(str(choice) for choice in choices) if choices else (str(alias),)
    return names


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in the unit, repeats kept (systemd allows them)."""
    section, entries = "", []
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line in the unit: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def containerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r'([A-Z_][A-Z0-9_]*)=("[^"]*"|\S*)', line[4:]):
                env[name] = value.strip('"')
    return env


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    """As written, and with every variable at its default, the file is valid Compose."""
    validator = Draft7Validator(SCHEMA)
    for document in (load(path), interpolate(load(path), {})):
        errors = [
            f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)
        ]
        assert not errors, f"{path.name} breaks the Compose Specification:\n" + "\n".join(errors)


def test_a_compose_file_was_found() -> None:
    assert DROP_IN in COMPOSE_FILES


def test_the_schema_is_the_compose_specification() -> None:
    """The vendored schema is the real one, not a permissive stand-in."""
    assert SCHEMA["title"] == "Compose Specification"
    assert {"services", "networks", "volumes"} <= set(SCHEMA["properties"])
    service = SCHEMA["definitions"]["service"]
    assert service["additionalProperties"] is False and "profiles" in service["properties"]
    errors = list(Draft7Validator(SCHEMA).iter_errors({"services": {"x": {"image": "a", "no_such_key": 1}}}))
    assert errors, "the schema accepts an unknown service key"


def test_drop_in_runs_the_proxy_on_the_avr_network_with_an_env_file() -> None:
    compose = interpolate(load(DROP_IN), {})
    proxy = compose["services"]["avr-llm-proxy"]
    networks = proxy["networks"]
    assert "avr" in (networks if isinstance(networks, list) else list(networks))
    assert compose["networks"]["avr"]["name"] == "avr", "the network must be avr-infra's network named avr"
    assert proxy["env_file"] == ["./avr-llm-proxy.env"]
    assert "profiles" not in proxy, "the proxy itself must run without a profile"
    assert proxy["build"] == {"context": "./avr-llm-proxy", "dockerfile": "deploy/Containerfile"}
    assert (DEPLOY / "Containerfile").is_file()
    assert "avr-llm-proxy-data:/data" in proxy["volumes"] and "avr-llm-proxy-data" in compose["volumes"]
    assert "ports" not in proxy, "nothing is published by default: avr-core and Asterisk are on the avr network"
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in proxy["security_opt"]


def test_drop_in_points_avr_core_at_the_proxy() -> None:
    """avr-core's LLM_URL is overridden to the proxy's /prompt-stream, on the port the image listens on."""
    compose = load(DROP_IN)
    core = compose["services"]["avr-core"]
    port = containerfile_env()["PORT"]
    assert core["environment"]["LLM_URL"] == f"http://avr-llm-proxy:{port}/prompt-stream"
    assert core["depends_on"]["avr-llm-proxy"]["condition"] == "service_healthy"
    assert set(core) == {"environment", "depends_on"}, "the drop-in must only add to avr-infra's avr-core"


def test_drop_in_mounts_the_dialplan_into_asterisk() -> None:
    """avr-asterisk sees dialplan/ as /etc/asterisk/avr-llm-proxy/, and the #include line shown names a real file."""
    compose = interpolate(load(DROP_IN), {})
    asterisk = compose["services"]["avr-asterisk"]
    assert asterisk["volumes"] == ["./avr-llm-proxy/dialplan:/etc/asterisk/avr-llm-proxy:ro"]
    assert set(asterisk) == {"volumes"}
    text = DROP_IN.read_text(encoding="utf-8")
    included = re.findall(r"#include avr-llm-proxy/(\S+)", text)
    assert included and all((ROOT / "dialplan" / name).is_file() for name in included)
    assert "Gosub(avr-callerid-agi,s,1(avr-llm-proxy:4573))" in text
    assert "[avr-callerid-agi]" in (ROOT / "dialplan" / "avr-callerid-agi.conf").read_text(encoding="utf-8")


def test_replicas_profile_adds_redis_and_a_second_replica_sharing_settings_and_key() -> None:
    compose = interpolate(load(DROP_IN), {})
    services = compose["services"]
    proxy, replica, redis = services["avr-llm-proxy"], services["avr-llm-proxy-2"], services["avr-llm-proxy-redis"]
    assert replica["profiles"] == ["replicas"] and redis["profiles"] == ["replicas"]
    assert [name for name, service in services.items() if "replicas" in service.get("profiles", [])] == [
        "avr-llm-proxy-2", "avr-llm-proxy-redis"
    ]
    # One settings file and no per-replica override: the same ENCRYPTION_KEY and STORE_URL on both replicas.
    assert replica["env_file"] == proxy["env_file"]
    for service in (proxy, replica):
        overridden = service.get("environment", {})
        assert "ENCRYPTION_KEY" not in overridden and "STORE_URL" not in overridden
    assert replica["volumes"] == proxy["volumes"], "the replicas share /data (SQLite file, key file)"
    assert replica["image"] == proxy["image"] and replica["build"] == proxy["build"]
    assert replica["networks"]["avr"]["aliases"] == ["avr-llm-proxy"], "avr-core and Asterisk reach either one"
    assert replica["depends_on"]["avr-llm-proxy-redis"]["condition"] == "service_healthy"
    assert redis["image"].startswith("redis:") and redis["networks"] == ["avr"] and "healthcheck" in redis
    # The Redis URL and the shared key are spelled out where the operator sets them.
    redis_url = "STORE_URL=redis://avr-llm-proxy-redis:6379/0"
    assert redis_url in DROP_IN.read_text(encoding="utf-8") and redis_url in ENV_EXAMPLE.read_text(encoding="utf-8")
    assert "ENCRYPTION_KEY=" in DROP_IN.read_text(encoding="utf-8") and "ENCRYPTION_KEY" in env_lines()


def test_env_example_has_every_setting_at_its_default() -> None:
    """Every setting of config.Settings is in the example, commented out at the default the code has."""
    lines = env_lines()
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    missing, wrong = [], []
    for field_name, names in setting_names().items():
        main, *aliases = names
        if main not in lines:
            missing.append(main)
            continue
        default = Settings.model_fields[field_name].default
        expected = str(default).lower() if isinstance(default, bool) else str(default)
        if lines[main] != expected:
            wrong.append(f"{main}: example {lines[main]!r}, code {expected!r}")
        missing += [alias for alias in aliases if alias not in text]
    assert not missing, f"settings missing from {ENV_EXAMPLE.name}: {missing}"
    assert not wrong, f"defaults in {ENV_EXAMPLE.name} differ from config.py: {wrong}"
    active = [line for line in text.splitlines() if re.match(r"^[A-Z]", line)]
    assert not active, f"the example sets values instead of documenting defaults: {active}"


def test_env_example_marks_settings_not_yet_read_as_such() -> None:
    """Settings announced before the code reads them sit under "NOT YET USED"; once read, they leave that block."""
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    marker = text.find("NOT YET USED")
    known = {name for names in setting_names().values() for name in names}
    for name in COMING:
        position = text.find(f"#{name}=")
        assert position >= 0, f"{name} is missing from {ENV_EXAMPLE.name}"
        if name in known:
            assert marker < 0 or position < marker, (
                f"{name} is a setting now: move it out of the 'NOT YET USED' block of {ENV_EXAMPLE.name}"
            )
        else:
            assert 0 <= marker < position, (
                f"{name} is not a setting of this version: document it under a 'NOT YET USED' heading"
            )
    undocumented = set(env_lines()) - known - set(COMING)
    assert not undocumented, f"{ENV_EXAMPLE.name} names settings that do not exist: {sorted(undocumented)}"


def test_image_defaults_are_settings() -> None:
    """The names the Containerfile sets are real settings, with container values."""
    env = containerfile_env()
    known = {name for names in setting_names().values() for name in names}
    for name in ("HOST", "PORT", "AGI_LISTEN", "STORE_URL", "CALLERID_DIR"):
        assert name in known and name in env
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "6017" and env["AGI_LISTEN"] == "0.0.0.0:4573"
    assert env["STORE_URL"] == "sqlite:////data/avr-llm-proxy.db" and env["CALLERID_DIR"] == ""


def test_systemd_unit_is_hardened() -> None:
    entries = unit_entries()
    service = {key: value for section, key, value in entries if section == "Service"}
    environment = [value for section, key, value in entries if section == "Service" and key == "Environment"]
    assert service.get("DynamicUser") == "yes" or service.get("User", "root") not in ("", "root", "0")
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "avr-llm-proxy"
    assert "STORE_URL=sqlite:////var/lib/avr-llm-proxy/avr-llm-proxy.db" in environment, "SQLite in the StateDirectory"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[-1] == "serve" and service["ExecStart"].split()[0].endswith("/avr-llm-proxy")
    assert service["EnvironmentFile"] == "-/etc/avr-llm-proxy/avr-llm-proxy.env"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality", "RestrictNamespaces"):
        assert service[key] == "yes", key
    assert service["CapabilityBoundingSet"] == ""
    assert ("Install", "WantedBy", "multi-user.target") in entries


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own checks: `systemd-analyze verify`, and an exposure score of "OK" (at most 3.9)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the unit's keys are checked above")
    # verify needs ExecStart's program to exist: point it at the one this checkout installed.
    program = ROOT / ".venv" / "bin" / "avr-llm-proxy"
    program_path = str(program) if program.exists() else shutil.which("avr-llm-proxy") or "/bin/true"
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/avr-llm-proxy/bin/avr-llm-proxy", program_path),
        encoding="utf-8",
    )
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout + security.stderr)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) < 4.0, security.stdout
