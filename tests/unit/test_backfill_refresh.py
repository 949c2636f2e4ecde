"""The backfill's full matches are rationed: a reservation stands a while, and a job nothing could ever
take is not asked again at once (each asking is a match over every pool)."""

from __future__ import annotations

from typing import Any, cast

from broker.matching import Request
from broker.matching.snapshot import Snapshot
from broker.model.records import SiteRecord
from broker.scheduling import backfill
from broker.scheduling.backfill import Backfill
from regions import load_geography


def _snapshot() -> Snapshot:
    snap = Snapshot(load_geography())
    pools = [{"arch": "GPU", "model": "A100-80G", "memory_gb": 80, "per_node": 8, "interconnect": "nvlink",
              "stacks": [], "price_cny_per_hour": 9.0}]  # fmt: skip
    meta = {"pools": pools, "energy": {}, "latency_ms": {}}
    capacity = {"t:A100-80G": 16, "x:A100-80G": 0, "a:A100-80G": 0}
    snap.apply(SiteRecord("site-a", "guizhou", "", "online", 1, 1, meta, capacity))
    return snap


def _req(job: str, count: int) -> Request:
    return Request(job_id=job, archs=("GPU",), models=(), count=count, units=None, reference="", min_memory_gb=0.0,
                   origin="shanghai", max_latency_ms=None, max_price=None, duration_hours=1.0)  # fmt: skip


def _counting(monkeypatch: Any) -> list[str]:
    asked: list[str] = []
    real = backfill.match

    def counted(req: Request, snap: Snapshot, **kw: Any) -> Any:
        asked.append(req.job_id)
        return real(req, snap, **kw)

    monkeypatch.setattr(backfill, "match", counted)
    return asked


async def test_a_reservation_stands_until_its_refresh(monkeypatch: Any) -> None:
    snap, asked = _snapshot(), _counting(monkeypatch)
    fill = Backfill(cast(Any, None), reserve_after_s=0)
    gang = _req("gang", 8)
    note = await fill.reserve(gang, snap, now_ms=1000.0)
    assert fill.reservation is not None and fill.reservation.site == "site-a" and "site-a is held" in note
    assert await fill.reserve(gang, snap, now_ms=1000.0 + backfill.REFRESH_MS / 2) == note
    assert asked == ["gang"], "within the refresh the pool is not chosen again"
    await fill.reserve(gang, snap, now_ms=1000.0 + backfill.REFRESH_MS)
    assert asked == ["gang", "gang"]


async def test_a_job_nothing_could_take_is_not_asked_again_at_once(monkeypatch: Any) -> None:
    snap, asked = _snapshot(), _counting(monkeypatch)
    fill = Backfill(cast(Any, None), reserve_after_s=0)
    huge, gang = _req("huge", 64), _req("gang", 8)
    assert fill.may_reserve(huge, 0, 1000.0)
    assert await fill.reserve(huge, snap, now_ms=1000.0) == "" and fill.reservation is None
    fill.begin_pass()
    assert not fill.may_reserve(huge, 0, 1000.0 + backfill.REFRESH_MS / 2)
    assert fill.may_reserve(gang, 0, 1000.0 + backfill.REFRESH_MS / 2), "the jobs after it may still reserve"
    assert fill.may_reserve(huge, 0, 1000.0 + backfill.REFRESH_MS), "asked again once the refresh is past"
    assert asked == ["huge"]


async def test_a_pass_chooses_a_pool_for_one_reservation_at_most(monkeypatch: Any) -> None:
    snap, asked = _snapshot(), _counting(monkeypatch)
    fill = Backfill(cast(Any, None), reserve_after_s=0)
    fill.begin_pass()
    for i in range(5):  # five jobs nothing could take, in one pass
        job = _req(f"huge-{i}", 64)
        if fill.may_reserve(job, 0, 1000.0):
            await fill.reserve(job, snap, now_ms=1000.0)
    assert asked == ["huge-0"], "one full match a pass, not one a job"
    fill.begin_pass()
    gang = _req("gang", 8)
    assert fill.may_reserve(gang, 0, 1001.0)
    await fill.reserve(gang, snap, now_ms=1001.0)
    assert fill.reservation is not None and fill.reservation.job == "gang"
    assert fill.may_reserve(gang, 0, 1002.0), "the holder itself may always renew"
