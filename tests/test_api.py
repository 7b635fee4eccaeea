"""The public surface: what is exported, typed, and documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import lehnz_async
from lehnz_async import LehnzError, Tracker

ROOT = Path(__file__).resolve().parent.parent


def test_all_exports_what_exists_once() -> None:
    names = lehnz_async.__all__
    assert len(set(names)) == len(names)
    assert [name for name in names if not hasattr(lehnz_async, name)] == []
    assert {"Tracker", "Event", "Stats", "LehnzError", "DeliveryError"} <= set(names)


def test_every_exception_has_one_root() -> None:
    errors = [getattr(lehnz_async, n) for n in lehnz_async.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, LehnzError) for e in errors)


def test_the_package_is_typed() -> None:
    assert (ROOT / "lehnz_async" / "py.typed").exists()


def test_every_option_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Options") : readme.index("## Errors")]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    options = set(inspect.signature(Tracker).parameters)
    assert options == documented, (options - documented, documented - options)
