"""Export a model to a GGUF file that llama.cpp loads: ``eq.export(model, path, "Q4_K_M")``.

The steps, each in its own module:

1. :func:`~edgequant.exporters.convert.convert` — tensors under GGUF names (q/k permuted, Gemma
   norms +1, …) and the metadata llama.cpp's loader reads;
2. a :class:`~edgequant.recipe.Recipe` says each tensor's GGML type: a llama.cpp file type
   (``Q4_K_M``) becomes the recipe :func:`mixture_recipe` (the per-tensor types
   ``llama_model_quantize`` picks, by :func:`~edgequant.gguf.mixtures.choose_types`,
   including its fallbacks for rows that 256 does not divide: SmolLM2's hidden size 576 turns
   most ``Q4_K`` into ``Q5_0``), or the caller gives a recipe of GGML types per layer;
3. the recipe's quantizer encodes: ``rtn`` — the byte-exact GGML encoders
   (:func:`~edgequant.gguf.quants.quantize`), weighted by an importance matrix when one is
   given (``--imatrix FILE`` or ``--calib CORPUS``); ``gptq`` — the same encoders inside
   GPTQ's error feedback (:mod:`edgequant.methods.gptq`), from the statistics engine's
   Hessians;
4. a ``GGUFWriter`` streaming header, metadata (the recipe included, as ``edgequant.recipe``),
   tensor table and then one tensor at a time into a temporary file beside the target,
   validated and renamed into place — a failure leaves neither the output nor a temporary
   file behind.

From an edgequant *quantized* model (a native artifact), the ``QuantLinear`` weights are
dequantized and encoded again into GGML blocks: a re-quantization, not a lossless carry-over
(it is exact only where our grid and the GGML grid coincide).

Example:
    >>> eq.export("smollm2-135m", "out/smollm2-q4km.gguf", "Q4_K_M")
    PosixPath('out/smollm2-q4km.gguf')
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys

from ..errors import GGUFError
from ..gguf import quants
from ..gguf.imatrix import ImportanceMatrix, llama_cpp_imatrix
from ..gguf.mixtures import (
    FILE_TYPES,
    TensorInfo,
    bits_per_weight,
    choose_types,
    default_type,
    fallback,
    tensor_allows_quantization,
)
from ..gguf.reader import inspect_gguf
from ..io_utils import atomic_file, check_output
from ..methods.gptq import GPTQConfig
from ..methods.gptq_ggml import gptq_encode
from ..methods.rtn import RTNConfig
from ..progress import Progress, no_progress
from ..recipe import Recipe
from .convert import Conversion, convert
from .imatrix import collect

__all__ = ["ExportPlan", "export", "llama_cpp_quantize", "mixture_recipe", "parse_file_type",
           "plan_export", "recipe_types"]

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
RECIPE_KEY = "edgequant.recipe"
_KEEP_TYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def parse_file_type(ftype: str) -> str:
    """A llama.cpp file-type name, case-insensitive (``q4_k_m`` -> ``Q4_K_M``)."""
    name = str(ftype).strip().upper()
    if name not in FILE_TYPES:
        raise GGUFError(f"unknown GGUF file type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    return name


def _module_of(source: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` → ``model.layers.0.mlp.down_proj``."""
    return source.rsplit(".", 1)[0]


def mixture_recipe(conv: Conversion, ftype: str, has_imatrix: bool = False,
                   quantizer: Any = None) -> Recipe:
    """llama.cpp's file type ``ftype`` as a recipe for this model: every tensor llama.cpp
    quantizes is listed under its module path with the type ``llama_model_quantize`` gives
    it (:func:`~edgequant.gguf.mixtures.choose_types`), so :func:`recipe_types` of the
    result is exactly llama.cpp's choice."""
    ftype = parse_file_type(ftype)
    infos = [TensorInfo(t.name, t.shape) for t in conv.tensors]
    types = choose_types(infos, ftype, conv.n_layer, arch=conv.arch, n_gqa=conv.n_gqa,
                         has_imatrix=has_imatrix)
    formats = tuple((_module_of(t.source), types[t.name].name) for t, i in
                    zip(conv.tensors, infos, strict=True) if tensor_allows_quantization(i))
    return Recipe(quantizer=quantizer if quantizer is not None else RTNConfig(),
                  scheme=default_type(ftype).name, formats=formats)


