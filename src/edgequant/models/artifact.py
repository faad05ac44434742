"""The native artifact: a folder that reloads a quantized model without its source.

    OUT/
      config.json, tokenizer files   the model's own (transformers layout)
      model.safetensors              packed codes + parameters per quantized layer
                                     (<layer>.qweight, .scales, .zeros, .g_idx, …) and every
                                     other tensor in the recipe's keep_dtype
      edgequant.json                 recipe, per-layer schemes, source identity (sha256),
                                     calibration description, library versions, file sha256

Nothing is pickled. Loading checks the manifest and the weights' checksum, then validates
every tensor name, shape and dtype from the safetensors header before reading any data.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import ArtifactError
from ..formats.tensor import validate_layout
from ..io_utils import atomic_dir, sha256_file
from ..nn.modules import module_class
from ..nn.quant_linear import QuantLinear
from ..nn.surgery import replace_module
from ..recipe import Recipe
from ..versions import installed_versions
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    QUANTIZED_TENSORS,
    WEIGHTS,
    artifact_info,
    is_artifact,
    read_manifest,
)
from .model import Model, quantized_tensor_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["MANIFEST", "WEIGHTS", "artifact_info", "is_artifact", "load_artifact",
           "read_manifest", "save_artifact", "stored_quantized_tensors"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _stored_tensors(model: Model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (tied duplicates once) and the map of tied names to their twin."""
    assert model.recipe is not None
    keep = getattr(torch, model.recipe.keep_dtype)
    qnames = quantized_tensor_names(model.module)
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in model.module.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            tied[name] = seen[t.data_ptr()]
            continue
        seen[t.data_ptr()] = name
        if t.is_floating_point() and name not in qnames:
            t = t.to(keep)
        out[name] = t.detach().contiguous()
    return out, tied


def stored_quantized_tensors(module: nn.Module) -> dict[str, list[str]]:
    """Per quantized layer, the names of its stored codes and parameters (``qweight``,
    ``scales``, …): written to the manifest so that sizes are read without torch."""
    return {n: sorted(m.quantized().tensors()) for n, m in module.named_modules()
            if isinstance(m, QuantLinear)}


def save_artifact(model: Model, path: Path, force: bool = False) -> Path:
    """Write ``model`` (which must be quantized) as a native artifact folder at ``path``."""
    if model.recipe is None:
        raise ArtifactError("only quantized models are saved as edgequant artifacts; "
                            "quantize it first (eq.quantize) or export it (eq.export)")
    from transformers import PretrainedConfig

    tensors, tied = _stored_tensors(model)
    with atomic_dir(path, force=force) as tmp:
        config = model.module.config
        if not isinstance(config, PretrainedConfig):
            raise ArtifactError(f"{type(model.module).__name__} is not a transformers model "
                                "(it has no PretrainedConfig); an artifact cannot describe it")
        config = copy.deepcopy(config)  # the caller's model stays as it was
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": model.source,
            "recipe": model.recipe.to_dict(),
            "layers": model.layers,
            "tied": tied,
            "calibration": model.calibration,
            "versions": installed_versions("safetensors", "gguf"),
            "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
            QUANTIZED_TENSORS: stored_quantized_tensors(model.module),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _header(weights: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(k)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ArtifactError(f"{weights}: tensor {k} has unsupported dtype "
                                        f"{sl.get_dtype()}")
                out[k] = (tuple(sl.get_shape()), dtype)
            return out
    except safetensors.SafetensorError as e:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {e}") from None


def layer_class(record: dict[str, Any]) -> type[QuantLinear]:
    """The quantized module class a manifest's layer record names."""
    cls = module_class(record.get("module", "quant_linear"))
    if not issubclass(cls, QuantLinear):
        raise ArtifactError(f"{cls.__name__} is not a quantized linear layer")
    return cls


def _skeleton(path: Path, manifest: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The model's modules with QuantLinear in place, weights uninitialised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import spec_for

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json cannot be read: {e}") from None
    spec_for(config)
    # Real (CPU) tensors, not meta: buffers outside the state dict (rotary inv_freq) must be
    # computed by the model's own constructor. no_init_weights skips the random init.
    from transformers.initialization import no_init_weights

    with no_init_weights():
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, rec in manifest["layers"].items():
        layer = layer_class(rec).skeleton(rec, where=name)
        try:
            replace_module(module, name, layer)
        except AttributeError:
            raise ArtifactError(f"manifest names layer {name}, which the model does not "
                                f"have") from None
    return module


def load_artifact(path: str | Path, dtype: torch.dtype = torch.float32) -> Model:
    """Load a native artifact folder, validating it before reading tensor data; its
    unquantized float tensors become ``dtype``."""
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    recipe = Recipe.from_dict(manifest["recipe"])
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} lacks {WEIGHTS}")
    if sha256_file(weights) != manifest["files"].get(WEIGHTS):
        raise ArtifactError(f"{weights} does not match the checksum in {MANIFEST}: the file "
                            f"is corrupt or was modified; re-create the artifact")
    module = _skeleton(path, manifest, dtype)
    keep = getattr(torch, recipe.keep_dtype)
    tied = manifest.get("tied", {})
    qnames = quantized_tensor_names(module)
    listed = manifest.get(QUANTIZED_TENSORS)
    if listed is not None and listed != stored_quantized_tensors(module):
        raise ArtifactError(f"{path / MANIFEST}: its {QUANTIZED_TENSORS} do not match the "
                            "layers' schemes; the manifest was modified, re-create the artifact")
    expected = {k: (tuple(t.shape), keep if t.is_floating_point() and k not in qnames else t.dtype)
                for k, t in module.state_dict().items() if k not in tied}
    validate_layout(_header(weights), expected, str(weights))
    state = safetensors.torch.load_file(str(weights))
    state = {k: v.to(dtype) if v.is_floating_point() and k not in qnames else v
             for k, v in state.items()}
    for name, twin in tied.items():
        state[name] = state[twin]
    module.load_state_dict(state, strict=True, assign=True)
    if tied:
        module.tie_weights()
    module.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Model(module, tokenizer, manifest["source"], recipe, manifest["layers"],
                 manifest.get("calibration"))
