"""The experiment matrix: cells = model × method/tool × scheme, the presets, and cell hashes.

A :class:`Cell` says *what* to make (``kind``):

==========  ===================================================  ===================
kind        artifact                                             tool
==========  ===================================================  ===================
baseline    the source model itself (fp32 HF checkpoint)          transformers
native      ``eq.quantize(model, method, scheme)`` + ``save``      edgequant
gguf        ``eq.export(model, path, ftype)`` (our GGUF encoder)   edgequant
peer        a peer tool's ``make`` (``bnb-nf4``, ``llamacpp-…``)   the tool
==========  ===================================================  ===================

:class:`Settings` says *how* every cell is measured and calibrated; every cell of a run shares
it, so every number in a report comes from the same corpus, context, token count and speed
protocol. A cell's identity is :func:`cell_hash`: the sha256 of the cell, the model's
fingerprint, the evaluation settings and (for cells that use data) the calibration settings
— change any of these and it is a new cell; re-running the same matrix finds its finished
cells by hash and skips them.

``--methods`` items (:func:`parse_methods`): ``baseline``; ``METHOD:SCHEME[:KEY=VALUE…]`` for
our methods (``gptq:w4g128``, ``hqq:w4g64-asym``, ``gptq:w4g64:act_order=true:static_groups=true``
— options as ``quantize --set`` takes them); ``gguf:FTYPE`` for our GGUF export (``gguf:Q4_K_M``);
a peer method name (``bnb-nf4``, ``llamacpp-Q4_K_M``, ``llmc-gptq-w4a16-g64``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgequantError

KINDS = ("baseline", "native", "gguf", "peer")
PRESETS = ("quick", "paper", "full")
DEFAULT_MODELS = ("smollm2-135m",)
HASH_VERSION = 1


class MatrixError(EdgequantError):
    """An unknown preset, method item or model list."""


@dataclass(frozen=True)
class Cell:
    """One experiment: a model, what makes its artifact, and the scheme.

    Attributes:
        model: the source (zoo name, HF folder, ``.gguf`` file, hub id).
        kind: ``baseline`` | ``native`` | ``gguf`` | ``peer``.
        method: ``baseline``, our method name, ``gguf``, or a peer method name.
        scheme: our scheme short name, the GGUF file type, or the peer's scheme in words.
        tool: who made the numbers: ``transformers``, ``edgequant`` or the peer's package.
        options: method (or export) options, ``(key, value)`` pairs, sorted.
    """

    model: str
    kind: str
    method: str
    scheme: str = ""
    tool: str = "edgequant"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MatrixError(f"unknown cell kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        object.__setattr__(self, "options", tuple(sorted(self.options)))

    @property
    def label(self) -> str:
        """Short display name: ``gptq w4g128``, ``gguf Q4_K_M``, ``bnb-nf4``, ``fp32``."""
        if self.kind == "baseline":
            return "baseline fp32"
        if self.kind == "peer":
            return self.method
        opts = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in self.options if self.kind == "native")  # method options
        return f"{self.method} {self.scheme}" + (f" {opts}" if opts else "")

    @property
    def calibrated(self) -> bool:
        """Whether calibration data can change the artifact (then its settings are hashed)."""
        if self.kind == "native":
            return self.recipe().needs_calibration
        if self.kind == "peer":
            from ..backends import peers

            return peers.get(self.method).calibrated
        return False

    def recipe(self) -> Any:
        """The ``Recipe`` of a native cell."""
        from ..recipe import Recipe

        return Recipe.parse(self.method, self.scheme, dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "method": self.method,
                "scheme": self.scheme, "tool": self.tool,
                "options": [list(o) for o in self.options]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(d["model"], d["kind"], d["method"], d.get("scheme", ""),
                   d.get("tool", "edgequant"), tuple(tuple(o) for o in d.get("options", ())))


@dataclass(frozen=True)
class Settings:
    """How every cell is calibrated and measured (one place for every option).

    The defaults are the ``quick`` preset's: light enough for 2 CPU cores, where our
    ``QuantLinear`` decodes a 135M model at ~1 token/s (it dequantizes every weight on every
    step), so the speed test and the generations are short.

    Attributes:
        corpus, ctx, max_tokens, kld_topk: perplexity/KLD windows (see ``EvalConfig``);
            KLD is always against the fp baseline of the same model.
        tasks, limit, task_seed: multiple-choice tasks, items per task (seeded subset).
        prompt_tokens, new_tokens, speed_runs, warmup, threads: the speed protocol, run in a
            fresh process that also gives the peak RSS.
        generate_prompts, generate_tokens: sample generations (first N fixed prompts, greedy).
        calib_corpus, calib_samples, calib_len, calib_seed: calibration for the methods that
            use data (GPTQ, AWQ, SmoothQuant, static, imatrix peers).
        budgets_mb: memory budgets for the recommendations and the equal-memory section
            (None: derived from the baseline size).
    """

    corpus: str = "wiki"
    ctx: int = 512
    max_tokens: int = 2048
    kld_topk: int = 256
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    task_seed: int = 1234
    prompt_tokens: int = 64
    new_tokens: int = 6
    speed_runs: int = 3
    warmup: int = 0
    threads: int | None = None
    generate_prompts: int = 1
    generate_tokens: int = 16
    calib_corpus: str = "wiki"
    calib_samples: int = 8
    calib_len: int = 256
    calib_seed: int = 0
    budgets_mb: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.budgets_mb is not None:
            object.__setattr__(self, "budgets_mb", tuple(float(b) for b in self.budgets_mb))
        if self.ctx < 4 or self.max_tokens < self.ctx:
            raise MatrixError(f"max_tokens ({self.max_tokens}) must hold at least one window of "
                              f"ctx ({self.ctx}) tokens")

    def eval_dict(self) -> dict[str, Any]:
        """What changes a measurement (hashed into every cell)."""
        keys = ("corpus", "ctx", "max_tokens", "kld_topk", "tasks", "limit", "task_seed",
                "prompt_tokens", "new_tokens", "speed_runs", "warmup", "threads",
                "generate_prompts", "generate_tokens")
        return {k: _plain(getattr(self, k)) for k in keys}

    def calib_dict(self) -> dict[str, Any]:
        return {"corpus": self.calib_corpus, "n": self.calib_samples, "seq_len": self.calib_len,
                "seed": self.calib_seed}

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("tasks", "budgets_mb"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def calibration(self) -> Any:
        from ..data.calibration import calibration

        return calibration(self.calib_corpus, self.calib_samples, self.calib_len,
                           self.calib_seed)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def eval_hash(settings: Settings) -> str:
    """Cells measured under the same evaluation settings share this (reports compare only
    those)."""
    return _digest({"v": HASH_VERSION, "eval": settings.eval_dict()})


def cell_config(cell: Cell, settings: Settings, fingerprint: str) -> dict[str, Any]:
    """The full configuration that identifies a cell's result."""
    return {"v": HASH_VERSION, "cell": cell.to_dict(), "source": fingerprint,
            "eval": settings.eval_dict(),
            "calib": settings.calib_dict() if cell.calibrated else None}


