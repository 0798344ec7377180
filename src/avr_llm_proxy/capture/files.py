"""The seed's legacy caller file `<CALLERID_DIR>/callerid-<uuid>.txt`, so an existing dialplan works unchanged.

Unlike the seed, the file is not deleted on first read: its caller goes into the registry for the
whole call, and files older than the TTL are swept by a background task.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path
from urllib.parse import unquote

import structlog

from ..avr import canonical_uuid
from ..calls import CallRecord
from ..identity import dialled_number, parse_caller, parse_trust

log = structlog.get_logger("avr_llm_proxy.capture.files")

# Room for the number, name and dialled number, and the P-Asserted-Identity and From headers.
MAX_FILE_BYTES = 4096
PREFIX, SUFFIX = "callerid-", ".txt"
# What dialplan/avr-callerid-legacy.conf writes after the number: presentation, name, dialled number,
# the channel (for call control), and what the network asserted (the headers holding `verstat=`,
# STIR/SHAKEN attestation and result).
FIELDS = ("pres", "name", "dnid", "channel", "verstat", "attest", "verify")


def _contents(data: bytes) -> tuple[str, dict[str, str]]:
    """The number (the first line, as the seed writes it) and the URL-encoded `key=value` lines after it."""
    first, *rest = data.decode("utf-8", errors="replace").splitlines()
    fields = {}
    for line in rest:
        key, sep, value = line.partition("=")
        if sep and key.strip() in FIELDS:
            fields[key.strip()] = unquote(value.strip())
    return first, fields


class LegacyCallerFiles:
    """Reads the caller file of one call; only a canonical UUID may form a file name."""

    def __init__(self, directory: str, ttl_seconds: int, region: str, owners: frozenset[int] | None = None) -> None:
        self.directory = Path(directory)
        self.ttl_seconds = ttl_seconds
        self.region = region
        # In a shared /tmp anyone can create a file: only these users' files are believed.
        self.owners = owners if owners is not None else frozenset({0, os.getuid()})

    def path_for(self, uuid: str) -> Path | None:
        canonical = canonical_uuid(uuid)
        return None if canonical is None else self.directory / f"{PREFIX}{canonical}{SUFFIX}"

    def _read(self, path: Path) -> bytes | None:
        """The file's first bytes, refusing symlinks, non-regular files and stale files."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("caller_file_refused", path=str(path), reason=type(exc).__name__)
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                log.warning("caller_file_refused", path=str(path), reason="not_a_regular_file")
                return None
            if info.st_uid not in self.owners:
                log.warning("caller_file_refused", path=str(path), reason="unexpected_owner", owner=info.st_uid,
                            hint="set CALLERID_FILE_OWNERS to the uid Asterisk writes as")
                return None
            if time.time() - info.st_mtime > self.ttl_seconds:
                return None
            return os.read(fd, MAX_FILE_BYTES)
        finally:
            os.close(fd)

    async def find(self, uuid: str) -> CallRecord | None:
        """The caller the dialplan wrote for this call, if a fresh file exists."""
        path = self.path_for(uuid)
        data = None if path is None else self._read(path)
        if path is None or data is None or not data.strip():
            # Empty: the dialplan may be half-way through writing it; look again on the next turn.
            return None
        number, fields = _contents(data)
        caller = parse_caller(number, fields.get("name"), fields.get("pres"), source="file", region=self.region)
        log.info("caller_file_read", uuid=uuid, caller_number=caller.log_number, presentation=caller.presentation)
        return CallRecord(uuid=path.name[len(PREFIX):-len(SUFFIX)], caller=caller,
                          called_number=dialled_number(fields.get("dnid")),
                          channel=fields.get("channel", "")[:128] or None,  # control.py checks it before use
                          trust=parse_trust(fields.get("verstat"), fields.get("attest"), fields.get("verify")))

    def erase_number(self, number: str) -> int:
        """Delete every caller file that names `number` (E.164 or as written); returns how many."""
        removed = self.sweep()  # stale files are not read below, and may name the number too
        for entry in self._entries():
            data = self._read(Path(entry.path))
            if not data or not data.strip():
                continue
            caller = parse_caller(_contents(data)[0], source="file", region=self.region)
            if number in (caller.e164, caller.raw):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _entries(self) -> list[os.DirEntry[str]]:
        try:
            return [entry for entry in os.scandir(self.directory)
                    if entry.name.startswith(PREFIX) and entry.name.endswith(SUFFIX)]
        except OSError as exc:
            log.warning("caller_dir_unreadable", path=str(self.directory), reason=type(exc).__name__)
            return []

    def sweep(self) -> int:
        """Delete caller files older than the TTL; returns how many went."""
        removed = 0
        cutoff = time.time() - self.ttl_seconds
        for entry in self._entries():
            try:
                info = entry.stat(follow_symlinks=False)
                if info.st_mtime < cutoff and (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("caller_files_swept", removed=removed)
        return removed
