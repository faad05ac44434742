"""Export a model to a GGUF file that llama.cpp loads: ``eq.export(model, path, "Q4_K_M")``.

The steps, each in its own module:

1. :func:`~edgequant.gguf.convert.convert` — tensors under GGUF names (q/k permuted, Gemma
   norms +1, …) and the metadata llama.cpp's loader reads;
2. :func:`~edgequant.gguf.mixtures.choose_types` — the GGML type of every tensor, exactly as
   ``llama_model_quantize`` picks it for the file type (including its fallbacks for rows
   that 256 does not divide: SmolLM2's hidden size 576 turns most ``Q4_K`` into ``Q5_0``);
3. :func:`~edgequant.gguf.quants.quantize` — byte-exact GGML encoders, weighted by an
   importance matrix when one is given (``--imatrix FILE`` or ``--calib CORPUS``);
4. a ``GGUFWriter`` streaming header, metadata, tensor table and then one tensor at a time
   into a temporary file beside the target, validated and renamed into place — a failure
   leaves neither the output nor a temporary file behind.

From an edgequant *quantized* model (a native artifact), the ``QuantLinear`` weights are
dequantized and encoded again into GGML blocks: a re-quantization, not a lossless carry-over
(it is exact only where our grid and the GGML grid coincide).

Example:
    >>> eq.export("smollm2-135m", "out/smollm2-q4km.gguf", "Q4_K_M")
    PosixPath('out/smollm2-q4km.gguf')
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter, Keys

from ..errors import GGUFError
from ..io_utils import atomic_file, check_output
from . import quants
from .convert import Conversion, convert
from .imatrix import ImportanceMatrix, collect, llama_cpp_imatrix
from .mixtures import FILE_TYPES, TensorInfo, bits_per_weight, choose_types
from .reader import inspect_gguf

__all__ = ["ExportPlan", "export", "llama_cpp_quantize", "parse_file_type", "plan_export"]

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


def _no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    return items


def parse_file_type(ftype: str) -> str:
    """A llama.cpp file-type name, case-insensitive (``q4_k_m`` -> ``Q4_K_M``)."""
    name = str(ftype).strip().upper()
    if name not in FILE_TYPES:
        raise GGUFError(f"unknown GGUF file type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    return name


class ExportPlan:
    """What an export will write: the conversion, each tensor's GGML type, the imatrix."""

    def __init__(self, conv: Conversion, ftype: str, imatrix: ImportanceMatrix | None,
                 gptq: bool = False) -> None:
        self.conv, self.ftype, self.imatrix, self.gptq = conv, ftype, imatrix, gptq
        infos = [TensorInfo(t.name, t.shape) for t in conv.tensors]
        self.infos = infos
        self._info = {t.name: t for t in infos}
        self.types = choose_types(infos, ftype, conv.n_layer, arch=conv.arch, n_gqa=conv.n_gqa,
                                  has_imatrix=imatrix is not None)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight over every tensor (llama.cpp's ``BPW`` figure)."""
        return bits_per_weight(self.infos, self.types)

    def nbytes(self, name: str) -> int:
        info = self._info[name]
        block, size = GGML_QUANT_SIZES[self.types[name]]
        return info.n_elements // block * size

    def encode(self, i: int) -> np.ndarray:
        """The bytes of tensor ``i``: float32 data through the chosen encoder."""
        t = self.conv.tensors[i]
        data = t.load()
        if data.shape != t.shape:
            raise GGUFError(f"{t.source}: shape {data.shape}, expected {t.shape}")
        weights = self.imatrix.weights(t.name) if self.imatrix is not None else None
        if weights is not None and weights.shape[-1] != t.shape[-1]:
            raise GGUFError(f"the imatrix entry for {t.name} has {weights.shape[-1]} columns, "
                            f"the tensor {t.shape[-1]}; it was made for another model")
        hessians = self.imatrix.hessians if self.imatrix is not None else None
        try:
            if self.gptq and hessians is not None and t.name in hessians:
                from ..methods.gptq_ggml import gptq_encode  # the one (torch) GPTQ solver

                return gptq_encode(data, self.types[t.name], hessians[t.name], weights)
            return quants.quantize(data, self.types[t.name], imatrix=weights)
        except GGUFError as e:
            raise GGUFError(f"{t.name} ({t.source}): {e}") from None


def plan_export(model: Any, ftype: str = "Q4_K_M",
                imatrix: ImportanceMatrix | str | os.PathLike[str] | None = None,
                calib: Any = None, progress: Progress = _no_progress,
                tokenizer_pre: str | None = None, gptq: bool = False) -> ExportPlan:
    """Convert ``model`` and choose every tensor's type (no file is written)."""
    ftype = parse_file_type(ftype)
    if imatrix is not None and calib is not None:
        raise GGUFError("give either an imatrix file or calibration data, not both")
    has_hessians = isinstance(imatrix, ImportanceMatrix) and imatrix.hessians is not None
    if gptq and calib is None and not has_hessians:
        raise GGUFError("gptq needs calibration data (calib=...; --calib CORPUS): an imatrix "
                        "file holds only the diagonal of the Hessian")
    conv = convert(model, pre=tokenizer_pre)
    if calib is not None:
        imatrix = collect(model, calib, progress=progress, hessians=gptq)
    elif imatrix is not None and not isinstance(imatrix, ImportanceMatrix):
        imatrix = ImportanceMatrix.load(imatrix)
    if isinstance(imatrix, ImportanceMatrix):
        wanted = {t.name for t in conv.tensors}
        if not wanted & set(imatrix.sums):
            raise GGUFError("the importance matrix has no entry for any tensor of this model "
                            f"(first entries: {sorted(imatrix.sums)[:3]})")
    return ExportPlan(conv, ftype, imatrix, gptq)


def export(model_or_source: Any, path: str | os.PathLike[str], ftype: str = "Q4_K_M",
           imatrix: ImportanceMatrix | str | os.PathLike[str] | None = None, calib: Any = None,
           force: bool = False, progress: Progress = _no_progress,
           tokenizer_pre: str | None = None, gptq: bool = False) -> Path:
    """Write ``model_or_source`` as a GGUF file of llama.cpp file type ``ftype``.

    Args:
        model_or_source: an edgequant ``Model`` (original or quantized), or anything
            ``eq.load`` takes (zoo name, HF folder, ``.gguf`` file, native artifact).
        path: the ``.gguf`` file to write.
        ftype: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
            ``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``.
        imatrix: an importance matrix (object or llama.cpp ``.gguf``/``.dat`` file).
        calib: calibration data to compute the importance matrix from instead
            (``eq.data.calibration(...)``, a corpus name, or token windows).
        force: overwrite an existing ``path``.
        progress: ``progress(items, total, what)`` wrapper for a progress bar.
        tokenizer_pre: llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer that
            :data:`~edgequant.gguf.tokenizer.KNOWN_PRE` does not recognise (e.g. ``gpt-2``).
        gptq: encode the block linears with GPTQ error feedback (needs ``calib``; see
            :mod:`edgequant.methods.gptq_ggml`). Same types and file layout, different codes.

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        GGUFError / UnsupportedArchitectureError: the model cannot be written as asked;
            nothing is left at ``path`` (nor a temporary file).
    """
    path = Path(path)
    check_output(path, force)
    ftype = parse_file_type(ftype)
    model = _as_model(model_or_source)
    plan = plan_export(model, ftype, imatrix, calib, progress, tokenizer_pre, gptq)
    write_gguf(plan, path, progress)
    return path


def write_gguf(plan: ExportPlan, path: Path, progress: Progress = _no_progress) -> None:
    """Stream ``plan`` into ``path`` atomically (temporary file, validate, rename)."""
    conv = plan.conv
    with atomic_file(path) as tmp:
        w = GGUFWriter(tmp, conv.arch)
        try:
            for key, value, vtype, sub in _file_kv(plan):
                w.add_key_value(key, value, vtype, sub_type=sub)
            for t in conv.tensors:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), plan.nbytes(t.name),
                                  raw_dtype=plan.types[t.name])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            order = range(len(conv.tensors))
            for i in progress(order, len(conv.tensors), f"encoding {plan.ftype}"):
                w.write_tensor_data(plan.encode(i).reshape(-1))
        finally:
            w.close()
        info = inspect_gguf(tmp)
        if len(info.tensors) != len(conv.tensors):
            raise GGUFError(f"wrote {len(info.tensors)} tensors, expected {len(conv.tensors)}")


