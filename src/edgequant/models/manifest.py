"""The native artifact's manifest (``edgequant.json``), and what can be known from it and the
safetensors header alone, without torch: ``edgequant info`` answers in well under a second.

The folder layout and the loader are in :mod:`edgequant.models.artifact`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..formats.scheme import QuantScheme
from ..sizes import FLOAT_DTYPES, safetensors_table, size_record

MANIFEST = "edgequant.json"
WEIGHTS = "model.safetensors"
FORMAT_NAME = "edgequant-artifact"
FORMAT_VERSION = 1
#: manifest key: per quantized layer, the names of its stored tensors (codes, scales, …)
QUANTIZED_TENSORS = "quantized_tensors"


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The validated manifest of the artifact folder ``path``."""
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not an edgequant artifact (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{file} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{file} is not an edgequant manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{file} has format version {manifest.get('version')}; this "
                            f"edgequant reads version {FORMAT_VERSION}")
    for key in ("recipe", "layers", "source", "files"):
        if key not in manifest:
            raise ArtifactError(f"{file} lacks {key!r}")
    return manifest


def artifact_info(path: str | Path) -> dict[str, Any]:
    """An artifact's size accounting, from its manifest and safetensors header alone.

    The same numbers as ``load_artifact(path).summary()`` (per-layer schemes, bytes and bits
    per weight, parameters, bits per weight of the whole model), plus ``size_bytes`` (the
    weights file), ``dir_bytes`` (the whole folder), ``source`` and ``recipe``, without
    building the model or reading its weights. (An artifact written before the manifest
    listed its quantized tensors is opened with torch to name them.)
    """
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} lacks {WEIGHTS}")
    try:
        table = safetensors_table(weights)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {e}") from None
    stored = manifest.get(QUANTIZED_TENSORS)
    if stored is None:
        stored = _quantized_tensors_of(manifest["layers"])
    layers: dict[str, dict[str, Any]] = {}
    q_names: set[str] = set()
    q_bytes = q_params = 0
    for name, rec in manifest["layers"].items():
        names = [f"{name}.{k}" for k in stored.get(name, ())]
        missing = [k for k in names if k not in table]
        if not names or missing:
            raise ArtifactError(f"{weights} lacks the stored tensors of layer {name} "
                                f"({', '.join(missing) or 'none listed'}); re-create it")
        out_f, in_f = rec["shape"]
        n, b = out_f * in_f, sum(table[k][2] for k in names)
        layers[name] = {"scheme": QuantScheme.from_dict(rec["scheme"]).name,
                        "shape": [out_f, in_f], "bits_per_weight": 8 * b / n, "nbytes": b}
        q_names.update(names)
        q_bytes, q_params = q_bytes + b, q_params + n
    dense = sum(math.prod(shape) for k, (dtype, shape, _) in table.items()
                if k not in q_names and dtype in FLOAT_DTYPES)
    return size_record(num_params=dense + q_params,
                       weight_bytes=sum(b for _, _, b in table.values()),
                       linear_params=q_params, linear_bytes=q_bytes, layers=layers,
                       quantized_layers=len(layers), quantized_params=q_params,
                       quantized_bytes=q_bytes, size_bytes=weights.stat().st_size,
                       on_disk=True,
                       dir_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                       source=manifest["source"], recipe=manifest["recipe"])


def _quantized_tensors_of(layers: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """What :data:`QUANTIZED_TENSORS` lists, from each layer's empty module (torch)."""
    from .artifact import layer_class

    return {name: sorted(layer_class(rec).skeleton(rec, where=name).quantized().tensors())
            for name, rec in layers.items()}