def cell_hash(cell: Cell, settings: Settings, fingerprint: str) -> str:
    """Stable sha256 (hex) of :func:`cell_config`."""
    return _digest(cell_config(cell, settings, fingerprint))


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --- building matrices ------------------------------------------------------------------------


def baseline(model: str) -> Cell:
    return Cell(model, "baseline", "baseline", "fp32", "transformers")


def native(model: str, method: str, scheme: str, **options: Any) -> Cell:
    """A native cell; ``method`` is a recipe's text form (``gptq``, ``awq+gptq``)."""
    from ..recipe import Recipe

    r = Recipe.parse(method, scheme, options)
    r.check_native()
    return Cell(model, "native", r.name, r.scheme, "edgequant", tuple(options.items()))


def gguf(model: str, ftype: str, **options: Any) -> Cell:
    """Our GGUF export; ``options`` go to ``eq.export`` (e.g. ``tokenizer_pre``)."""
    from ..exporters.gguf import parse_file_type

    return Cell(model, "gguf", "gguf", parse_file_type(ftype), "edgequant",
                tuple(options.items()))


def peer(model: str, name: str) -> Cell:
    from ..backends import peers

    p = peers.get(name)
    return Cell(model, "peer", p.name, p.scheme_label, p.tool)


@dataclass(frozen=True)
class Preset:
    """A named matrix: cells per model (the baseline is always added) and settings."""

    name: str
    description: str
    items: tuple[str, ...]
    settings: Settings = field(default_factory=Settings)


_QUICK_ITEMS = ("rtn:w4g128", "rtn:w3g128", "gptq:w4g128", "gptq:w3g128", "awq:w4g128",
                "hqq:w4g64-asym", "gguf:Q4_K_M", "gguf:Q8_0")

# The survey's comparison: each method by our implementation and by the established tool,
# same model, data and settings. SmolLM2's 576-wide rows are not a multiple of 128, which
# llm-compressor refuses at group 128 (and gptqmodel's CPU kernel cannot run it): their g128
# cells record that, and the g64 pairs keep the comparison matched. Where the peer's defaults
# differ from ours (llm-compressor's AWQ uses duo scaling, its GPTQ static activation order),
# our method also runs with the peer's settings, to compare like with like.
_AWQ_AS_LLMC = "awq:w4g64-asym:duo_scaling=true"
_GPTQ_AS_LLMC = "gptq:w4g64:act_order=true:static_groups=true"
_PAPER_ITEMS = ("awq:w4g128-asym", "llmc-awq-w4a16", "awq:w4g64-asym", "llmc-awq-w4a16-g64",
                _AWQ_AS_LLMC, "gptq:w4g128", "llmc-gptq-w4a16", "gptq:w4g64",
                "llmc-gptq-w4a16-g64", _GPTQ_AS_LLMC, "gptqmodel-w4g128", "gptqmodel-w4g64",
                "rtn:nf4", "bnb-nf4", "rtn:nf4-dq", "bnb-nf4-dq", "gguf:Q4_K_M",
                "llamacpp-Q4_K_M", "gguf:Q8_0", "llamacpp-Q8_0")

