"""Peer tools behind one interface: each established quantizer makes an artifact in its own
format, and opens it as a :class:`~edgequant.backends.base.Runnable` that the same evaluation
code measures.

    from edgequant.backends import peers
    m = peers.get("bnb-nf4-dq")
    path = m.make("smollm2-135m", "out/smollm2-bnb-nf4-dq")   # the tool's own files + record
    with m.open(path) as r:                                    # no fp32 source in memory
        r.logits(r.tokenize("Hello"))
    peers.available()                                          # methods whose tool imports

An artifact is a folder::

    OUT/
      edgequant-peer.json      marker + record: method, tool and version, the tool's config,
                               source identity (sha256, num_params), calibration, make seconds,
                               how it reloads, sha256 of the weight files
      ...                      the tool's own files (safetensors + config, or a .gguf)
      tokenizer files

The ``peer`` backend (``open_runnable(OUT)``, or ``backend="peer"``) is registered in
:mod:`edgequant.backends.base`, which recognises an artifact by its marker and imports this
package only to open one: no peer library is imported until a peer is used.

Every name maps to a frozen :class:`PeerMethod`; the table below is data, one adapter module
per tool implements ``make``/``open`` (``bnb``, ``llamacpp_quant``, ``llmcompressor``,
``hqq_peer``, ``quanto``, ``torchao_peer``, ``gptqmodel_peer``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...errors import EdgequantError, ModelLoadError
from ...versions import installed_versions, version_of
from ..base import Runnable
from ._common import (
    EXTRA,
    INSTALL_HINT,
    MARKER,
    PeerError,
    PeerUnavailableError,
    calibration_tokens,
    copy_tokenizer,
    read_record,
    require,
    source_folder,
    write_record,
)

__all__ = ["EXTRA", "INSTALL_HINT", "MARKER", "PeerError", "PeerMethod", "PeerUnavailableError",
           "available", "get", "is_peer_artifact", "names", "open_peer", "register", "tools"]


@dataclass(frozen=True)
class PeerMethod:
    """One way a peer tool quantizes a model.

    Attributes:
        name: registry name, e.g. ``bnb-nf4-dq``.
        tool: the tool's distribution name (``bitsandbytes``), whose version is recorded.
        module: the import name that must be importable (``bitsandbytes``).
        adapter: our adapter module in this package (``bnb``).
        scheme_label: what the numbers look like, in words (``nf4 b64 fp32 absmax, dq``).
        options: the adapter's options and their defaults (override per ``make`` call).
        calibrated: whether ``make`` feeds calibration windows to the tool.
        cpu: whether it runs on CPU (all registered methods do, some slowly).
        note: what a reader of a report must know (fallbacks, slowness).
    """

    name: str
    tool: str
    module: str
    adapter: str
    scheme_label: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    calibrated: bool = False
    cpu: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def _adapter(self) -> Any:
        return importlib.import_module(f"{__name__}.{self.adapter}")

    def available(self) -> bool:
        """Whether the tool's module can be found (not imported: some take seconds)."""
        return _findable(self.module)

    def make(self, source: Any, out_dir: str | os.PathLike[str], calib: Any = None, *,
             force: bool = False, **options: Any) -> Path:
        """Quantize ``source`` with the tool; write the artifact folder ``out_dir``.

        Args:
            source: an HF checkpoint folder, a zoo name, a ``.gguf`` file or an (original)
                ``edgequant.Model``.
            out_dir: the artifact folder (written atomically; an existing one needs ``force``).
            calib: calibration for calibrated methods: ``Calibration``, ``CalibrationSpec``,
                ``(N, T)`` token tensor, or None (``eq.data.calibration()`` defaults).
            options: override :attr:`options` (unknown names are refused).

        Returns:
            ``out_dir``.

        Raises:
            PeerUnavailableError: the tool is not installed.
            PeerError: the tool failed or refused (its message is quoted).
        """
        from ...io_utils import atomic_dir

        unknown = set(options) - set(self.options)
        if unknown:
            raise PeerError(f"{self.name} has no option(s) {', '.join(sorted(unknown))}; it "
                            f"takes: {', '.join(self.options) or 'none'}")
        adapter = self._adapter()
        _before_import(adapter)
        require(self.module, self.tool)
        opts = {**self.options, **options}
        out = Path(out_dir)
        with source_folder(source) as src, atomic_dir(out, force=force) as tmp:
            tokens, calib_desc = (calibration_tokens(calib, src.folder) if self.calibrated
                                  else (None, None))
            t0 = time.perf_counter()
            try:
                result = adapter.make(self, src, tmp, tokens, opts)
            except EdgequantError:
                raise
            except Exception as e:
                raise PeerError(self._tool_error("making", e)) from e
            make_s = time.perf_counter() - t0
            copy_tokenizer(src.folder, tmp)
            write_record(tmp, {
                "method": self.name, "tool": self.tool, "tool_version": version_of(self.tool),
                "scheme_label": self.scheme_label, "options": opts, "source": src.identity,
                "calibration": calib_desc, "make_s": round(make_s, 3),
                "versions": installed_versions(self.tool), **result})
        return out

    def open(self, artifact: str | os.PathLike[str], **options: Any) -> Runnable:
        """Open an artifact this method made (see :func:`open_peer`)."""
        record = read_record(artifact)
        if record["method"] != self.name:
            raise ModelLoadError(f"{artifact} was made by {record['method']}, not {self.name}")
        return open_peer(artifact, **options)

    def _tool_error(self, doing: str, e: Exception) -> str:
        lines = [s for s in str(e).strip().splitlines() if s.strip()]
        first = lines[0][:300] if lines else ""
        return (f"{self.tool} {version_of(self.tool) or ''} failed {doing} {self.name}: "
                f"{type(e).__name__}: {first}").replace("  ", " ")


