"""edgequant: quantize language models for edge devices, and prove what it cost.

    import edgequant as eq
    m = eq.load("smollm2-135m")
    q = eq.quantize(m, "rtn", scheme="w4g128")
    q.save("out/smollm2-rtn")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgequantError
from .lazy import lazy_attributes

if TYPE_CHECKING:
    import torch

    from .formats import QuantizedTensor, QuantScheme
    from .models.model import Model
    from .recipe import Recipe

__version__ = "0.1.0"
__all__ = ["EdgequantError", "Model", "QuantScheme", "QuantizedTensor", "Recipe", "compare",
           "evaluate", "export", "finetune", "load", "open", "quantize", "__version__"]

# imported on first use: ``import edgequant`` (and every command's start) costs no torch
__getattr__ = lazy_attributes(__name__, {
    "QuantScheme": ".formats", "QuantizedTensor": ".formats", "Model": ".models.model",
    "Recipe": ".recipe"})


def load(source: str | Path, dtype: torch.dtype | None = None) -> Model:
    """Load a model: a zoo name, an HF folder, a hub id, a ``.gguf`` file, an artifact, or a
    finished fine-tuning run folder (its merged/converted artifact, else base + adapter).

    ``dtype`` is the dtype of its unquantized float weights (default float32); quantized
    layers keep their stored codes and scales whatever it is.
    """
    import torch

    from .finetuning.api import is_run_folder, load_finetuned
    from .models.artifact import is_artifact, load_artifact
    from .models.model import Model
    from .models.sources import load_source

    dtype = dtype or torch.float32
    if is_artifact(source):
        return load_artifact(source, dtype)
    if is_run_folder(source):
        return load_finetuned(source, dtype)  # type: ignore[no-any-return]
    src = load_source(source, dtype)
    return Model(src.model, src.tokenizer,
                 {"name": src.name, "path": str(src.path), "sha256": src.sha256,
                  "kind": src.kind})


def quantize(model: Model | str | Path, recipe: Recipe | str = "rtn",
             scheme: str | QuantScheme = "w4g128", *, overrides: Any = (),
             keep_dtype: str = "float16", calib: Any = None, inplace: bool = False,
             progress: Any = None, **options: Any) -> Model:
    """Quantize ``model`` by ``recipe`` — the one entry point the CLI, ``compare`` and the
    benchmarks use.

    Args:
        model: a ``Model`` or anything :func:`load` takes (loaded here, then quantized in place).
        recipe: a :class:`Recipe`, or its text form: ``"gptq"``, ``"awq"``, ``"awq+gptq"``
            (transforms, then one quantizer), with ``scheme``, ``overrides`` (``(pattern,
            format)`` pairs) and step ``options`` (``act_order=True``, ``gptq.damp=0.02``).
        calib: calibration data for recipes that need it (``eq.data.calibration(...)``,
            token windows, or a ``Calibration``); default ``wiki``, 128 × 512 tokens.
        inplace: quantize ``model`` itself (saves a copy of the weights).
        progress: ``progress(items, total, what)`` wrapper, e.g. for a progress bar.

    Example:
        >>> q = eq.quantize("smollm2-135m", "awq+gptq", "w4g64-asym", act_order=True)
    """
    from .models.model import Model
    from .pipeline import quantize_model
    from .progress import no_progress
    from .recipe import Recipe

    if not isinstance(recipe, Recipe):
        recipe = Recipe.parse(recipe, scheme, options, formats=tuple(overrides),
                              keep_dtype=keep_dtype)
    elif options or overrides:
        raise EdgequantError("options and overrides belong in the Recipe when one is given")
    if not isinstance(model, Model):
        model, inplace = load(model), True
    return quantize_model(model, recipe, calib=calib, inplace=inplace,
                          progress=progress or no_progress)


def export(model: Model | str | Path, path: str | Path, ftype: str | Recipe = "Q4_K_M",
           **options: Any) -> Path:
    """Write ``model`` as a GGUF file for llama.cpp: a llama.cpp file type or a ``Recipe`` of
    GGML types per layer (``imatrix=``, ``calib=``, ``gptq=``, ``overrides=``, ``force=``).
    See :func:`edgequant.exporters.gguf.export`."""
    from .exporters.gguf import export as _export

    return _export(model, path, ftype, **options)


def open(source: Any, backend: str | None = None, **options: Any) -> Any:  # noqa: A001
    """The model ``source`` opened to run: a ``.gguf`` file (llama.cpp), a ``Model``, or
    anything ``load`` takes (torch). What it returns is an inference
    :class:`~edgequant.engine.Engine` (``generate``, ``chat``, states with ``prefill``/
    ``decode``) and the ``Runnable`` that ``evaluate`` scores. See
    :func:`edgequant.backends.base.open_runnable`.

    Example:
        >>> with eq.open("out/smollm2.gguf") as engine:
        ...     print(engine.generate("The capital of France is", max_tokens=16).text)
    """
    from .backends.base import open_runnable

    return open_runnable(source, backend=backend, **options)


def evaluate(target: Any, metrics: Any = None, config: Any = None, **options: Any) -> Any:
    """Measure ``target`` on the honest yardstick; returns an ``EvalResult``.
    See :func:`edgequant.eval.evaluate.evaluate`."""
    from .eval.evaluate import evaluate as _evaluate

    return _evaluate(target, metrics, config, **options)


def compare(*sources: str, preset: str = "quick", methods: Any = None,
            out_dir: str | Path = "out/compare", **options: Any) -> Any:
    """Quantize ``sources`` (default ``smollm2-135m``) by every method of a preset (``quick``,
    ``paper``, ``full``) or ``methods``, measure each result the same way, store everything in
    ``out_dir/results.db`` (finished cells are skipped: a stopped run resumes) and write
    ``report.md``/``report.html``. Returns a ``CompareResult``.
    See :func:`edgequant.comparison.compare`."""
    from .comparison import compare as _compare

    return _compare(*sources, preset=preset, methods=methods, out_dir=out_dir, **options)


def finetune(source: Any, method: str = "lora", data: str = "wiki",
             out: str | Path = "out/finetune", **options: Any) -> Any:
    """Fine-tune a (quantized) model: ``lora``, ``qlora``, ``qat``, ``lr-qat``, ``prilora``
    on ``wiki`` (distillation), ``sharegpt`` or a file; resumable. Returns a
    ``FinetuneResult``. See :func:`edgequant.finetuning.api.finetune`."""
    from .finetuning.api import finetune as _finetune

    return _finetune(source, method, data, out, **options)
