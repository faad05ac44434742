"""``QuantScheme``: what the quantized numbers look like, and the short names that parse to it.

A scheme is a frozen, versioned dataclass (each option lives here and nowhere else). Short
names follow one grammar::

    FORMAT [g GROUP] [a ACT_BITS] [-asym] [-dq] [-tensor] [-bf16 | -fp32]

    w4g128        4-bit symmetric integers, groups of 128 input columns, fp16 scales
    w3g128-asym   3-bit asymmetric integers (scale + integer zero-point per group)
    w4g64-asym-fz 4-bit asymmetric with a float zero-point per group (HQQ's storage)
    w8            8-bit symmetric integers, one scale per output channel
    w8-tensor     8-bit, one scale for the whole tensor
    w8a8          int8 weights per channel + int8 activations per token (dynamic)
    nf4 / nf4-dq  bitsandbytes NF4, absmax blocks of 64, optional double quantization
    fp4           bitsandbytes FP4 codebook, blocks of 64
    fp4_e2m1g32   OCP e2m1 values with a scale per 32
    fp8 / fp8_e5m2  float8 e4m3 / e5m2 with a scale per output channel
    binary / ternary  sign·mean|w| per channel / {-1,0,1}·α per channel
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SchemeError

Granularity = Literal["tensor", "channel", "group"]
SCHEME_VERSION = 1

#: format name -> (code bits, default granularity, default group size)
FORMATS: dict[str, tuple[int | None, Granularity, int | None]] = {
    "int": (None, "channel", None),
    "nf4": (4, "group", 64),
    "fp4": (4, "group", 64),
    "fp4_e2m1": (4, "group", 32),
    "fp8_e4m3": (8, "channel", None),
    "fp8_e5m2": (8, "channel", None),
    "binary": (1, "channel", None),
    "ternary": (2, "channel", None),
}
SCALE_DTYPES = ("float16", "bfloat16", "float32")
#: bitsandbytes keeps NF4/FP4 block absmax in fp32; we do the same to stay bit-exact
FP32_SCALE_FORMATS = ("nf4", "fp4")


def default_scale_dtype(fmt: str) -> str:
    return "float32" if fmt in FP32_SCALE_FORMATS else "float16"

EXAMPLES = ("w4g128", "w3g128-asym", "w4g64-asym-fz", "w8", "w8-tensor", "w8a8", "w4g64-bf16",
            "nf4", "nf4-dq", "fp4", "fp4_e2m1g32", "fp8", "fp8_e5m2", "binary", "ternaryg64")


@dataclass(frozen=True)
class QuantScheme:
    """How one weight tensor is quantized.

    Attributes:
        bits: width of one code (2–8 for ``int``; fixed by the other formats).
        format: ``int`` | ``nf4`` | ``fp4`` | ``fp4_e2m1`` | ``fp8_e4m3`` | ``fp8_e5m2`` |
            ``binary`` | ``ternary``.
        symmetric: integers only; asymmetric stores an integer zero-point per group.
        granularity: ``tensor`` | ``channel`` (per output row) | ``group`` (along the input).
        group_size: columns per group when ``granularity == "group"``; the last group of a
            row may be shorter (ragged) when the row length is not a multiple.
        scale_dtype: how scales are stored (``float16`` | ``bfloat16`` | ``float32``).
        double_quant: quantize the block scales again (QLoRA): 8-bit, blocks of 256.
        float_zero: asymmetric integers with the zero-point stored as a float in
            ``scale_dtype`` (HQQ) instead of a b-bit integer.
        act_bits: activation bits for weight-and-activation schemes (``w8a8``), else None.
        act_dynamic: per-token ranges computed on the fly (True) or calibrated static ranges.
    """

    bits: int = 4
    format: str = "int"
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    scale_dtype: str = "float16"
    double_quant: bool = False
    float_zero: bool = False
    act_bits: int | None = None
    act_dynamic: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SchemeError(f"unknown format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.format in FP32_SCALE_FORMATS and self.scale_dtype != "float32":
            raise SchemeError(f"{self.format} keeps its block absmax in float32 as bitsandbytes "
                              f"does; pass scale_dtype='float32'")
        fixed_bits = FORMATS[self.format][0]
        if fixed_bits is not None and self.bits != fixed_bits:
            raise SchemeError(f"format {self.format} has {fixed_bits}-bit codes, not {self.bits}")
        if self.format == "int" and not 2 <= self.bits <= 8:
            raise SchemeError(f"integer formats take 2–8 bits, not {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise SchemeError(f"granularity must be tensor, channel or group, "
                              f"not {self.granularity!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise SchemeError("group granularity needs a positive group_size")
        if self.granularity != "group" and self.group_size is not None:
            raise SchemeError(f"group_size is only meaningful with group granularity "
                              f"(got {self.granularity})")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype must be one of {SCALE_DTYPES}, "
                              f"not {self.scale_dtype!r}")
        if not self.symmetric and self.format != "int":
            raise SchemeError(f"asymmetric quantization is for integer formats, not {self.format}")
        if self.double_quant and self.format not in ("nf4", "fp4"):
            raise SchemeError("double quantization applies to the nf4 and fp4 block scales")
        if self.float_zero and (self.format != "int" or self.symmetric):
            raise SchemeError("a float zero-point (-fz) needs an asymmetric integer scheme, "
                              "e.g. w4g64-asym-fz")
        if self.act_bits is not None and self.act_bits not in (8,):
            raise SchemeError(f"activation quantization supports 8 bits, not {self.act_bits}")

    @property
    def name(self) -> str:
        """The canonical short name; ``QuantScheme.parse(s.name) == s``."""
        if self.format == "int":
            head = f"w{self.bits}"
        elif self.format == "fp8_e4m3":
            head = "fp8"
        else:
            head = self.format
        default_gran, default_group = FORMATS[self.format][1:]
        s = head
        if self.granularity == "group" and (default_gran != "group"
                                            or self.group_size != default_group):
            s += f"g{self.group_size}"
        elif self.granularity == "channel" and default_gran == "group":
            s += "-channel"
        if self.act_bits is not None:
            s += f"a{self.act_bits}"
        if not self.act_dynamic:
            s += "-static"
        if not self.symmetric:
            s += "-asym"
        if self.float_zero:
            s += "-fz"
        if self.double_quant:
            s += "-dq"
        if self.granularity == "tensor":
            s += "-tensor"
        if self.scale_dtype != default_scale_dtype(self.format):
            s += {"float16": "-fp16", "bfloat16": "-bf16", "float32": "-fp32"}[self.scale_dtype]
        return s

    @property
    def is_weight_only(self) -> bool:
        return self.act_bits is None

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEME_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        d = dict(d)
        version = d.pop("version", SCHEME_VERSION)
        if version != SCHEME_VERSION:
            raise SchemeError(f"scheme version {version} is not supported "
                              f"(this edgequant reads version {SCHEME_VERSION})")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SchemeError(f"unknown scheme fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str | QuantScheme) -> QuantScheme:
        """Parse a short name such as ``w4g128`` (see the module docstring for the grammar)."""
        if isinstance(text, QuantScheme):
            return text
        return _parse(text)


_HEAD = re.compile(r"^(?:w(?P<bits>\d)"
                   r"|(?P<fmt>nf4|fp4_e2m1|fp4|fp8_e4m3|fp8_e5m2|fp8|binary|ternary))"
                   r"(?:g(?P<group>\d+))?(?:a(?P<act>\d+))?$")
_FLAGS = {"asym", "fz", "dq", "tensor", "channel", "static", "bf16", "fp32", "fp16"}


def _parse(text: str) -> QuantScheme:
    def bad(why: str) -> SchemeError:
        return SchemeError(f"unknown scheme {text!r} ({why}); valid examples: "
                           f"{', '.join(EXAMPLES)}")

    head, *flags = text.strip().lower().split("-")
    m = _HEAD.match(head)
    if m is None:
        raise bad("expected w<bits>, nf4, fp4, fp4_e2m1, fp8, fp8_e5m2, binary or ternary")
    if unknown := set(flags) - _FLAGS:
        raise bad(f"unknown suffix {'-'.join(sorted(unknown))}; "
                  f"suffixes: {', '.join(sorted(_FLAGS))}")
    fmt = "int" if m["bits"] else {"fp8": "fp8_e4m3"}.get(m["fmt"], m["fmt"])
    fixed_bits, granularity, group = FORMATS[fmt]
    bits = int(m["bits"]) if m["bits"] else fixed_bits
    assert bits is not None  # "int" is named by w<bits>; every other format fixes its bits
    if m["group"]:
        granularity, group = "group", int(m["group"])
    if "channel" in flags:
        granularity, group = "channel", None
    if "tensor" in flags:
        if m["group"]:
            raise bad("a group size and -tensor contradict each other")
        granularity, group = "tensor", None
    scale_dtype = ("bfloat16" if "bf16" in flags else "float32" if "fp32" in flags
                   else "float16" if "fp16" in flags else default_scale_dtype(fmt))
    return QuantScheme(
        bits=bits, format=fmt, symmetric="asym" not in flags, granularity=granularity,
        group_size=group, scale_dtype=scale_dtype, double_quant="dq" in flags,
        float_zero="fz" in flags,
        act_bits=int(m["act"]) if m["act"] else None, act_dynamic="static" not in flags,
    )
