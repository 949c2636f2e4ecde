"""`SUANWANG_EVENT_LOOP` chooses the event loop the commands run on."""

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
