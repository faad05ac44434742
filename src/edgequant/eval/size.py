"""Size: bytes on disk, bits per weight, parameter count — counted from what is stored.

Two bits-per-weight figures, the same definitions for every format:

- ``bits_per_weight``: over the quantized linear layers. A native model counts its
  ``QuantLinear`` layers (codes, scales, zeros; :meth:`Model.summary`); an unquantized one
  its linear layers except the output head; a GGUF file the 2-D tensors of its transformer
  blocks (``blk.N.*``: attention and FFN matrices), whatever their types.
- ``bits_per_weight_total``: every stored weight byte × 8 / the parameter count.

``size_bytes`` is the weights' bytes on disk: the GGUF file, an artifact's
``model.safetensors``, an HF folder's ``*.safetensors``; for a model that lives only in
memory, the bytes its artifact would store (``size_on_disk`` False).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models.model import Model

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def gguf_size_info(path: str | Path) -> dict[str, Any]:
    """Size accounting of a GGUF file from its tensor table (``gguf.GGUFReader``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    lin_bytes = lin_params = all_bytes = all_params = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        n, b = int(t.n_elements), int(t.n_bytes)
        all_params += n
        all_bytes += b
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + n
        if t.name.startswith("blk.") and len(t.shape) == 2:
            lin_params += n
            lin_bytes += b
    return {
        "size_bytes": Path(path).stat().st_size,
        "size_on_disk": True,
        "num_params": all_params,
        "bits_per_weight": 8 * lin_bytes / lin_params if lin_params else None,
        "bits_per_weight_total": 8 * all_bytes / all_params if all_params else None,
        "weight_bytes": all_bytes,
        "tensor_types": types,
    }


def model_size_info(model: Model, path: Path | None = None) -> dict[str, Any]:
    """Size accounting of a torch ``Model`` (``path``: where its weights live, if on disk)."""
    s = model.summary()
    bpw = s["bits_per_weight"]
    if bpw is None:
        bpw = _dense_linear_bits(model.module)
    size, on_disk = _weights_on_disk(path)
    return {
        "size_bytes": size if on_disk else s["weight_bytes"],
        "size_on_disk": on_disk,
        "num_params": s["num_params"],
        "bits_per_weight": bpw,
        "bits_per_weight_total": s["bits_per_weight_total"],
        "weight_bytes": s["weight_bytes"],
    }


def _dense_linear_bits(module: Any) -> float | None:
    from torch import nn

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    n = b = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and m is not head:
            n += m.weight.numel()
            b += m.weight.numel() * m.weight.element_size()
    return 8 * b / n if n else None


def _weights_on_disk(path: Path | None) -> tuple[int, bool]:
    if path is None:
        return 0, False
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, True
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return 0, False
    return sum(f.stat().st_size for f in files), True
