"""The progress callback every long loop takes, so that one display (the CLI's rich bar, a
notebook's, none) serves the whole library.

``progress(items, total, what)`` yields ``items`` unchanged while it shows ``what`` advancing
towards ``total``; the library never draws anything itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]


def no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    """The default: show nothing."""
    return items
