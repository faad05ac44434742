"""llm-compressor (vLLM's quantizer): GPTQ and AWQ W4A16, round-to-nearest W4A16, and
SmoothQuant W8A8, through ``llmcompressor.oneshot``; saved in compressed-tensors format.

``make`` calls ``oneshot(model=<source folder>, processor=<tokenizer>, dataset=<the
calibration windows as a datasets.Dataset>, recipe=...)`` — the model is given as a path and
the tokenizer as ``processor`` (llm-compressor 0.14 needs both that way) — with every linear
layer but ``lm_head`` as a target, then ``save_pretrained(out, save_compressed=True)``:
``weight_packed`` (int4 eight to an int32), ``weight_scale``, ``weight_zero_point``
(asymmetric) and ``weight_shape`` per layer, the scheme in ``config.json``.

Group sizes: the W4A16 presets use groups of 128; a model whose linear input widths are not
multiples of the group (SmolLM2: 576 = 4.5 × 128) is refused by llm-compressor — that refusal
is raised as the tool's error. The ``-g64`` methods ask for groups of 64 explicitly and say
so in the record's config.

AWQ on CPU: llm-compressor pins its cached activations (``IntermediatesCache.pin_memory``)
before each grid search, which needs an accelerator; without one, that call is made a no-op
for the duration of ``oneshot`` (and restored after).

``open`` reloads the folder with transformers' compressed-tensors support. On CPU it has no
packed int4/int8 kernel: it **decompresses every quantized layer to a dense fp32 weight** on
the first forward. For W8A8 that dense model does **not** quantize activations any more (the
decompressed layers run plain ``Linear.forward``; checked on 0.14.0.1 / compressed-tensors
0.19.0): on CPU an llmc-w8a8 artifact runs as int8-weight, fp32-activation (W8A16).
So the weights at rest are the tool's packed format (``size_info``), while the running model
holds dense fp32 linears — the record's ``runtime`` says so, and memory measurements of these
artifacts show it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...sizes import safetensors_table
from ._common import Source, load_tokenizer
from .runnable import PeerTorchRunnable, torch_runnable

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

DATA = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight")
IGNORE = ["lm_head"]


def _scheme(opts: dict[str, Any]) -> dict[str, Any]:
    """``scheme=`` preset, or ``config_groups=`` when a group size other than 128 is asked."""
    if opts["scheme"] == "W8A8" or opts["group_size"] in (None, 128):
        return {"scheme": opts["scheme"]}
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=opts["scheme"] == "W4A16",
                            strategy="group", group_size=int(opts["group_size"]))
    return {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}}


def _recipe(opts: dict[str, Any]) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    algo = opts["algorithm"]
    common = {"targets": "Linear", "ignore": IGNORE, **_scheme(opts)}
    if algo == "gptq":
        return [GPTQModifier(**common)]
    if algo == "rtn":
        return [QuantizationModifier(**common)]
    if algo == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(**common)]
    if algo == "smoothquant":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=float(opts["smoothing_strength"])),
                QuantizationModifier(**common)]
    raise ValueError(f"unknown llm-compressor algorithm {algo!r}")


@contextlib.contextmanager
def _cpu_awq_workaround(active: bool) -> Iterator[None]:
    """Make ``IntermediatesCache.pin_memory`` a no-op while ``active`` and no accelerator."""
    import torch

    if not active or torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _dataset(tokens: torch.Tensor) -> Any:
    from datasets import Dataset

    ids = tokens.long().tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    from llmcompressor import oneshot

    recipe = _recipe(opts)
    data: dict[str, Any] = {}
    if tokens is not None:
        data = {"dataset": _dataset(tokens), "num_calibration_samples": int(tokens.shape[0]),
                "max_seq_length": int(tokens.shape[1]), "shuffle_calibration_samples": False}
    with _cpu_awq_workaround(opts["algorithm"] == "awq"):
        model = oneshot(model=str(src.folder), processor=load_tokenizer(src.folder),
                        recipe=recipe, output_dir=None, **data)
    model.save_pretrained(str(out), save_compressed=True)
    import json

    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    runtime = ("transformers compressed-tensors: every quantized layer decompressed to a dense "
               "fp32 weight at the first forward (no CPU kernel for the packed format)")
    if opts["scheme"] == "W8A8":
        runtime += "; activations NOT quantized at run time (runs as W8A16 on CPU)"
    return {"config": {"algorithm": opts["algorithm"], "scheme": opts["scheme"],
                       "group_size": opts["group_size"], "ignore": IGNORE,
                       "recipe": [type(m).__name__ for m in recipe],
                       "quantization_config": qc},
            "reload": "native (compressed-tensors), decompressed to dense on CPU",
            "runtime": runtime}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerTorchRunnable:
    import torch
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    layers = _stored_layers(path)
    return torch_runnable(path, record, module, layers, DATA, **options)


def _stored_layers(path: Path) -> dict[str, int]:
    """Quantized layers and their weight counts, from the stored tensors' shapes."""
    layers: dict[str, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        table = safetensors_table(f)
        for name, (_, shape, _) in table.items():
            layer, _, suffix = name.rpartition(".")
            if suffix != "weight_scale" or name.startswith(tuple(IGNORE)):
                continue
            if f"{layer}.weight_packed" in table:  # packed: the shape is stored as a tensor
                rows = shape[0]
                cols = _packed_cols(f, f"{layer}.weight_shape")
                layers[layer] = rows * cols
            elif f"{layer}.weight" in table:
                r, c = table[f"{layer}.weight"][1]
                layers[layer] = r * c
    return layers


def _packed_cols(file: Path, key: str) -> int:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return int(f.get_tensor(key)[1])
