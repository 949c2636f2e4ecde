"""A site repeats each outcome a few times, backing off, so a lost event is recovered without the repeats
flooding the broker's ingest on a busy site."""

from __future__ import annotations

import pytest

import adapters.site as site_module
from adapters.site import REPEATS, SiteLink
from common.config import MqttTarget


def test_each_outcome_is_repeated_a_few_times_backing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(site_module.time, "monotonic", lambda: now[0])
    link = SiteLink(MqttTarget.from_url("mqtt://127.0.0.1:1"), "guian-01", "guizhou", [], interval=1.0)
    for i in range(100):
        link.emit(f"j{i}", 1, "completed")
    link.emit("j-run", 1, "running")  # not an outcome: never repeated
    sent = len(link.undelivered())
    repeats_at = []
    for second in range(1, 120):  # a heartbeat a second for two minutes
        now[0] = 1000.0 + second
        before = len(link.undelivered())
        link._repeat_finals()
        if len(link.undelivered()) > before:
            repeats_at.append(second)
    assert repeats_at == [1, 3, 9, 27]
    assert len(link.undelivered()) - sent == 100 * REPEATS  # 4 repeats each, not one per heartbeat
