"""Where the command writes what is not its result: standard error, one line each."""

from __future__ import annotations

import sys


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
