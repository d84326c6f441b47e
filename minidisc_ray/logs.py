"""Progress lines: every stage of the job reports on stderr through :func:`log` (stdout stays free for the
commands' JSON results)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """One progress line on stderr, flushed at once (Ray's log monitor and ``kubectl logs`` see it live)."""
    print(msg, file=sys.stderr, flush=True)
