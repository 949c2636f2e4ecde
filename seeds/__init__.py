"""Seed data (TOML) shipped with the package, so loaders never depend on the working directory."""

from __future__ import annotations

import pathlib
from pathlib import Path

DIR = pathlib.Path(__file__).parent


def path(name: str) -> Path:
    """Absolute path of a seed file such as "hubs.toml"; callers need not know where the package lives."""
    return DIR / name
