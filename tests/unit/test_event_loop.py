"""`SUANWANG_EVENT_LOOP` chooses the event loop the commands run on; `SUANWANG_GC_YOUNG` the collector's pace."""

from __future__ import annotations

import asyncio

import click
import pytest
import uvloop

from suanwang import cli


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_commands_run_on_uvloop_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUANWANG_EVENT_LOOP", "uvloop")
    assert cli._run(_loop_type()) is uvloop.Loop


def test_commands_run_on_asyncios_loop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUANWANG_EVENT_LOOP", raising=False)
    assert not issubclass(cli._run(_loop_type()), uvloop.Loop)


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUANWANG_EVENT_LOOP", "trio")
    with pytest.raises(click.BadParameter, match="SUANWANG_EVENT_LOOP"):
        cli._loop_factory()


def test_the_collector_setting_is_read_and_a_bad_one_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.service import GC_YOUNG, gc_young
    from common.errors import InvalidInput

    monkeypatch.delenv("SUANWANG_GC_YOUNG", raising=False)
    assert gc_young() == GC_YOUNG
    monkeypatch.setenv("SUANWANG_GC_YOUNG", "700")
    assert gc_young() == 700
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("SUANWANG_GC_YOUNG", bad)
        with pytest.raises(InvalidInput, match="SUANWANG_GC_YOUNG"):
            gc_young()
