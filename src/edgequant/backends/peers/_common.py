"""What every peer adapter shares: the source folder, the record beside the artifact, the
calibration tokens, loading a skeleton without weights, and honest size accounting.

An adapter never imports its tool at module load; it calls :func:`require` first, which turns
a missing library into a :class:`PeerUnavailableError` naming the extra to install.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import DataError, EdgequantError, ModelLoadError
from ...sizes import FLOAT_DTYPES, safetensors_table, size_record

if TYPE_CHECKING:
    import torch
    from torch import nn

MARKER = "edgequant-peer.json"
FORMAT_NAME = "edgequant-peer"
FORMAT_VERSION = 1
EXTRA = "peers"
INSTALL_HINT = f"pip install edgequant[{EXTRA}]"


class PeerError(EdgequantError):
    """A peer tool failed or refused; the message quotes the tool's own error."""


class PeerUnavailableError(PeerError, ImportError):
    """A peer tool's library is not importable (install the ``peers`` extra)."""


def require(module: str, dist: str | None = None) -> Any:
    """Import ``module`` (a peer's library) or raise :class:`PeerUnavailableError`.

    What the library prints while it is first imported goes to stderr, and so do the log
    sinks it sets up then (llmcompressor adds a loguru sink on ``sys.stdout`` at import):
    stdout is the caller's, for results such as ``edgequant eval --json``.
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module(module)
    except ImportError as e:  # also catches a monkeypatched None in sys.modules
        raise PeerUnavailableError(
            f"{dist or module} is not importable ({e}); install the peer tools with "
            f"`{INSTALL_HINT}`") from None


# --- the source ------------------------------------------------------------------------------


@dataclass
class Source:
    """An HF checkpoint folder of the original model, and its identity for the record."""

    folder: Path
    identity: dict[str, Any]


def _num_params(module: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for t in module.parameters():  # tied parameters once, buffers (rotary tables) not
        if t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        n += t.numel()
    return n


def _folder_num_params(folder: Path) -> int:
    """Parameters stored in a folder's safetensors (tied tensors are stored once)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        for _, (dtype, shape, _) in safetensors_table(f).items():
            if dtype in FLOAT_DTYPES:
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


@contextlib.contextmanager
def source_folder(source: Any) -> Iterator[Source]:
    """The original model as an HF folder: a folder as given, a zoo name pulled, a ``Model``
    (or a ``.gguf`` file, dequantized) written to a temporary folder that is removed after.

    Quantized models are refused: peers quantize the original weights.
    """
    from ...models.model import Model

    if isinstance(source, Model):
        if source.is_quantized:
            raise ModelLoadError("peer tools quantize original weights; give the source model "
                                 "(or its folder), not an already quantized one")
        with tempfile.TemporaryDirectory(prefix="edgequant-peer-src-") as tmp:
            folder = Path(tmp)
            _save_hf(source.module, source.tokenizer, folder)
            ident = {**source.source, "num_params": _num_params(source.module)}
            yield Source(folder, ident)
        return
    from ...models import zoo
    from ...models.sources import weights_sha256

    name = str(source)
    if isinstance(source, str) and source in zoo.ZOO:
        folder = zoo.pull(source)
        kind = "zoo"
    else:
        folder = Path(source).expanduser()
        kind = "hf_dir"
        if folder.is_file() and folder.suffix.lower() == ".gguf":
            from ... import load

            with source_folder(load(folder)) as src:
                yield src
            return
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{source} is neither a zoo name nor an HF checkpoint folder "
                                 "(config.json + *.safetensors); peers need one of those")
        name = folder.name
    ident = {"name": name, "path": str(folder.resolve()), "sha256": weights_sha256(folder),
             "kind": kind, "num_params": _folder_num_params(folder)}
    yield Source(folder, ident)


def _save_hf(module: Any, tokenizer: Any, folder: Path) -> None:
    config = module.config
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
    try:
        module.save_pretrained(folder)
    finally:
        if qc is not None:
            config.quantization_config = qc
    tokenizer.save_pretrained(folder)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "added_tokens.json", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files (and generation config) of ``src`` into ``dst``."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# --- calibration -----------------------------------------------------------------------------


