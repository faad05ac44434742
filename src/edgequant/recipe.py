"""``Recipe``: what to do to a model — typed, versioned, saved with every artifact and GGUF.

A recipe is an ordered list of **transforms** (AWQ, SmoothQuant: rewrite float weights), one
**quantizer** (RTN, GPTQ, HQQ, int8 …: choose codes) and **per-layer formats**. Steps are
their options dataclasses (``GPTQConfig(act_order=True)``), so options are typed and live in
one place; the registry (:mod:`edgequant.methods.registry`) maps each back to its code.

Formats. ``scheme`` is the format of every linear inside the transformer blocks; ``formats``
are ``(pattern, format)`` pairs matched in order against a layer's full name with ``fnmatch``
(``*`` crosses dots; the last match wins). A format is a native scheme short name
(``w4g128-asym``, ``nf4-dq`` — see ``QuantScheme``), a GGML type (``Q4_K``, ``Q5_0``, ``F16``
— written only by the GGUF exporter), or ``keep`` (unquantized, stored in ``keep_dtype``).
Layers outside the blocks (``lm_head``) are quantized only when a pattern names them.

JSON. :meth:`to_dict` / :meth:`from_dict` round-trip exactly (``version`` =
:data:`RECIPE_VERSION`); every option is written, so a recipe read back by a later release
whose defaults moved still means what it meant. Version-0 dicts (artifacts written before
recipes were versioned: ``method``/``method_options``/``overrides``) are read too.

Example:
    >>> r = Recipe.parse("awq+gptq", "w4g64-asym", {"act_order": True})
    >>> r.name, r.quantizer
    ('awq+gptq', GPTQConfig(damp=0.01, block_size=128, act_order=True, ...))
    >>> Recipe.from_dict(r.to_dict()) == r
    True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import SchemeError
from .formats import QuantScheme

RECIPE_VERSION = 1
KEEP = "keep"
KEEP_DTYPES = ("float16", "bfloat16", "float32")
#: GGML tensor types a recipe may name (the exporter encodes them; :mod:`edgequant.gguf.quants`)
GGML_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

Format = QuantScheme | str  # a native scheme, or a GGML type name


def parse_format(text: str | QuantScheme) -> Format:
    """``"w4g128"`` → ``QuantScheme``; ``"q4_k"`` → ``"Q4_K"``; ``"keep"`` stays.

    Raises:
        SchemeError: neither a scheme short name, a GGML type nor ``keep``.
    """
    if isinstance(text, QuantScheme):
        return text
    name = text.strip()
    if name.lower() == KEEP:
        return KEEP
    if name.upper() in GGML_TYPES:
        return name.upper()
    try:
        return QuantScheme.parse(name)
    except SchemeError as e:
        raise SchemeError(f"{e}; or a GGML type ({', '.join(GGML_TYPES)}), or 'keep'") \
            from None


def format_name(fmt: Format) -> str:
    return fmt.name if isinstance(fmt, QuantScheme) else fmt


def _default_quantizer_for(transform: str, fmt: Format) -> str:
    """The quantizer a recipe of transforms alone gets: the first transform's choice for a
    native scheme, RTN (llama.cpp's encoders) for a GGML type."""
    from .methods.registry import get_transform

    return get_transform(transform).default_quantizer(fmt) if isinstance(fmt, QuantScheme) \
        else "rtn"


def _ggml_refused(where: str, fmt: str) -> SchemeError:
    return SchemeError(f"{where}: {fmt} is a GGML type, which only a GGUF export writes "
                       "(edgequant export --type / eq.export); a native artifact needs a "
                       "native scheme such as w4g32-asym")


def _default_quantizer() -> Any:
    from .methods.rtn import RTNConfig

    return RTNConfig()


@dataclass(frozen=True)
class Recipe:
    """The whole-model plan (see the module docstring).

    Attributes:
        quantizer: the quantizer's options instance (``RTNConfig()``, ``GPTQConfig(...)``).
        transforms: transforms' options instances, applied in order before the quantizer.
        scheme: the format of the linears inside the blocks (canonical name).
        formats: ``(pattern, format)`` pairs, applied in order (canonical names).
        keep_dtype: dtype of every tensor that is not quantized (embeddings, norms, …).
    """

    quantizer: Any = field(default_factory=_default_quantizer)
    transforms: tuple[Any, ...] = ()
    scheme: str = "w4g128"
    formats: tuple[tuple[str, str], ...] = ()
    keep_dtype: str = "float16"

    def __post_init__(self) -> None:
        from .methods.registry import Quantizer, Transform, step_of

        if self.keep_dtype not in KEEP_DTYPES:
            raise SchemeError(f"keep_dtype must be one of {KEEP_DTYPES}, not {self.keep_dtype!r}")
        if not isinstance(step_of(self.quantizer), Quantizer):
            raise SchemeError(f"{step_of(self.quantizer).name} is not a quantizer")
        transforms = tuple(self.transforms)
        for t in transforms:
            if not isinstance(step_of(t), Transform):
                raise SchemeError(f"{step_of(t).name} is not a transform")
        pairs = self.formats.items() if isinstance(self.formats, Mapping) else self.formats
        formats = tuple((str(p), format_name(parse_format(f))) for p, f in pairs)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "scheme", format_name(parse_format(self.scheme)))

    # --- names --------------------------------------------------------------------------

    @property
    def quantizer_name(self) -> str:
        from .methods.registry import step_of

        return step_of(self.quantizer).name

    @property
    def transform_names(self) -> list[str]:
        from .methods.registry import step_of

        return [step_of(t).name for t in self.transforms]

    @property
    def name(self) -> str:
        """``awq+gptq``; a transform followed by its own default quantizer is named by the
        transform alone (``awq``, ``smoothquant``), as the literature names those methods."""
        names = self.transform_names
        if names and self.quantizer_name == _default_quantizer_for(names[0],
                                                                  parse_format(self.scheme)):
            return "+".join(names)
        return "+".join([*names, self.quantizer_name])

    @property
    def needs_calibration(self) -> bool:
        from .methods.registry import get_quantizer

        return bool(self.transforms) or bool(get_quantizer(self.quantizer_name).needs)

    # --- per-layer formats --------------------------------------------------------------

    def format_for(self, name: str, in_blocks: bool) -> Format | None:
        """The format of layer ``name``, or None to keep it in ``keep_dtype``."""
        chosen: str | None = self.scheme if in_blocks else None
        for pattern, f in self.formats:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = None if f == KEEP else f
        return None if chosen is None else parse_format(chosen)

    def scheme_for(self, name: str, in_blocks: bool) -> QuantScheme | None:
        """The native scheme of layer ``name`` (None: kept). A GGML type is refused here: only
        the GGUF exporter writes those."""
        f = self.format_for(name, in_blocks)
        if isinstance(f, str):
            raise _ggml_refused(f"layer {name}", f)
        return f

    def check_native(self) -> None:
        """Refuse GGML types up front when the target is a native artifact."""
        for pattern, f in (("(blocks)", self.scheme), *self.formats):
            if isinstance(parse_format(f), str) and f != KEEP:
                raise _ggml_refused(pattern, f)

    def with_formats(self, pairs: Iterable[tuple[str, str]]) -> Recipe:
        return replace(self, formats=(*self.formats, *pairs))

    # --- construction from names ------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, scheme: str | QuantScheme = "w4g128",
              options: Mapping[str, Any] | None = None,
              formats: Iterable[tuple[str, str]] | Mapping[str, str] = (),
              keep_dtype: str = "float16") -> Recipe:
        """A recipe from ``"awq+gptq"``-style text: transforms, then at most one quantizer.

        ``options`` are ``KEY=VALUE`` options for the steps: ``"gptq.act_order"`` names the
        step; a bare ``"act_order"`` goes to the one step that has such an option (an error
        if none or several do).
        """
        from .methods.registry import Quantizer, get_step, make_config

        parts = [p for p in spec.split("+")]
        if not spec.strip() or any(not p.strip() for p in parts):
            raise SchemeError(f"recipe {spec!r}: expected names joined by '+', e.g. awq+gptq")
        steps = [get_step(p) for p in parts]
        *head, last = steps
        for s in head:
            if isinstance(s, Quantizer):
                raise SchemeError(f"recipe {spec!r}: the quantizer {s.name} must come last "
                                  "(transforms first, then one quantizer)")
        fmt = parse_format(scheme)
        if not isinstance(last, Quantizer):
            steps.append(get_step(_default_quantizer_for(steps[0].name, fmt)))
        per_step = _split_options(steps, dict(options or {}), spec)
        configs = [make_config(s, per_step[i]) for i, s in enumerate(steps)]
        return cls(quantizer=configs[-1], transforms=tuple(configs[:-1]),
                   scheme=format_name(fmt), keep_dtype=keep_dtype,
                   formats=tuple(formats.items() if isinstance(formats, Mapping) else formats))

    # --- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        from .methods.registry import config_options, step_of

        def step(c: Any) -> dict[str, Any]:
            return {"name": step_of(c).name, "options": config_options(c)}

        return {"version": RECIPE_VERSION, "name": self.name,
                "transforms": [step(t) for t in self.transforms],
                "quantizer": step(self.quantizer), "scheme": self.scheme,
                "formats": [list(p) for p in self.formats], "keep_dtype": self.keep_dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Read :meth:`to_dict`'s output (or a version-0 dict); unknown versions, steps or
        options are clear errors."""
        from .methods.registry import get_quantizer, get_transform, make_config

        try:
            version = d.get("version", 0)
            if version == 0:
                return _from_v0(d)
            if version != RECIPE_VERSION:
                raise SchemeError(f"recipe version {version} is not supported (this edgequant "
                                  f"reads versions 0 and {RECIPE_VERSION}); upgrade edgequant")
            transforms = tuple(make_config(get_transform(t["name"]), t.get("options"))
                               for t in d.get("transforms", []))
            q = d["quantizer"]
            quantizer = make_config(get_quantizer(q["name"]), q.get("options"))
            return cls(quantizer=quantizer, transforms=transforms, scheme=d["scheme"],
                       formats=tuple((str(p), str(f)) for p, f in d.get("formats", [])),
                       keep_dtype=d.get("keep_dtype", "float16"))
        except (KeyError, TypeError, AttributeError) as e:
            raise SchemeError(f"malformed recipe ({type(e).__name__}: {e})") from None


def _split_options(steps: list[Any], options: dict[str, Any], spec: str
                   ) -> list[dict[str, Any]]:
    from .methods.registry import option_fields

    out: list[dict[str, Any]] = [{} for _ in steps]
    names = [s.name for s in steps]
    for key, value in options.items():
        head, dot, rest = key.partition(".")
        if dot:
            if head not in names:
                raise SchemeError(f"option {key!r}: recipe {spec!r} has no step {head!r} "
                                  f"(steps: {', '.join(names)})")
            out[names.index(head)][rest] = value
            continue
        owners = [i for i, s in enumerate(steps) if key in option_fields(s.config_cls)]
        if not owners:
            valid = sorted(f"{s.name}.{k}" for s in steps for k in option_fields(s.config_cls))
            raise SchemeError(f"no step of recipe {spec!r} has an option {key!r}; valid "
                              f"options: {', '.join(valid) or 'none'}")
        if len(owners) > 1:
            raise SchemeError(f"option {key!r} belongs to several steps of {spec!r}; say which: "
                              + ", ".join(f"{names[i]}.{key}" for i in owners))
        out[owners[0]][key] = value
    return out


def _from_v0(d: Mapping[str, Any]) -> Recipe:
    """Artifacts written before recipes were versioned."""
    scheme = QuantScheme.from_dict(dict(d["scheme"])).name if isinstance(d["scheme"], Mapping) \
        else str(d["scheme"])
    return Recipe.parse(d["method"], scheme, d.get("method_options") or {},
                        formats=tuple((str(p), str(s)) for p, s in d.get("overrides", [])),
                        keep_dtype=d.get("keep_dtype", "float16"))