def _before_import(adapter: Any) -> None:
    """An adapter's settings that its tool reads at import (environment variables)."""
    hook = getattr(adapter, "before_import", None)
    if hook is not None:
        hook()


_PEERS: dict[str, PeerMethod] = {}


def register(method: PeerMethod) -> PeerMethod:
    """Add a method to the registry (a name is registered once)."""
    if method.name in _PEERS:
        raise ValueError(f"peer method {method.name!r} is already registered")
    _PEERS[method.name] = method
    return method


def get(name: str) -> PeerMethod:
    try:
        return _PEERS[name]
    except KeyError:
        raise PeerError(f"unknown peer method {name!r}; known: {', '.join(_PEERS)}") from None


def names(tool: str | None = None) -> list[str]:
    """Registered method names (of one tool, if given)."""
    return [n for n, m in _PEERS.items() if tool is None or m.tool == tool]


def _findable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def tools() -> dict[str, str | None]:
    """Each peer tool and its installed version (None: not installed)."""
    out: dict[str, str | None] = {}
    for m in _PEERS.values():
        if m.tool not in out:
            out[m.tool] = version_of(m.tool) if _findable(m.module) else None
    return out


def available() -> list[str]:
    """Names of the methods whose tool is importable (found on the path)."""
    return [n for n, m in _PEERS.items() if m.available()]


# --- the backend ------------------------------------------------------------------------------


def is_peer_artifact(source: Any) -> bool:
    return isinstance(source, str | os.PathLike) and (Path(source) / MARKER).is_file()


def open_peer(source: Any, threads: int | None = None, **options: Any) -> Runnable:
    """The ``peer`` backend's opener: a peer artifact folder as a Runnable, loaded from the
    artifact alone (see each adapter for the tools that cannot, and what they do instead)."""
    if not is_peer_artifact(source):
        raise ModelLoadError(f"{source} is not a peer artifact (no {MARKER})")
    path = Path(source).expanduser().resolve()
    record = read_record(path)
    method = get(record["method"])
    adapter = method._adapter()
    _before_import(adapter)
    require(method.module, method.tool)
    if getattr(adapter, "TAKES_THREADS", False):
        options["threads"] = threads
    elif threads is not None:  # torch runtimes: as the torch backend does, when asked
        import torch

        torch.set_num_threads(threads)
    try:
        runnable: Runnable = adapter.open(method, path, record, **options)
    except EdgequantError:
        raise
    except Exception as e:
        raise PeerError(method._tool_error("opening", e)) from e
    return runnable


# --- the table ----------------------------------------------------------------------------------

_name: str
_label: str
_note: str
_opts: dict[str, Any]
_BNB = "bitsandbytes"
for _name, _label, _opts in (
    ("bnb-nf4", "nf4, blocks of 64, fp32 absmax", {"quant_type": "nf4", "double_quant": False}),
    ("bnb-nf4-dq", "nf4, blocks of 64, absmax double-quantized (8-bit, blocks of 256)",
     {"quant_type": "nf4", "double_quant": True}),
    ("bnb-fp4", "bnb fp4, blocks of 64, fp32 absmax", {"quant_type": "fp4", "double_quant": False}),
    ("bnb-fp4-dq", "bnb fp4, blocks of 64, absmax double-quantized",
     {"quant_type": "fp4", "double_quant": True}),
):
    register(PeerMethod(_name, _BNB, _BNB, "bnb", _label, _opts))
register(PeerMethod("bnb-int8", _BNB, _BNB, "bnb",
                    "LLM.int8: int8 per-row absmax, fp16 outlier columns (threshold 6)",
                    {"threshold": 6.0},
                    note="bitsandbytes' 8-bit matmul casts activations to fp16 on CPU"))

_LLAMA = "llama-cpp-python"
_LLAMA_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
                "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_S", "IQ3_M",
                "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
                "TQ1_0", "TQ2_0")