def _file_kv(plan: ExportPlan) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    u32 = GGUFValueType.UINT32
    extra = [(Keys.General.FILE_TYPE, FILE_TYPES[plan.ftype], u32, None),
             (Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION, u32, None),
             (Keys.General.QUANTIZED_BY, "edgequant", GGUFValueType.STRING, None)]
    if plan.imatrix is not None:
        im = plan.imatrix
        extra += [("quantize.imatrix.entries_count", len(im), GGUFValueType.INT32, None),
                  ("quantize.imatrix.chunks_count", im.chunk_count, GGUFValueType.INT32, None)]
        if im.datasets:
            extra.append(("quantize.imatrix.dataset", im.datasets[0], GGUFValueType.STRING,
                          None))
    return [*plan.conv.kv, *extra, *plan.conv.tokenizer.items()]


def _as_model(source: Any) -> Any:
    if hasattr(source, "module") and hasattr(source, "tokenizer"):
        return source
    from .. import load

    return load(source)


# --- llama.cpp's own quantizer (the reference for tests and benchmarks) ---------------------


def llama_cpp_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str,
                       imatrix: ImportanceMatrix | str | os.PathLike[str] | None = None,
                       threads: int | None = None, force: bool = False) -> Path:
    """Quantize a F32/F16 GGUF with llama.cpp's ``llama_model_quantize`` (llama-cpp-python).

    This is llama.cpp's own ``llama-quantize``, run in-process: the yardstick our exporter is
    compared with. Atomic like :func:`export`.
    """
    import llama_cpp

    dst = Path(dst)
    check_output(dst, force)
    ftype = parse_file_type(ftype)
    if imatrix is not None and not isinstance(imatrix, ImportanceMatrix):
        imatrix = ImportanceMatrix.load(imatrix)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[ftype]
    params.nthread = threads or len(os.sched_getaffinity(0))
    keep: list[Any] = []
    if imatrix is not None:
        arr, keep = llama_cpp_imatrix(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_file(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
        if rc != 0:
            raise GGUFError(f"llama_model_quantize failed on {src} (status {rc})")
    del keep
    return dst
