"""``python -m lehnz_async``: the ``lehnz-async`` command line."""

from ._cli import main

if __name__ == "__main__":
    main()
