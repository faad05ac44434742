"""``Recipe``: which layers get which scheme and method — saved with every artifact.

By default every linear layer inside the transformer blocks is quantized with one scheme;
``lm_head`` and the embeddings stay in 16-bit. Overrides are ``(pattern, scheme)`` pairs
matched in order against a layer's full name with ``fnmatch`` (``*`` crosses dots); the
last match wins; the scheme ``"keep"`` leaves a layer unquantized. ``lm_head`` is quantized
only when an override names it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from ..errors import SchemeError
from ..formats import QuantScheme

KEEP = "keep"
KEEP_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Recipe:
    """The whole-model plan.

    Attributes:
        method: registered method name (``rtn``, ``gptq``, …).
        scheme: the default scheme for block linears.
        overrides: ``(pattern, scheme-name-or-"keep")`` pairs, applied in order.
        keep_dtype: dtype of every tensor that is not quantized (embeddings, norms, …).
        method_options: options for the method's config dataclass.
    """

    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=lambda: QuantScheme.parse("w4g128"))
    overrides: tuple[tuple[str, str], ...] = ()
    keep_dtype: str = "float16"
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep_dtype not in KEEP_DTYPES:
            raise SchemeError(f"keep_dtype must be one of {KEEP_DTYPES}, not {self.keep_dtype!r}")
        for _, s in self.overrides:
            if s != KEEP:
                QuantScheme.parse(s)

    def scheme_for(self, name: str, in_blocks: bool) -> QuantScheme | None:
        """The scheme for layer ``name``, or None to keep it in ``keep_dtype``."""
        chosen: QuantScheme | None = self.scheme if in_blocks else None
        for pattern, s in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = None if s == KEEP else QuantScheme.parse(s)
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scheme": self.scheme.to_dict(),
                "overrides": [list(o) for o in self.overrides], "keep_dtype": self.keep_dtype,
                "method_options": dict(self.method_options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        return cls(method=d["method"], scheme=QuantScheme.from_dict(d["scheme"]),
                   overrides=tuple((str(p), str(s)) for p, s in d.get("overrides", [])),
                   keep_dtype=d.get("keep_dtype", "float16"),
                   method_options=dict(d.get("method_options", {})))
