"""``QuantizedTensor``: packed codes plus the stored parameters of one 2-D weight.

It is the unit that methods produce, ``QuantLinear`` holds and artifacts save. Its byte
count is the sum of what it stores — codes, scales, zero-points, second-level constants,
group indices — so ``bits_per_weight`` is honest by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ArtifactError, SchemeError, WeightError
from .base import Layout, get_format, group, grouped_shape, ungroup
from .packing import pack, packed_nbytes, unpack
from .scheme import QuantScheme

CODES = "qweight"
G_IDX = "g_idx"


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight ``(out_features, in_features)``.

    Attributes:
        scheme: how the numbers are laid out.
        shape: the original weight's shape.
        codes: packed codes, 1-D uint8 (``scheme.bits`` per weight, see ``packing``).
        stored: the format's stored parameters (e.g. ``scales`` fp16 ``(R, G)``).
        g_idx: optional int32 ``(in_features,)`` group of each input column (GPTQ act-order);
            when present, codes are in column order and groups need not be contiguous.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    codes: torch.Tensor
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    g_idx: torch.Tensor | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_codes(cls, codes: torch.Tensor, params: dict[str, torch.Tensor],
                   scheme: QuantScheme, shape: tuple[int, int],
                   g_idx: torch.Tensor | None = None) -> QuantizedTensor:
        """Build from unpacked codes (grouped view, or ``(R, C)`` with ``g_idx``) and params."""
        fmt = get_format(scheme.format)
        if g_idx is None:
            codes = ungroup(codes, shape)
        return cls(scheme, tuple(shape), pack(codes, scheme.bits),  # type: ignore[arg-type]
                   fmt.store(params, scheme),
                   None if g_idx is None else g_idx.to(torch.int32).contiguous())

    # ----------------------------------------------------------------------- reading
    @property
    def pshape(self) -> tuple[int, int]:
        r, n_groups, _ = grouped_shape(self.shape, self.scheme)
        return r, n_groups

    def params(self) -> dict[str, torch.Tensor]:
        return get_format(self.scheme.format).load(self.stored, self.scheme, self.pshape)

    def unpacked_codes(self) -> torch.Tensor:
        """Codes as uint8 ``(out, in)``."""
        rows, cols = self.shape
        return unpack(self.codes, self.scheme.bits, rows * cols).view(rows, cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        fmt = get_format(self.scheme.format)
        params = self.params()
        codes = self.unpacked_codes()
        if self.g_idx is not None:  # gather each column's group parameters
            idx = self.g_idx.long()
            cols = {k: v[:, idx] for k, v in params.items()}  # (R, C, 1)
            return fmt.decode(codes.unsqueeze(-1), cols, self.scheme).squeeze(-1).to(dtype)
        xg = fmt.decode(group(codes, self.scheme), params, self.scheme)
        return ungroup(xg, self.shape).to(dtype)

    # --------------------------------------------------------------------- accounting
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything stored, by the names used in artifacts."""
        out = {CODES: self.codes, **self.stored}
        if self.g_idx is not None:
            out[G_IDX] = self.g_idx
        return out

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    # ------------------------------------------------------------------ (de)serialising
    @staticmethod
    def layout(shape: tuple[int, int], scheme: QuantScheme,
               act_order: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes that a tensor of ``shape`` under ``scheme`` stores."""
        r, n_groups, _ = grouped_shape(shape, scheme)
        out: Layout = {CODES: ((packed_nbytes(shape[0] * shape[1], scheme.bits),),
                               torch.uint8)}
        out.update(get_format(scheme.format).layout(scheme, (r, n_groups)))
        if act_order:
            out[G_IDX] = ((shape[1],), torch.int32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                     shape: tuple[int, int], where: str = "") -> QuantizedTensor:
        """Rebuild from :meth:`tensors` output, validating names, shapes and dtypes."""
        expected = cls.layout(shape, scheme, act_order=G_IDX in tensors)
        validate_layout(tensors, expected, where)
        stored = {k: v for k, v in tensors.items() if k not in (CODES, G_IDX)}
        return cls(scheme, tuple(shape), tensors[CODES], stored,  # type: ignore[arg-type]
                   tensors.get(G_IDX))


def validate_layout(tensors: dict[str, torch.Tensor] | Layout, expected: Layout,
                    where: str) -> None:
    """Raise ArtifactError unless ``tensors`` (or (shape, dtype) pairs) match ``expected``."""
    names = set(tensors)
    if names != set(expected):
        raise ArtifactError(f"{where}: stored tensors {sorted(names)} do not match the scheme's "
                            f"{sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else (tuple(t[0]), t[1])
        if got != (tuple(shape), dtype):
            raise ArtifactError(f"{where}.{name}: expected shape {tuple(shape)} {dtype}, "
                                f"found {got[0]} {got[1]}")


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    """Reject what cannot be quantized, naming the tensor."""
    if w.dim() != 2:
        raise WeightError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise WeightError(f"{name}: {bad} NaN/Inf values; fix or exclude this layer "
                          f"before quantizing")


def quantize_tensor(w: torch.Tensor, scheme: QuantScheme | str,
                    name: str = "weight") -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight under ``scheme``."""
    scheme = QuantScheme.parse(scheme)
    check_weight(w, name)
    if not scheme.is_weight_only and scheme.format != "int":
        raise SchemeError("activation quantization is only defined for integer weights")
    fmt = get_format(scheme.format)
    xg = group(w.detach().to(torch.float32), scheme)
    params = fmt.params(xg, scheme)
    codes = fmt.encode(xg, params, scheme)
    return QuantizedTensor.from_codes(codes, params, scheme, tuple(w.shape))  # type: ignore[arg-type]
