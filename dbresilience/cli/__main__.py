"""``python -m dbresilience.cli``."""

from __future__ import annotations

from dbresilience.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
