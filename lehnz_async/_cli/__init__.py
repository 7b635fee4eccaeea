"""The ``lehnz-async`` command: ``demo``, ``send`` and ``serve`` (the package that prints;
the library never does)."""

from ._main import main, run

__all__ = ["main", "run"]
