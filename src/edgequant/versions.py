"""Installed library versions, for the records that say what made a file or a number.

Read from the installed distributions' metadata (``importlib.metadata``), so asking costs no
import of the library itself: recording torchao's version does not load torchao.
"""

from __future__ import annotations

import importlib.metadata as md

#: in every record: what any of our numbers depends on
CORE = ("edgequant", "torch", "transformers")


def version_of(dist: str) -> str | None:
    """The installed version of the distribution ``dist`` (e.g. ``"llama_cpp_python"``), or
    None when it is not installed."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def installed_versions(*dists: str) -> dict[str, str]:
    """``{distribution: version}`` of :data:`CORE` and ``dists``; those not installed are
    left out."""
    out = {}
    for d in dict.fromkeys((*CORE, *dists)):
        v = version_of(d)
        if v is not None:
            out[d] = v
    return out
