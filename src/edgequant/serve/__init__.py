"""``edgequant serve``: an OpenAI-compatible HTTP server with a browser chat page and a
side-by-side arena, for GGUF files (llama.cpp) and native models (torch).

    from edgequant.serve import ServedModel, create_app
    app = create_app([ServedModel("q4", loader=lambda: eq.open("out/q4.gguf"))])

:mod:`.app` has the routes, :mod:`.scheduler` the slots and queue, :mod:`.protocol` the
OpenAI request shapes, :mod:`.models` what is served, :mod:`.metrics` Prometheus. FastAPI is
imported only by :func:`create_app`.
"""

from __future__ import annotations

from typing import Any

from .models import ServedModel

__all__ = ["ServedModel", "create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`edgequant.serve.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
