"""The codebase's own checks, so that the test command enforces them: the import-layering contract
(pyproject.toml, [tool.importlinter]), mypy on every package and ruff on the whole tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ("common", "regions", "adapters", "broker", "suanwang")


def _run(*command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(300)
def test_layers_import_downwards_only():
    """Every import-linter contract is kept: the broker's layers, pure matching, Redis only in broker.state."""
    result = _run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.timeout(300)
def test_packages_type_check():
    """mypy finds no error in the packages."""
    result = _run(sys.executable, "-m", "mypy", "--no-error-summary", *PACKAGES)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_ruff_is_clean():
    """ruff finds nothing in the tree."""
    result = _run(sys.executable, "-m", "ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-6000:]
