"""edgequant: quantize language models for edge devices, and prove what it cost.

    import edgequant as eq
    m = eq.load("smollm2-135m")
    q = eq.quantize(m, "rtn", scheme="w4g128")
    q.save("out/smollm2-rtn")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EdgequantError
from .formats import QuantizedTensor, QuantScheme
from .models.model import Model
from .nn.recipe import Recipe

__version__ = "0.1.0"
__all__ = ["EdgequantError", "Model", "QuantScheme", "QuantizedTensor", "Recipe", "export",
           "load", "quantize", "__version__"]


def load(source: str | Path) -> Model:
    """Load a model: a zoo name, an HF folder, a hub id, a ``.gguf`` file, or an artifact."""
    from .models.artifact import is_artifact, load_artifact
    from .models.sources import load_source

    if is_artifact(source):
        return load_artifact(source)
    src = load_source(source)
    return Model(src.model, src.tokenizer,
                 {"name": src.name, "path": str(src.path), "sha256": src.sha256,
                  "kind": src.kind})


def quantize(model: Model | str | Path, method: str = "rtn", scheme: str | QuantScheme = "w4g128",
             *, overrides: tuple[tuple[str, str], ...] = (), keep_dtype: str = "float16",
             calib: Any = None, inplace: bool = False, **method_options: Any) -> Model:
    """Quantize ``model`` with ``method`` under ``scheme`` (see ``QuantScheme`` short names)."""
    from .pipeline import quantize_model

    if not isinstance(model, Model):
        model, inplace = load(model), True
    recipe = Recipe(method=method.lower(), scheme=QuantScheme.parse(scheme),
                    overrides=tuple(overrides), keep_dtype=keep_dtype,
                    method_options=method_options)
    return quantize_model(model, recipe, calib=calib, inplace=inplace)


def export(model: Model | str | Path, path: str | Path, ftype: str = "Q4_K_M", **options: Any
           ) -> Path:
    """Write ``model`` as a GGUF file for llama.cpp (``imatrix=``, ``calib=``, ``force=``).
    See :func:`edgequant.gguf.export.export`."""
    from .gguf.export import export as _export

    return _export(model, path, ftype, **options)
