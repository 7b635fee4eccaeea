"""CI's oldest-dependencies job tests exactly the lower bounds pyproject.toml declares."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    tomllib = pytest.importorskip("tomli", reason="tomllib is in the standard library from 3.11")


def test_the_oldest_deps_constraints_are_the_declared_lower_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"{requirement!r}: every runtime dependency needs a >= lower bound"
        declared[match[1].lower()] = match[2]
    pinned = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    # a lower bound "3.9" is the release 3.9.0
    assert pinned == {name: _release(v) for name, v in declared.items()}
    assert set(declared) == {"aiohttp", "msgspec", "anyio"}


def _release(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))
