"""Importance matrices: per-column activation energy of every linear, llama.cpp's way.

For a linear ``y = W x`` llama.cpp's ``llama-imatrix`` accumulates, over calibration tokens,
``Σ x_j²`` for every input column ``j`` and the token count; ``llama-quantize --imatrix`` then
weights each column's rounding error by ``Σ x_j² / count`` in the K-quant (and legacy) scale
searches. :func:`edgequant.exporters.imatrix.collect` computes the same sums with the statistics
engine (the block linears, under their GGUF names: q, k and v see the same input and each get
the same entry, as in llama.cpp); :class:`ImportanceMatrix` (numpy only) saves and loads both
of llama.cpp's file formats, so ``llama-quantize`` reads our files and we read its files:

================ ===========================================================================
``*.gguf``       llama.cpp's current format: tensors ``<name>.in_sum2`` (F32, Σx²) and
                 ``<name>.counts`` (F32, tokens), keys ``general.type = "imatrix"``,
                 ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``
``*.dat``        the legacy format: ``i32 n``; per entry ``i32 len, name, i32 ncall,
(any other       i32 nval, f32 values[nval]`` with ``values = Σx²/count · ncall``; then
suffix)          ``i32 chunk_count, i32 len, dataset``
================ ===========================================================================

Like ``llama-imatrix`` (without ``--process-output``), only tensors inside blocks get entries.

Example:
    >>> im = edgequant.exporters.imatrix.collect(model, eq.data.calibration("wiki", n=64))
    >>> im.save("smollm2.imatrix.gguf")
    >>> weights = ImportanceMatrix.load("smollm2.imatrix.gguf").weights("blk.0.attn_q.weight")
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GGUFError
from ..io_utils import atomic_file

__all__ = ["ImportanceMatrix", "llama_cpp_imatrix"]

_GGUF_MAGIC = b"GGUF"


@dataclass
class ImportanceMatrix:
    """Σx² per input column and token counts, keyed by GGUF tensor name.

    Attributes:
        sums: ``name -> float32 (n_cols,)``, the sum of squared inputs over all tokens.
        counts: ``name -> tokens`` seen by that tensor.
        datasets: what the data was (kept in the file).
        chunk_count / chunk_size: llama.cpp's bookkeeping: windows and tokens per window.
        hessians: ``name -> float64 (n_cols, n_cols)``, Σ x xᵀ, when collected for GPTQ
            (kept in memory only; never written to a file). Linears that read the same
            input (q/k/v, gate/up) share one array.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    hessians: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = set(self.sums) ^ set(self.counts)
        if missing:
            raise GGUFError(f"imatrix entries without both sums and counts: {sorted(missing)[:4]}")

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    def weights(self, name: str) -> np.ndarray | None:
        """The column weights llama.cpp's quantizer uses for ``name``: Σx² / count (None
        when there is no entry; ones when the entry saw no token, as llama.cpp does)."""
        if name not in self.sums:
            return None
        s = np.asarray(self.sums[name], dtype=np.float32)
        n = self.counts[name]
        return s / np.float32(n) if n > 0 else np.ones_like(s)

    # --- files --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
        """Write llama.cpp's GGUF format (``.gguf`` suffix or ``fmt="gguf"``) or the legacy
        ``.dat`` format (any other suffix, or ``fmt="dat"``); atomically."""
        path = Path(path)
        fmt = fmt or ("gguf" if path.suffix.lower() == ".gguf" else "dat")
        if fmt not in ("gguf", "dat"):
            raise GGUFError(f"imatrix format {fmt!r}: choose 'gguf' or 'dat'")
        if not self.sums:
            raise GGUFError("the importance matrix is empty; nothing to save")
        with atomic_file(path) as tmp:
            (self._save_gguf if fmt == "gguf" else self._save_dat)(tmp)
        return path

    def _save_gguf(self, path: Path) -> None:
        from gguf import GGUFWriter

        w = GGUFWriter(path, arch="imatrix")
        w.kv_data[0].clear()  # no general.architecture: llama.cpp's own files have none
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", self.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", self.chunk_count)
        w.add_uint32("imatrix.chunk_size", self.chunk_size)
        for name in sorted(self.sums):
            w.add_tensor(f"{name}.in_sum2", np.asarray(self.sums[name], np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[self.counts[name]]], np.float32))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    def _save_dat(self, path: Path) -> None:
        chunk = max(1, self.chunk_size)
        with open(path, "wb") as f:
            f.write(struct.pack("<i", len(self.sums)))
            for name in sorted(self.sums):
                raw = name.encode()
                ncall = max(1, -(-self.counts[name] // chunk))
                mean = self.weights(name)
                assert mean is not None
                vals = mean * np.float32(ncall)
                f.write(struct.pack("<i", len(raw)) + raw)
                f.write(struct.pack("<ii", ncall, vals.size))
                f.write(np.asarray(vals, "<f4").tobytes())
            dataset = (self.datasets[-1] if self.datasets else "").encode()
            f.write(struct.pack("<ii", self.chunk_count, len(dataset)) + dataset)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImportanceMatrix:
        """Read either llama.cpp format (told apart by the GGUF magic)."""
        path = Path(path)
        if not path.is_file():
            raise GGUFError(f"imatrix file {path} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
        try:
            return cls._load_gguf(path) if magic == _GGUF_MAGIC else cls._load_dat(path)
        except GGUFError:
            raise
        except (ValueError, struct.error, KeyError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path} is not a readable imatrix file ({e}); make it again with "
                            "`edgequant imatrix` or llama-imatrix") from None

    @classmethod
    def _load_gguf(cls, path: Path) -> ImportanceMatrix:
        from .reader import inspect_gguf

        info = inspect_gguf(path)
        from gguf import GGUFReader

        reader = GGUFReader(path)
        sums, counts = {}, {}
        for t in reader.tensors:
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = np.array(t.data, np.float32).reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = int(round(float(np.sum(t.data))))
        if not sums:
            raise GGUFError(f"{path} is a GGUF file without imatrix entries (*.in_sum2)")
        datasets = info.kv.get("imatrix.datasets", [])
        return cls(sums, counts, list(datasets), int(info.kv.get("imatrix.chunk_count", 0)),
                   int(info.kv.get("imatrix.chunk_size", 0)))

    @classmethod
    def _load_dat(cls, path: Path) -> ImportanceMatrix:
        data = path.read_bytes()
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            out = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return out

        (n,) = take("<i")
        if not 0 < n < 1 << 20:
            raise GGUFError(f"{path} is neither a GGUF nor a legacy .dat imatrix (entry count {n})")
        sums, counts = {}, {}
        for _ in range(n):
            (length,) = take("<i")
            name = data[pos: pos + length].decode()
            pos += length
            ncall, nval = take("<ii")
            if nval < 1 or pos + 4 * nval > len(data):
                raise GGUFError(f"{path} is truncated in entry {name!r}")
            vals = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
            pos += 4 * nval
            # legacy values are Σx²/count·ncall: keep mean·ncall as sums, ncall as count
            sums[name], counts[name] = (vals, ncall) if ncall > 0 else (vals, 1)
        chunk_count, datasets = 0, []
        if pos + 8 <= len(data):
            chunk_count, length = take("<ii")
            if length > 0:
                datasets.append(data[pos: pos + length].decode(errors="replace"))
        return cls(sums, counts, datasets, chunk_count, 0)


# --- llama.cpp ------------------------------------------------------------------------------


def llama_cpp_imatrix(imatrix: ImportanceMatrix) -> tuple[Any, list[Any]]:
    """``imatrix`` as the ``llama_model_imatrix_data`` array ``llama_model_quantize`` takes.

    Returns ``(array, keepalive)``: keep ``keepalive`` referenced while llama.cpp runs.
    """
    import llama_cpp

    entries = sorted(imatrix.sums)
    arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep: list[Any] = [arr]
    for i, name in enumerate(entries):
        w = np.ascontiguousarray(imatrix.weights(name), dtype=np.float32)
        raw = name.encode()
        keep += [w, raw]
        arr[i].name = raw
        arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = w.size
    arr[len(entries)].name = None
    return arr, keep
