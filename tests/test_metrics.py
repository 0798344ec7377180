"""/metrics with several worker processes: one scrape reports them all, and a dead one stops counting as live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from avr_llm_proxy.observability import SHARED_METRICS_ENV, metrics_shared_by_workers, metrics_text

WORKER = """
from avr_llm_proxy.observability import ACTIVE_TURNS, AMI_CONNECTED, TURNS
TURNS.labels(outcome="answered").inc(3)
ACTIVE_TURNS.inc()
AMI_CONNECTED.set(1)
"""


def test_dead_worker_keeps_its_counts_but_not_its_live_gauges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that exited mid-turn (killed, replaced) left files: its turns still count, its gauges do not."""
    for _ in range(2):
        subprocess.run([sys.executable, "-c", WORKER], env={SHARED_METRICS_ENV: str(tmp_path)}, check=True, timeout=60)
    assert len(list(tmp_path.glob("gauge_live*.db"))) == 4  # two gauges of two workers, before the scrape
    monkeypatch.setenv(SHARED_METRICS_ENV, str(tmp_path))
    samples = {(sample.name, tuple(sample.labels.values())): sample.value
               for family in text_string_to_metric_families(metrics_text().decode()) for sample in family.samples}
    assert samples[("avr_llm_proxy_turns_total", ("answered",))] == 6.0
    # Gauges of no live worker: absent or 0 (2 and 1 while the dead workers' files counted).
    assert samples.get(("avr_llm_proxy_active_turns", ()), 0.0) == 0.0
    assert samples.get(("avr_llm_proxy_ami_connected", ()), 0.0) == 0.0
    assert list(tmp_path.glob("gauge_live*.db")) == []


def test_workers_metrics_directory_is_private_and_goes_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made in systemd's RuntimeDirectory when there is one (never swept by age), mode 0700, removed after."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    with metrics_shared_by_workers() as directory:
        assert directory.parent == tmp_path and os.environ[SHARED_METRICS_ENV] == str(directory)
        assert directory.stat().st_mode & 0o777 == 0o700
        (directory / "counter_1.db").write_bytes(b"")
    assert not directory.exists() and SHARED_METRICS_ENV not in os.environ
