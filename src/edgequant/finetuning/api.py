"""``eq.finetune``: one entry point for every method, over the shared loop.

    OUT/
      config.json        the full run config, data description and (when done) results
      loss.png           the training-loss curve
      checkpoint/        the last checkpoint (a killed run resumes from it: same command)
      model/             qat, lr-qat (and a LoRA merged with --merge): a native artifact
      model.gguf         a LoRA merged with --merge-gguf TYPE: the llama.cpp file
      adapter/           lora, qlora, prilora: the adapter in peft's format
      base/              lora, qlora, prilora on a source quantized here: the base artifact

Methods: ``lora`` (on the source's quantized layers, or on an RTN quantization of a float
source under ``scheme``), ``qlora`` (LoRA on NF4 + double quant, bf16 compute where the CPU
has it), ``prilora`` (LoRA with depth-growing ranks and pruning), ``qat`` (fake
quantization + STE, learnable scales), ``lr-qat`` (low-rank update inside the rounding).
The objective defaults to distillation from the unquantized model on text (recovery) and
cross-entropy on the response tokens for chat data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EdgequantError, OutputExistsError
from ..progress import Progress, no_progress
from .data import DataConfig, build_data
from .loop import StepRecord, TrainConfig, TrainingError, train, write_run_files
from .lora import LoraConfig, attach, codes_changed, load_adapter, merge_to_float, save_adapter
from .objectives import OBJECTIVES, CrossEntropy, Distillation
from .prilora import PriLoRA, depth_ranks, trainable_count
from .qat import convert, prepare

METHODS = ("lora", "qlora", "qat", "lr-qat", "prilora")
LORA_METHODS = ("lora", "qlora", "prilora")
QLORA_SCHEME = "nf4-dq"
# Peak learning rates measured on SmolLM2-135M at 30 steps of 4 × 512 tokens (see
# benchmarks/bench_finetune.py): QAT's weights must cross rounding boundaries (a few 1e-3),
# LR-QAT's A·B lives in code units (steps), LoRA's B starts at zero.
DEFAULT_LR = {"qat": 3e-4, "lr-qat": 1e-2, "lora": 1e-3, "qlora": 1e-3, "prilora": 1e-3}
#: ``merge="default"``: the issue's default re-quantization of a merged LoRA
DEFAULT_MERGE = "gptq"
#: quantizers the GGUF exporter encodes with (llama.cpp's encoders, or them inside GPTQ)
GGUF_MERGE = ("gptq", "rtn")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of a fine-tuning run (the loop's, the data's and the method's).

    Attributes:
        method: one of :data:`METHODS`.
        objective: ``kd`` (distillation from the unquantized model) or ``ce``; None: ``kd``
            on text data and for qat/lr-qat, ``ce`` on chat data.
        scheme: how a *float* source is quantized first (qlora: always ``nf4-dq``).
        keep_dtype: the result's unquantized tensors (as ``eq.quantize``'s).
        learn_scales: qat/lr-qat: train the scales (LSQ) too.
        scale_lr: their peak learning rate (they follow ``lr``'s schedule). Apart from ``lr``
            because Adam moves a parameter by about its rate a step whatever its size: a
            weight needs ~1e-4 to cross rounding boundaries, a ~0.01 scale moves 1 % a step
            at 1e-4, which undoes the quantization it should refine.
        lrqat_rank, lrqat_alpha: LR-QAT's low-rank update.
        prilora_min, prilora_max, prune_every, prune_ratio: PRILoRA's ranks and pruning.
        lsq_grad_scale: qat/lr-qat: multiply the scales' gradient by LSQ's
            ``1/sqrt(N·Qp)`` (:mod:`.qat`).
        merge: lora methods: a recipe (``rtn``, ``gptq``, …; ``default``: GPTQ with
            calibration) to re-quantize the merged float model with, under the base's scheme
            and per-layer formats (written to ``OUT/model``); None: keep the adapter apart.
        merge_gguf: lora methods: a llama.cpp file type (``Q4_K_M``, ``Q8_0`` …) to export
            the merged float model as ``OUT/model.gguf``, encoded by GPTQ with calibration
            (or llama.cpp's RTN encoders with ``merge="rtn"``).
        calib, calib_samples, calib_len: the merge's calibration: windows of ``calib``'s
            second half (the training half; evaluation reads the first).
        temperature: the distillation temperature.
    """

    method: str = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: str | None = None
    scheme: str = "w4g128"
    keep_dtype: str = "float16"
    learn_scales: bool = True
    scale_lr: float = 1e-5
    lsq_grad_scale: bool = True
    lrqat_rank: int = 16
    lrqat_alpha: float = 16.0
    prilora_min: int = 4
    prilora_max: int = 12
    prune_every: int = 40
    prune_ratio: float = 0.25
    merge: str | None = None
    merge_gguf: str | None = None
    calib: str = "wiki"
    calib_samples: int = 128
    calib_len: int = 512
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise TrainingError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.merge == "default":
            object.__setattr__(self, "merge", DEFAULT_MERGE)
        if (self.merge is not None or self.merge_gguf is not None) and \
                self.method not in LORA_METHODS:
            raise TrainingError(f"--merge/--merge-gguf apply to LoRA methods; {self.method} "
                                f"already produces integer codes")
        if self.merge_gguf is not None:
            from ..exporters.gguf import parse_file_type

            object.__setattr__(self, "merge_gguf", parse_file_type(self.merge_gguf))
            if self.merge_recipe not in GGUF_MERGE:
                raise TrainingError(f"a GGUF is encoded by {' or '.join(GGUF_MERGE)}, not "
                                    f"{self.merge}; drop --merge or choose one of those")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise TrainingError(f"the merge's calibration needs >= 1 window of >= 2 tokens; "
                                f"got {self.calib_samples} × {self.calib_len}")

    @property
    def merge_recipe(self) -> str:
        """The recipe a merged LoRA is re-quantized by (GPTQ unless ``merge`` names one)."""
        return self.merge or DEFAULT_MERGE

    @property
    def resolved_objective(self) -> str:
        if self.objective is not None:
            return self.objective
        return "ce" if self.data.is_chat and self.method not in ("qat", "lr-qat") else "kd"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        d["lora"]["targets"] = list(self.lora.targets)
        d["objective"] = self.resolved_objective
        return d