_NEEDS_IMATRIX = ("IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K_S")
for _t in _LLAMA_TYPES:
    for _imat in (False, True):
        if _t in _NEEDS_IMATRIX and not _imat:
            continue
        register(PeerMethod(
            f"llamacpp-{_t}{'-imat' if _imat else ''}", _LLAMA, "llama_cpp", "llamacpp_quant",
            f"llama.cpp {_t}{' with an importance matrix' if _imat else ''} (its mixture)",
            {"ftype": _t, "imatrix": _imat, "threads": None, "keep_f32": False},
            calibrated=_imat,
            note="llama.cpp falls back to other types for rows not divisible by 256"))

_LLMC = "llmcompressor"
for _name, _label, _opts, _note in (
    ("llmc-gptq-w4a16", "GPTQ int4 symmetric, group 128, fp16/32 scales",
     {"algorithm": "gptq", "scheme": "W4A16", "group_size": 128}, "group 128 needs in_features "
     "divisible by 128 (SmolLM2: 576 is not; llm-compressor refuses — use -g64)"),
    ("llmc-gptq-w4a16-g64", "GPTQ int4 symmetric, group 64",
     {"algorithm": "gptq", "scheme": "W4A16", "group_size": 64}, "~545 s on SmolLM2, 2 cores"),
    ("llmc-awq-w4a16", "AWQ int4 asymmetric, group 128",
     {"algorithm": "awq", "scheme": "W4A16_ASYM", "group_size": 128}, ""),
    ("llmc-awq-w4a16-g64", "AWQ int4 asymmetric, group 64",
     {"algorithm": "awq", "scheme": "W4A16_ASYM", "group_size": 64}, ""),
    ("llmc-rtn-w4a16-g64", "round-to-nearest int4 symmetric, group 64",
     {"algorithm": "rtn", "scheme": "W4A16", "group_size": 64}, ""),
    ("llmc-w8a8", "SmoothQuant (0.8) + int8 per-channel weights, dynamic per-token int8 "
     "activations", {"algorithm": "smoothquant", "scheme": "W8A8", "group_size": None,
                     "smoothing_strength": 0.8},
     "on CPU the reloaded model is decompressed and does not quantize activations (W8A16)"),
):
    register(PeerMethod(_name, _LLMC, "llmcompressor", "llmcompressor", _label,
                        _opts, calibrated=_name != "llmc-rtn-w4a16-g64",
                        note=_note))

for _bits, _group in ((8, 64), (4, 64), (4, 128), (3, 64), (2, 32)):
    register(PeerMethod(f"hqq-w{_bits}g{_group}", "hqq", "hqq", "hqq_peer",
                        f"HQQ int{_bits} asymmetric, group {_group}, fp16 scale and zero",
                        {"nbits": _bits, "group_size": _group, "meta_dtype": "float16"}))

_QUANTO = "optimum-quanto"
for _name, _label, _opts in (
    ("quanto-int8", "qint8 weights, per-channel", {"weights": "qint8", "activations": None}),
    ("quanto-int4", "qint4 weights, group 128, scale and shift",
     {"weights": "qint4", "activations": None}),
    ("quanto-int2", "qint2 weights, group 128, scale and shift",
     {"weights": "qint2", "activations": None}),
    ("quanto-fp8", "qfloat8 (e4m3) weights, per-channel", {"weights": "qfloat8",
                                                           "activations": None}),
    ("quanto-w8a8", "qint8 weights + static qint8 activations (calibrated scales)",
     {"weights": "qint8", "activations": "qint8"}),
):
    register(PeerMethod(_name, _QUANTO, "optimum.quanto", "quanto", _label, _opts,
                        calibrated=_opts["activations"] is not None))

for _name, _label, _opts in (
    ("torchao-int8wo", "int8 weight-only, per-channel", {"config": "int8wo", "group_size": None}),
    ("torchao-int8da", "int8 weights per-channel + dynamic per-token int8 activations",
     {"config": "int8da", "group_size": None}),
    ("torchao-int4wo-g32", "intx int4 weight-only, group 32 (stored unpacked in int8)",
     {"config": "int4wo", "group_size": 32}),
):
    register(PeerMethod(_name, "torchao", "torchao", "torchao_peer", _label, _opts))

for _g in (128, 64):  # gptqmodel's CPU kernel needs the group to divide every input width
    register(PeerMethod(f"gptqmodel-w4g{_g}", "gptqmodel", "gptqmodel", "gptqmodel_peer",
                        f"GPTQ int4, group {_g} (gptqmodel's packing: int32 qweight/qzeros, "
                        "scales)", {"bits": 4, "group_size": _g, "dtype": "bfloat16"},
                        calibrated=True, note="slow on CPU: 103 s for SmolLM2 with 32×512 "
                        "windows on 2 cores"))