def recipe_types(conv: Conversion, recipe: Recipe) -> dict[str, GGMLQuantizationType]:
    """Each tensor's GGML type under ``recipe``: tensors llama.cpp never quantizes (norms,
    vectors) stay F32; the others take the recipe's format for their module (a type whose
    block does not divide the row falls back as llama.cpp's does), or ``keep_dtype``."""
    out = {}
    for t in conv.tensors:
        info = TensorInfo(t.name, t.shape)
        if not tensor_allows_quantization(info):
            out[t.name] = GGMLQuantizationType.F32
            continue
        fmt = recipe.format_for(_module_of(t.source), in_blocks=t.name.startswith("blk."))
        if fmt is None:
            fmt = _KEEP_TYPES[recipe.keep_dtype]
        if not isinstance(fmt, str):
            raise GGUFError(f"{t.source}: {fmt.name} is a native scheme; a GGUF file holds GGML "
                            "types (Q4_0 … Q8_0, Q2_K … Q6_K, F16): use them in the recipe, or "
                            "a llama.cpp file type such as Q4_K_M")
        out[t.name] = fallback(GGMLQuantizationType[fmt], info.row_length)
    return out


def _check_overrides_match(conv: Conversion, overrides: tuple[tuple[str, str], ...]) -> None:
    """An override that names no tensor would silently change nothing: refuse it (a tied
    ``lm_head`` has no tensor of its own; the embedding is written for both)."""
    modules = sorted({_module_of(t.source) for t in conv.tensors
                      if tensor_allows_quantization(TensorInfo(t.name, t.shape))})
    for pattern, _ in overrides:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            raise GGUFError(f"override {pattern!r} matches no tensor of this model (a tied "
                            f"lm_head is stored as the embedding); modules: "
                            f"{', '.join(modules[:3])}, …, {modules[-1]}")


class ExportPlan:
    """What an export will write: the conversion, the recipe, each tensor's GGML type, the
    importance matrix (and Hessians, for the GPTQ quantizer).

    Attributes:
        ftype: the llama.cpp file type it was made from (None for a custom recipe).
    """

    def __init__(self, conv: Conversion, recipe: Recipe, imatrix: ImportanceMatrix | None,
                 ftype: str | None = None) -> None:
        self.conv, self.recipe, self.imatrix, self.ftype = conv, recipe, imatrix, ftype
        self.gptq = isinstance(recipe.quantizer, GPTQConfig)
        infos = [TensorInfo(t.name, t.shape) for t in conv.tensors]
        self.infos = infos
        self._info = {t.name: t for t in infos}
        self.types = recipe_types(conv, recipe)

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
                return gptq_encode(data, self.types[t.name], hessians[t.name], weights,
                                   self.recipe.quantizer)
            return quants.quantize(data, self.types[t.name], imatrix=weights)
        except GGUFError as e:
            raise GGUFError(f"{t.name} ({t.source}): {e}") from None


def plan_export(model: Any, target: str | Recipe = "Q4_K_M",
                imatrix: ImportanceMatrix | str | os.PathLike[str] | None = None,
                calib: Any = None, progress: Progress = no_progress,
                tokenizer_pre: str | None = None, gptq: bool = False,
                overrides: tuple[tuple[str, str], ...] = ()) -> ExportPlan:
    """Convert ``model`` and choose every tensor's type (no file is written).

    ``target`` is a llama.cpp file type (its mixture; ``gptq`` picks the GPTQ quantizer) or
    a :class:`Recipe` of GGML types (its quantizer: ``rtn`` or ``gptq``; no transforms).
    ``overrides`` (``(pattern, GGML type)``) are applied after either, last match winning.
    """
    ftype = None if isinstance(target, Recipe) else parse_file_type(target)
    if isinstance(target, Recipe):
        if gptq:
            raise GGUFError("with a recipe, choose GPTQ as its quantizer, not with gptq=True")
        if target.transforms:
            raise GGUFError(f"the GGUF exporter runs no transforms ({target.name}); quantize "
                            "natively first, or export the float model")
        gptq = isinstance(target.quantizer, GPTQConfig)
        if not gptq and not isinstance(target.quantizer, RTNConfig):
            raise GGUFError(f"the GGUF exporter encodes with rtn (llama.cpp's encoders) or "
                            f"gptq, not {target.quantizer_name}")
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
    recipe = target if isinstance(target, Recipe) else mixture_recipe(
        conv, target, imatrix is not None, GPTQConfig() if gptq else None)
    if overrides:
        _check_overrides_match(conv, overrides)
        recipe, ftype = recipe.with_formats(overrides), None  # no longer llama.cpp's mixture
    return ExportPlan(conv, recipe, imatrix, ftype)


