"""capture/files.py: the seed's caller file, read safely and kept for the call."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from avr_llm_proxy.capture.files import LegacyCallerFiles

UUID = "858675a8-e2f7-4c71-ad18-2c76b7927da2"


async def test_reads_number_and_leaves_file(tmp_path: Path) -> None:
    """The first line is the caller; the file stays (the registry keeps the caller, the sweep removes it)."""
    path = tmp_path / f"callerid-{UUID}.txt"
    path.write_text("0987654321\n")
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    assert record is not None and record.uuid == UUID
    assert record.caller.e164 == "+593987654321" and record.caller.source == "file"
    assert path.exists()


async def test_only_canonical_uuids_form_names(tmp_path: Path) -> None:
    """A uuid with path tricks never reaches the file system."""
    (tmp_path / "callerid-x.txt").write_text("1")
    files = LegacyCallerFiles(str(tmp_path), 3600, "EC")
    assert files.path_for("../../etc/passwd") is None and await files.find("../callerid-x") is None


async def test_symlinks_and_stale_files_refused(tmp_path: Path) -> None:
    """A symlink planted in a shared /tmp is not followed; an old file is not trusted."""
    target = tmp_path / "secret"
    target.write_text("+593987654321")
    os.symlink(target, tmp_path / f"callerid-{UUID}.txt")
    files = LegacyCallerFiles(str(tmp_path), 3600, "EC")
    assert await files.find(UUID) is None
    other = "858675a8-e2f7-4c71-ad18-2c76b7927da3"
    stale = tmp_path / f"callerid-{other}.txt"
    stale.write_text("0987654321")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert await files.find(other) is None


def test_sweep_removes_only_old_caller_files(tmp_path: Path) -> None:
    """Files older than the TTL go; fresh ones and other files stay."""
    old = tmp_path / f"callerid-{UUID}.txt"
    old.write_text("1")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "callerid-858675a8-e2f7-4c71-ad18-2c76b7927da3.txt"
    fresh.write_text("2")
    unrelated = tmp_path / "other.txt"
    unrelated.write_text("3")
    os.utime(unrelated, (time.time() - 7200, time.time() - 7200))
    assert LegacyCallerFiles(str(tmp_path), 3600, "EC").sweep() == 1
    assert not old.exists() and fresh.exists() and unrelated.exists()


async def test_hostile_file_content(tmp_path: Path) -> None:
    """Binary junk or shell code in the file yields a sanitised caller, never an error."""
    (tmp_path / f"callerid-{UUID}.txt").write_bytes(b"\xff\xfe$(reboot)`id`\x00" * 100)
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    assert record is not None
    assert record.caller.raw is None or not set(record.caller.raw) & set("$()`")


async def test_empty_file_is_not_a_caller_yet(tmp_path: Path) -> None:
    """A file the dialplan has created but not yet filled is looked at again later, not taken as 'unknown'."""
    path = tmp_path / f"callerid-{UUID}.txt"
    path.write_text("")
    files = LegacyCallerFiles(str(tmp_path), 3600, "EC")
    assert await files.find(UUID) is None
    path.write_text("0987654321\n")
    record = await files.find(UUID)
    assert record is not None and record.caller.e164 == "+593987654321"


# (file contents, presentation, caller_number, name, called_number)
CONTENTS = [
    (b"0987654321\npres=allowed_not_screened\nname=Juan%20P%C3%A9rez\ndnid=5551000\n",
     "allowed", "+593987654321", "Juan Pérez", "5551000"),
    (b"0987654321\npres=prohib\nname=Juan%20Perez\ndnid=5551000\n", "withheld", "anonymous", None, "5551000"),
    (b"anonymous\npres=prohib_not_screened\nname=\ndnid=5551000\n", "withheld", "anonymous", None, "5551000"),
    (b"0987654321\ncolour=prohib\nxpres=prohib\nuuid=0\nno equals sign\nname=Ana\ndnid=%2A97\n",
     "allowed", "+593987654321", "Ana", "*97"),
    (b"0987654321\r\npres=allowed\r\nname=Ana\r\ndnid=s\r\n", "allowed", "+593987654321", "Ana", None),
    (b"0987654321\n", "allowed", "+593987654321", None, None),
    (b"0987654321", "allowed", "+593987654321", None, None),
]


@pytest.mark.parametrize(("data", "presentation", "number", "name", "called"), CONTENTS)
async def test_lines_after_the_number(tmp_path: Path, data: bytes, presentation: str, number: str,
                                      name: str | None, called: str | None) -> None:
    """pres=, name= and dnid= (URL-encoded) are read, other lines ignored; a number-only file (the seed's) works."""
    (tmp_path / f"callerid-{UUID}.txt").write_bytes(data)
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    assert record is not None and record.caller.source == "file"
    assert record.caller.presentation == presentation and record.caller.caller_number("e164") == number
    assert record.caller.name == name and record.called_number == called
    if presentation == "withheld":
        assert record.caller.raw is None and record.caller.e164 is None


async def test_file_as_asterisk_writes_it_without_a_caller_id(tmp_path: Path) -> None:
    """FILE(…,,,al,u) ends every append with \\n: no caller ID leaves an empty first line, read as "unknown"."""
    path = tmp_path / f"callerid-{UUID}.txt"
    path.write_bytes(b"")  # Set(FILE(${FILE})=)
    for value in (b"", b"pres=allowed_not_screened", b"name=", b"dnid=5551000"):  # Set(FILE(${FILE},,,al,u)=…)
        with path.open("ab") as appended:
            appended.write(value + b"\n")
    assert path.read_bytes() == b"\npres=allowed_not_screened\nname=\ndnid=5551000\n"
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    assert record is not None and record.caller.presentation == "unavailable"
    assert record.caller.caller_number("e164") == "unknown" and record.caller.raw is None
    assert record.caller.name is None and record.called_number == "5551000"


@pytest.mark.parametrize(("lines", "trust"), [
    (b"verstat=%22Ana%22%20%3Csip%3A%2B593987654321%3Bverstat%3DTN-Validation-Passed%40carrier%3E%7C\n",
     ("TN-Validation-Passed", None, None, True)),
    (b"verstat=%7C\nattest=A\nverify=success\n", (None, "A", "success", True)),
    (b"verstat=%7C\nattest=A\nverify=signature_validation\n", (None, "A", "signature_validation", False)),
    (b"verstat=%7C\nattest=Z%0Aboom\nverify=%24%7BSHELL(id)%7D\n", (None, None, None, None)),
    (b"", (None, None, None, None)),
], ids=["pai_passed", "stir_passed", "stir_failed", "junk", "none"])
async def test_assertion_lines(tmp_path: Path, lines: bytes, trust: tuple[object, ...]) -> None:
    """verstat= (the URL-encoded headers), attest= and verify= carry what the network asserted."""
    data = b"0987654321\npres=allowed_not_screened\nname=Ana\ndnid=5551000\n" + lines
    (tmp_path / f"callerid-{UUID}.txt").write_bytes(data)
    record = await LegacyCallerFiles(str(tmp_path), 3600, "EC").find(UUID)
    assert record is not None
    got = record.trust
    assert (got.verstat, got.attestation, got.verify_result, got.verified) == trust