def calibration_tokens(calib: Any, folder: Path, default_n: int = 128,
                       default_len: int = 512) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(N, T)`` int64 token windows and their description.

    ``calib`` may be a :class:`~edgequant.data.calibration.Calibration`, a
    :class:`~edgequant.data.calibration.CalibrationSpec` (built with the source's tokenizer),
    an ``(N, T)`` tensor, or None (the default spec: ``n=default_n``, ``seq_len=default_len``).
    """
    import torch

    from ...data.calibration import Calibration, CalibrationSpec, calibration

    if calib is None:
        calib = calibration(n=default_n, seq_len=default_len)
    if isinstance(calib, CalibrationSpec):
        calib = calib.build(load_tokenizer(folder))
    if isinstance(calib, Calibration):
        return calib.tokens.long(), dict(calib.description)
    if isinstance(calib, torch.Tensor):
        tokens = calib.long()
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise DataError(f"calibration tokens must be (samples, tokens), got "
                            f"{tuple(tokens.shape)}")
        return tokens, {"source": "tensor given", "n": int(tokens.shape[0]),
                        "seq_len": int(tokens.shape[1])}
    raise DataError(f"calibration must be a Calibration, a CalibrationSpec, a (N, T) tensor or "
                    f"None, not {type(calib).__name__}")


# --- the record ------------------------------------------------------------------------------


def write_record(folder: Path, record: dict[str, Any]) -> None:
    from ...io_utils import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".gguf")}
    full = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **record, "files": files}
    (folder / MARKER).write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MARKER
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder} is not a readable peer artifact ({MARKER}: {e})") from None
    if record.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is not an edgequant peer record")
    return record


# --- loading without the source weights --------------------------------------------------------


def empty_model(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The architecture of ``folder/config.json`` with parameters on the meta device (no
    memory); buffers (rotary tables) are real. Fill it with ``load_state_dict(assign=True)``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def check_no_meta(module: nn.Module, where: Path) -> None:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta]
    if left:
        raise ModelLoadError(f"{where}: the artifact lacks {len(left)} tensors "
                             f"(e.g. {', '.join(left[:3])}); it is incomplete or corrupt")


def save_dense_safetensors(state: dict[str, torch.Tensor], path: Path,
                           metadata: dict[str, str] | None = None) -> None:
    """``safetensors.save_file`` of a state dict, tied tensors stored once (the first name)."""
    import safetensors.torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    safetensors.torch.save_file(out, str(path), metadata=metadata or {"format": "pt"})


# --- size accounting -------------------------------------------------------------------------

def stored_size_info(folder: Path, layers: dict[str, int], data_suffixes: tuple[str, ...],
                     num_params: int, inline_data_bytes: int = 0) -> dict[str, Any]:
    """Size accounting from the artifact's safetensors headers.

    Args:
        layers: quantized linear layer name -> its weight count (out × in).
        data_suffixes: a quantized layer's tensors that hold its weight data (codes, scales,
            zeros, block states); its other tensors are metadata (codebooks, shapes, config
            scalars, serialized quant-state blobs) and its bias is a dense tensor.
        num_params: the original model's parameter count.
        inline_data_bytes: per-layer weight data the tool keeps inside a metadata tensor
            (bitsandbytes' nested offset, one fp32 in its quant-state blob): counted as data.

    ``bits_per_weight`` counts the data tensors over the quantized weights; ``metadata_bytes``
    says what per-layer metadata the tool stores besides (it is in ``bits_per_weight_total``
    and ``size_bytes``).
    """
    files = sorted(folder.glob("*.safetensors"))
    table: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for f in files:
        table.update(safetensors_table(f))
    data = meta = 0
    for name, (_, _, nbytes) in table.items():
        layer, _, suffix = _split_layer(name, layers)
        if layer is None:
            continue
        if suffix in data_suffixes:
            data += nbytes
        elif suffix != "bias":
            meta += nbytes
    moved = min(meta, inline_data_bytes * len(layers))
    data, meta = data + moved, meta - moved
    q_params = sum(layers.values())
    return size_record(num_params=num_params, weight_bytes=sum(b for _, _, b in table.values()),
                       linear_params=q_params, linear_bytes=data,
                       size_bytes=sum(f.stat().st_size for f in files), on_disk=True,
                       quantized_params=q_params, quantized_layers=len(layers),
                       metadata_bytes=meta)


def _split_layer(name: str, layers: dict[str, int]) -> tuple[str | None, str, str]:
    """The quantized layer a tensor name belongs to (longest matching prefix) and the rest."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix, ".", ".".join(parts[i:])
    return None, "", name