def export(model_or_source: Any, path: str | os.PathLike[str], ftype: str | Recipe = "Q4_K_M",
           imatrix: ImportanceMatrix | str | os.PathLike[str] | None = None, calib: Any = None,
           force: bool = False, progress: Progress = no_progress,
           tokenizer_pre: str | None = None, gptq: bool = False,
           overrides: tuple[tuple[str, str], ...] = ()) -> Path:
    """Write ``model_or_source`` as a GGUF file of llama.cpp file type ``ftype``.

    Args:
        model_or_source: an edgequant ``Model`` (original or quantized), or anything
            ``eq.load`` takes (zoo name, HF folder, ``.gguf`` file, native artifact).
        path: the ``.gguf`` file to write.
        ftype: ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
            ``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``, ``Q6_K``; or a
            :class:`Recipe` of GGML types per layer (``Recipe(scheme="Q4_K",
            formats={"*.down_proj": "Q6_K", "lm_head": "Q8_0"})``).
        imatrix: an importance matrix (object or llama.cpp ``.gguf``/``.dat`` file).
        calib: calibration data to compute the importance matrix from instead
            (``eq.data.calibration(...)``, a corpus name, or token windows).
        force: overwrite an existing ``path``.
        progress: ``progress(items, total, what)`` wrapper for a progress bar.
        tokenizer_pre: llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer that
            :data:`~edgequant.gguf.tokenizer.KNOWN_PRE` does not recognise (e.g. ``gpt-2``).
        gptq: encode the block linears with GPTQ error feedback (needs ``calib``; see
            :mod:`edgequant.methods.gptq`). Same types and file layout, different codes.
        overrides: ``(pattern, GGML type)`` pairs on module names applied after ``ftype``,
            e.g. ``(("*.down_proj", "Q6_K"),)`` (an override that names no tensor is refused).

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        GGUFError / UnsupportedArchitectureError: the model cannot be written as asked;
            nothing is left at ``path`` (nor a temporary file).
    """
    path = Path(path)
    check_output(path, force)
    if not isinstance(ftype, Recipe):
        ftype = parse_file_type(ftype)
    model = _as_model(model_or_source)
    plan = plan_export(model, ftype, imatrix, calib, progress, tokenizer_pre, gptq, overrides)
    write_gguf(plan, path, progress)
    return path


def write_gguf(plan: ExportPlan, path: Path, progress: Progress = no_progress) -> None:
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
            what = f"encoding {plan.ftype or plan.recipe.scheme}"
            for i in progress(order, len(conv.tensors), what):
                w.write_tensor_data(plan.encode(i).reshape(-1))
        finally:
            w.close()
        info = inspect_gguf(tmp)
        if len(info.tensors) != len(conv.tensors):
            raise GGUFError(f"wrote {len(info.tensors)} tensors, expected {len(conv.tensors)}")


def _file_kv(plan: ExportPlan) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    u32, text = GGUFValueType.UINT32, GGUFValueType.STRING
    extra: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
    if plan.ftype is not None:
        extra.append((Keys.General.FILE_TYPE, FILE_TYPES[plan.ftype], u32, None))
    extra += [(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION, u32, None),
              (Keys.General.QUANTIZED_BY, "edgequant", text, None),
              (RECIPE_KEY, json.dumps(plan.recipe.to_dict(), separators=(",", ":")), text, None)]
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