@dataclass
class FinetuneResult:
    """What a run produced: ``model`` (quantized, adapters attached for LoRA methods),
    the loss ``history``, the output folder and a summary (``summary``)."""

    out: Path
    model: Any
    history: list[StepRecord]
    summary: dict[str, Any]


def steps_for_tokens(max_tokens: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps that cover ``max_tokens`` (chat batches count at ``seq_len``)."""
    per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    return max(1, math.ceil(max_tokens / per_step))


def finetune(source: Any, method: str = "lora", data: str = "wiki",
             out: str | Path = "out/finetune", *, max_steps: int | None = None,
             max_tokens: int | None = None, teacher: Any = None, force: bool = False,
             config: FinetuneConfig | None = None, progress: Progress = no_progress,
             on_step: Any = None, **options: Any) -> FinetuneResult:
    """Fine-tune ``source`` (a ``Model``, an artifact, a zoo name or an HF folder).

    Args:
        method: ``lora`` | ``qlora`` | ``qat`` | ``lr-qat`` | ``prilora``.
        data: ``wiki`` (or another corpus / a text file) | ``sharegpt`` | a chat
            ``.json``/``.jsonl`` file.
        out: the run folder; an unfinished run there resumes, a finished one needs ``force``.
        max_steps / max_tokens: the budget (one of them; default 100 steps).
        teacher: the unquantized model for distillation (default: the float source, or the
            source an artifact was quantized from).
        config: a full :class:`FinetuneConfig` (``method``/``data`` then must agree);
            otherwise ``options`` set its fields: ``lr``, ``seq_len``, ``r`` … go to the
            train, data and LoRA parts by name.

    Example:
        >>> r = eq.finetune("out/smollm2-rtn", "qat", "wiki", "out/qat", max_steps=200)
    """
    cfg = config or build_config(method, data, **options)
    if max_steps is not None and max_tokens is not None:
        raise TrainingError("give max_steps or max_tokens, not both")
    if max_tokens is not None:
        max_steps = steps_for_tokens(max_tokens, cfg)
    if max_steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, max_steps=max_steps))
    out = Path(out)
    _prepare_out(out, force)
    run = _Run(cfg, out)
    return run.go(source, teacher, progress, on_step)


def build_config(method: str, data: str, **options: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from flat options, each routed to the part that has it; the
    learning rate defaults to the method's (:data:`DEFAULT_LR`)."""
    if options.get("lr") is None:
        options["lr"] = DEFAULT_LR.get(method, TrainConfig.lr)
    parts: dict[str, dict[str, Any]] = {"train": {}, "data": {}, "lora": {}, "top": {}}
    names = {p: {f.name for f in dataclasses.fields(cls)}
             for p, cls in (("train", TrainConfig), ("data", DataConfig), ("lora", LoraConfig))}
    top = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"train", "data", "lora",
                                                                 "method"}
    for k, v in options.items():
        where = [p for p, fs in names.items() if k in fs]
        if k in top:
            parts["top"][k] = v
        elif where:  # ``seed`` seeds both the loop and the data order
            for p in where:
                parts[p][k] = v
        else:
            raise TrainingError(f"unknown fine-tuning option {k!r}")
    return FinetuneConfig(method=method, data=DataConfig(source=str(data), **parts["data"]),
                          train=TrainConfig(**parts["train"]),
                          lora=LoraConfig(**parts["lora"]), **parts["top"])