_PAPER_SETTINGS = Settings(max_tokens=16384, tasks=("arc_easy", "hellaswag", "piqa"),
                           limit=200, prompt_tokens=512, new_tokens=128, warmup=1,
                           generate_prompts=5, generate_tokens=64, calib_samples=128,
                           calib_len=512)


def _full_items() -> tuple[str, ...]:
    from ..backends import peers
    from ..gguf.mixtures import FILE_TYPES
    from ..methods import list_methods

    items: list[str] = []
    for m in list_methods():
        if m in ("smoothquant", "static"):
            items.append(f"{m}:w8a8-static" if m == "static" else f"{m}:w8a8")
        elif m == "dynamic":
            items.append("dynamic:w8a8")
        elif m == "hqq":
            items += [f"hqq:w{b}g64-asym" for b in (2, 3, 4, 5, 6, 8)]
        else:
            items += [f"{m}:w{b}g128" for b in (2, 3, 4, 5, 6, 8)]
            if m == "rtn":
                items += ["rtn:nf4", "rtn:nf4-dq", "rtn:fp4", "rtn:fp8"]
    items += [f"gguf:{t}" for t in FILE_TYPES if t not in ("F32",)]
    items += peers.names()
    return tuple(items)


def preset(name: str) -> Preset:
    """The preset ``quick`` (default), ``paper`` or ``full``."""
    if name == "quick":
        return Preset("quick", "our main methods at 4 and 3 bits, our GGUF Q4_K_M and Q8_0, "
                      "and the fp32 baseline; light evaluation (≤ 15 min on 2 cores)",
                      _QUICK_ITEMS, Settings())
    if name == "paper":
        return Preset("paper", "AWQ, GPTQ, bitsandbytes NF4, GGUF Q4_K_M and Q8_0 by our "
                      "implementation and by the peer tool, same model, data and settings",
                      _PAPER_ITEMS, _PAPER_SETTINGS)
    if name == "full":
        return Preset("full", "every registered method at every bit width, every GGUF file "
                      "type, every peer method", _full_items(), _PAPER_SETTINGS)
    raise MatrixError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """Split a ``--methods`` list (comma-separated or repeated); checked by :func:`build`."""
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    items = tuple(p.strip() for p in parts if p.strip())
    if not items:
        raise MatrixError("--methods is empty; give items such as gptq:w4g128,gguf:Q4_K_M,bnb-nf4")
    return items


def item_cell(model: str, item: str) -> Cell:
    """One ``--methods`` item for ``model`` (module docstring)."""
    from ..backends import peers
    from ..methods import list_methods

    low = item.strip()
    if low.lower() in ("baseline", "fp32", "fp"):
        return baseline(model)
    head, sep, rest = low.partition(":")
    if sep and head.lower() == "gguf":
        return gguf(model, rest)
    if sep and _is_recipe(head):
        from ..methods.registry import parse_options

        scheme, *fields = rest.split(":")
        return native(model, head.lower(), scheme, **parse_options(fields, f"item {item!r}"))
    if low in peers.names():
        return peer(model, low)
    raise MatrixError(f"unknown --methods item {item!r}: use baseline, RECIPE:SCHEME (methods: "
                      f"{', '.join(list_methods())}, composed as awq+gptq), gguf:FTYPE, or "
                      f"a peer method "
                      f"(e.g. {', '.join(peers.names()[:4])}, …)")


def _is_recipe(text: str) -> bool:
    """Whether ``text`` reads as a recipe (step names joined by '+')."""
    from ..methods.registry import is_step_name

    return all(is_step_name(p) for p in text.split("+"))


def build(models: tuple[str, ...] | list[str] = (), items: tuple[str, ...] | None = None,
          preset_name: str = "quick") -> list[Cell]:
    """The cells of a run: for each model, its baseline then the items (the preset's when
    ``items`` is None), de-duplicated, in order."""
    models = tuple(models) or DEFAULT_MODELS
    chosen = items if items is not None else preset(preset_name).items
    cells: list[Cell] = []
    for model in models:
        for c in (baseline(model), *(item_cell(model, i) for i in chosen)):
            if c not in cells:
                cells.append(c)
    return cells
