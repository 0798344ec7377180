"""The host lock that gives one worker a duty, and the wait of the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

from avr_llm_proxy.leader import HostLock, lead


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    """A second holder of the same duty and key is refused until the first releases."""
    first, second = HostLock("ami", "k", tmp_path), HostLock("ami", "k", tmp_path)
    assert first.try_acquire() and first.held
    assert not second.try_acquire() and not second.held
    assert HostLock("ami", "another key", tmp_path).try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_key_is_not_in_the_file_name(tmp_path: Path) -> None:
    """The key (an AMI URL with its secret) only shows as a hash."""
    lock = HostLock("ami", "ami://avr:s3cret@pbx:5038", tmp_path)
    assert "s3cret" not in str(lock.path) and lock.path.parent == tmp_path


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    """A symlink planted at the lock's path is refused, not followed."""
    lock = HostLock("ami", "k", tmp_path)
    lock.path.symlink_to(tmp_path / "elsewhere")
    assert not lock.try_acquire()
    assert not (tmp_path / "elsewhere").exists()


async def test_lead_waits_for_the_holder(tmp_path: Path) -> None:
    """The waiting worker starts the duty once the holder is gone."""
    holder, waiter = HostLock("ami", "k", tmp_path), HostLock("ami", "k", tmp_path)
    assert holder.try_acquire()
    started: list[str] = []
    task = asyncio.create_task(lead(waiter, lambda: started.append("duty"), retry_s=0.01))
    await asyncio.sleep(0.05)
    assert started == []
    holder.release()
    await asyncio.wait_for(task, 5)
    assert started == ["duty"] and waiter.held
    waiter.release()
