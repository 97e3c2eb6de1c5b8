"""mypy --strict and ruff are part of the suite: a type or lint error fails the tests like any bug.

Both read their settings from pyproject.toml ([tool.mypy]: strict, files = hsmfs; [tool.ruff]).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(module: str, *args: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{module} is not installed for {sys.executable}: run pip install -e '.[test]' "
            "(tests/run does this)",
            pytrace=False,
        )
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            f"python -m {module} {' '.join(args)} exited {result.returncode}:\n{result.stdout}", pytrace=False
        )


def test_mypy_strict() -> None:
    run_tool("mypy")


def test_ruff() -> None:
    run_tool("ruff", "check", "hsmfs", "tests", "contrib")
