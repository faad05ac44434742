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

from ..sizes import size_record

if TYPE_CHECKING:
    from ..models.model import Model


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
    return size_record(num_params=all_params, weight_bytes=all_bytes, linear_params=lin_params,
                       linear_bytes=lin_bytes, size_bytes=Path(path).stat().st_size,
                       on_disk=True, tensor_types=types)


def model_size_info(model: Model, path: Path | None = None) -> dict[str, Any]:
    """Size accounting of a torch ``Model`` (``path``: where its weights live, if on disk)."""
    s = model.summary()
    if s["quantized_layers"]:
        lin_params, lin_bytes = s["quantized_params"], s["quantized_bytes"]
    else:
        lin_params, lin_bytes = _dense_linears(model.module)
    size, on_disk = _weights_on_disk(path)
    return size_record(num_params=s["num_params"], weight_bytes=s["weight_bytes"],
                       linear_params=lin_params, linear_bytes=lin_bytes,
                       size_bytes=size if on_disk else None, on_disk=on_disk)


def _dense_linears(module: Any) -> tuple[int, int]:
    """Parameters and bytes of an unquantized model's linear weights, the head left out."""
    from torch import nn

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    n = b = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and m is not head:
            n += m.weight.numel()
            b += m.weight.numel() * m.weight.element_size()
    return n, b


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