def _prepare_out(out: Path, force: bool) -> None:
    status = _status(out)
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    elif status == "complete":
        raise OutputExistsError(f"{out} holds a finished fine-tuning run; pass --force "
                                f"(force=True) to start over, or another output folder")
    elif out.exists() and status is None and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not a fine-tuning run folder; pass "
                                f"--force to overwrite it")


def _run_config(out: Any) -> dict[str, Any] | None:
    """``out/config.json`` as a dict (None when it is missing, unreadable or not an object)."""
    try:
        cfg = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _status(out: Path) -> str | None:
    cfg = _run_config(out)
    return None if cfg is None else str(cfg.get("status"))


class _Run:
    """One run's steps, in order: base and teacher, method, data, loop, outputs."""

    def __init__(self, cfg: FinetuneConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.info: dict[str, Any] = {"config": cfg.to_dict()}

    def go(self, source: Any, teacher: Any, progress: Progress, on_step: Any
           ) -> FinetuneResult:
        cfg = self.cfg
        src = _as_model(source)
        base, teacher_model = self._base_and_teacher(src, teacher)
        data = build_data(cfg.data, base.tokenizer)
        torch.manual_seed(cfg.train.seed)
        extra = self._attach(base, teacher_model)
        objective = Distillation(teacher_model.module, cfg.temperature) \
            if cfg.resolved_objective == "kd" else CrossEntropy()
        assert base.recipe is not None
        self.info.update(source=base.source, base_recipe=base.recipe.to_dict(),
                         data=data.describe(), objective=objective.describe())
        self._write("running", [])
        history: list[StepRecord] = []
        status = "interrupted"
        try:
            res = train(base.module, objective, data, cfg.train, self.out, extra=extra,
                        progress=progress, on_step=on_step,
                        run_info={"method": cfg.to_dict(), "base": base.source})
            history = res.history
            self.info["train"] = {"steps": res.steps, "tokens": res.tokens,
                                  "seconds": res.seconds, "resumed_from": res.resumed_from,
                                  "final_loss": history[-1].loss if history else None}
            self.info["data_stats"] = data.stats()
            model = self._finish(base)
            status = "complete"
        except TrainingError:
            status = "diverged"
            raise
        finally:
            from .loop import read_history
            self._write(status, history or read_history(self.out))
        return FinetuneResult(self.out, model, history, self.info)

    def _base_and_teacher(self, src: Any, teacher: Any) -> tuple[Any, Any]:
        """The model to train (quantized; ours to modify) and the distillation teacher."""
        from .. import quantize

        cfg = self.cfg
        need_teacher = cfg.resolved_objective == "kd"
        if src.is_quantized:
            if cfg.method == "qlora":
                raise TrainingError("qlora quantizes a float source to nf4-dq itself; give "
                                    "the float model (or use --method lora on this artifact)")
            t = _as_model(teacher) if teacher is not None else \
                (_teacher_of(src) if need_teacher else None)
            return src, t
        t = _as_model(teacher) if teacher is not None else src
        if cfg.method in ("qat", "lr-qat"):
            import copy

            from ..models.model import Model
            from ..recipe import Recipe

            recipe = Recipe(scheme=cfg.scheme, keep_dtype=cfg.keep_dtype)
            return Model(copy.deepcopy(src.module), src.tokenizer, dict(src.source), recipe,
                         {}), t
        scheme = QLORA_SCHEME if cfg.method == "qlora" else cfg.scheme
        return quantize(src, "rtn", scheme, keep_dtype=cfg.keep_dtype), t

    def _attach(self, base: Any, teacher: Any) -> Any:
        cfg = self.cfg
        module: nn.Module = base.module
        if cfg.method in LORA_METHODS:
            lcfg = cfg.lora
            if cfg.method == "prilora":
                probe = [n for n, _ in module.named_modules() if n and _target(n, lcfg)]
                lcfg = replace(lcfg, ranks=depth_ranks(probe, cfg.prilora_min,
                                                       cfg.prilora_max))
            layers = attach(module, lcfg)
            self.lora_config = lcfg
            self.info["trainable"] = {"params": trainable_count(layers),
                                      "plain_lora_same_avg_rank": _plain_count(layers)}
            if cfg.method == "prilora":
                return PriLoRA(layers, cfg.prune_every, cfg.prune_ratio)
            return None
        from ..nn.quant_linear import QuantLinear
        from ..nn.surgery import plan_layers, round_kept_tensors

        if base.is_quantized and base.layers:
            plan: dict[str, Any] = {n: None for n, m in module.named_modules()
                                    if isinstance(m, QuantLinear)}
        else:
            plan = dict(plan_layers(module, base.recipe))
            round_kept_tensors(module, cfg.keep_dtype, skip={f"{n}.weight" for n in plan})
        low_rank = cfg.lrqat_rank if cfg.method == "lr-qat" else None
        layers_q = prepare(module, plan, learn_scales=cfg.learn_scales, low_rank=low_rank,
                           alpha=cfg.lrqat_alpha, lsq_grad_scale=cfg.lsq_grad_scale,
                           scale_lr_mult=cfg.scale_lr / cfg.train.lr,
                           float_module=None if teacher is None else teacher.module)
        n = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.info["trainable"] = {"params": n, "layers": len(layers_q)}
        return None

    def _finish(self, base: Any) -> Any:
        from ..models.model import Model

        cfg = self.cfg
        if cfg.method in ("qat", "lr-qat"):
            layers = {**base.layers, **convert(base.module, cfg.method)}
            model = Model(base.module, base.tokenizer, base.source, base.recipe, layers,
                          base.calibration)
            model.save(self.out / "model", force=True)
            self.info["artifact"] = str(self.out / "model")
            return model
        save_adapter(base.module, self.out / "adapter", self.lora_config,
                     base_model=str(base.source.get("path", "")), force=True)
        self.info["adapter"] = str(self.out / "adapter")
        plain = _without_adapters(base)
        plain.save(self.out / "base", force=True)
        self.info["base"] = str(self.out / "base")
        if cfg.merge is not None or cfg.merge_gguf is not None:
            self._merge(base, plain)
        return base

    def _merge(self, tuned: Any, plain: Any) -> None:
        """Merge the adapters into a float copy and re-quantize it: a native artifact
        (``merge``) and/or a GGUF (``merge_gguf``), both from the same calibration."""
        import time

        from .. import quantize
        from ..data.calibration import calibration
        from ..models.model import Model

        cfg = self.cfg
        recipe = tuned.recipe
        spec = calibration(cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.train.seed)
        merged = Model(merge_to_float(tuned.module), tuned.tokenizer, dict(tuned.source))
        merge_info: dict[str, Any] = {"recipe_name": cfg.merge_recipe}
        self.info["merge"] = merge_info
        if cfg.merge_gguf is not None:
            from ..exporters.gguf import export

            t0 = time.perf_counter()
            gptq = cfg.merge_recipe == "gptq"
            path = export(merged, self.out / "model.gguf", cfg.merge_gguf,
                          calib=spec if gptq else None, gptq=gptq, force=True)
            merge_info["gguf"] = {"path": str(path), "file_type": cfg.merge_gguf,
                                  "encoder": cfg.merge_recipe,
                                  "seconds": time.perf_counter() - t0}
        if cfg.merge is None:
            return
        t0 = time.perf_counter()
        q = quantize(merged, cfg.merge_recipe, recipe.scheme, keep_dtype=recipe.keep_dtype,
                     overrides=recipe.formats, calib=spec, inplace=True)
        q.save(self.out / "model", force=True)
        assert q.recipe is not None
        merge_info.update(recipe=q.recipe.to_dict(), calibration=q.calibration,
                          artifact=str(self.out / "model"),
                          codes_changed=codes_changed(plain.module, q.module)["fraction"],
                          seconds=time.perf_counter() - t0)

    def _write(self, status: str, history: list[StepRecord]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_run_files(self.out, {"status": status, **self.info}, history)


def _target(name: str, lcfg: LoraConfig) -> bool:
    from .lora import _matches

    return _matches(name, lcfg.targets)


def _plain_count(layers: dict[str, Any]) -> int:
    avg = sum(m.r for m in layers.values()) / len(layers)
    return round(sum(avg * (m.in_features + m.out_features) for m in layers.values()))


def _without_adapters(model: Any) -> Any:
    """The base ``Model`` (its quantized layers, shared) with the adapters unwrapped."""
    import copy

    from ..models.model import Model
    from ..nn.surgery import replace_module
    from .lora import adapters

    module = copy.deepcopy(model.module)
    for name, m in adapters(module).items():
        replace_module(module, name, m.base)
    return Model(module, model.tokenizer, model.source, model.recipe, model.layers,
                 model.calibration)


def _as_model(source: Any) -> Any:
    from .. import load
    from ..models.model import Model

    return source if isinstance(source, Model) else load(source)


def _teacher_of(model: Any) -> Any:
    """The float model an artifact was quantized from (its manifest's source)."""
    from .. import load

    src = model.source
    for cand in (src.get("path"), src.get("name")):
        if cand and (Path(cand).exists() or cand == src.get("name")):
            try:
                return load(cand)
            except EdgequantError:
                continue
    raise TrainingError(f"cannot load the unquantized source of this artifact ({src}); pass "
                        f"--teacher (teacher=) or use --objective ce")


def is_run_folder(path: Any) -> bool:
    """Whether ``path`` is a fine-tuning run folder (its ``config.json`` is a run's, not a
    model's: ``eq.load`` asks this before reading a folder as an HF model)."""
    cfg = _run_config(path)
    return cfg is not None and "status" in cfg and \
        isinstance(cfg.get("config"), dict) and "method" in cfg["config"]


def load_finetuned(out: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The result of a finished run in ``out``: the converted artifact (qat, lr-qat, or a
    merged LoRA), else the base with its adapter attached. ``eq.load(out)`` lands here.

    Raises:
        TrainingError: the run has not finished (still running, interrupted or diverged).
    """
    from .. import load

    out = Path(out)
    status = _status(out)
    if status == "diverged":
        raise TrainingError(f"the fine-tuning run in {out} diverged (NaN/Inf loss) and has no "
                            f"result; its last good checkpoint is in {out / 'checkpoint'}")
    if status is not None and status != "complete":
        raise TrainingError(f"the fine-tuning run in {out} is {status}: it is still running or "
                            f"was interrupted; resume it with the same command (its last "
                            f"checkpoint is in {out / 'checkpoint'}), then load it")
    if (out / "model").is_dir():
        return load(out / "model", dtype)
    if (out / "adapter").is_dir() and (out / "base").is_dir():
        m = load(out / "base", dtype)
        for layer in load_adapter(m.module, out / "adapter").values():
            if dtype is not None:  # the adapter computes in the model's float dtype
                layer.lora_A.to(dtype)
                layer.lora_B.to(dtype)
        return m
    raise EdgequantError(f"{out} holds no finished fine-tuning result (model/ or adapter/)")

