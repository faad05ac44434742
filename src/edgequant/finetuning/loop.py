"""The training loop every fine-tuning method shares: AdamW, a warm-up + cosine (or constant)
schedule, gradient accumulation and clipping, seeded, with checkpoints a user can trust.

The loop knows nothing of LoRA or QAT: it trains the parameters of ``module`` that require
grad, on batches from a :class:`BatchSource` (batch ``i`` is a pure function of ``i``, so the
data position is one integer), under an ``objective(module, batch) -> (loss, tokens)``. A
parameter with an ``lr_mult`` attribute learns at ``lr × lr_mult`` (QAT's scales: Adam moves
every parameter by about ``lr`` a step, which is a large relative change for a 0.01 scale).

Checkpoints (``OUT/checkpoint/``, replaced atomically every ``save_every`` steps, on Ctrl-C and
at the end) hold everything the next step depends on — nothing is pickled:

    trainable.safetensors   the trainable parameters by name (+ a method's extra state)
    optimizer.safetensors   AdamW's moments and step counts, per parameter name
    rng.safetensors         torch's global RNG state (dropout) at the step boundary
    state.json              step, micro-batches consumed, tokens, the loss history, the
                            config (a resume under another config is refused)

So a run killed at any moment and started again continues the *same* loss curve: step
``k+1`` after a resume computes exactly what it would have computed without the kill. A NaN
or Inf loss (or gradient norm) stops the run with :class:`TrainingDiverged`, leaving the last
good checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import nn

from ..compute import resolve_compute_dtype
from ..errors import EdgequantError
from ..io_utils import atomic_dir, atomic_file
from ..progress import Progress, no_progress

CHECKPOINT = "checkpoint"
LR_MULT = "lr_mult"  # a Parameter attribute: its learning rate is ``lr × lr_mult``
SCHEDULES = ("cosine", "constant")


class TrainingError(EdgequantError):
    """A training run that cannot start or continue as asked."""


class TrainingDiverged(TrainingError):
    """The loss or the gradient norm became NaN/Inf."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the loop, in one place.

    Attributes:
        max_steps: optimizer steps (each ``grad_accum`` micro-batches).
        lr: peak learning rate (after warm-up).
        schedule: ``cosine`` (decays to ``min_lr_ratio · lr`` at ``max_steps``) or
            ``constant`` (after warm-up).
        warmup_steps: linear warm-up from ``lr / warmup_steps``.
        min_lr_ratio: the cosine schedule's floor, relative to ``lr``.
        weight_decay, betas, eps: AdamW's.
        grad_accum: micro-batches per optimizer step.
        clip_norm: global gradient-norm clipping (None: off).
        seed: seeds torch's RNG (dropout, initialisation) and the data order.
        save_every: checkpoint every this many steps (0: only on Ctrl-C and at the end).
        compute_dtype: the forward/backward's autocast dtype: ``auto`` (bfloat16 where the
            CPU multiplies it natively), ``float32``, ``bfloat16``. Parameters, optimizer
            state and the loss stay float32.
    """

    max_steps: int = 100
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 50
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, not {self.max_steps}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                                f"not {self.schedule!r}")
        if self.lr <= 0 or self.grad_accum < 1 or self.warmup_steps < 0 or self.save_every < 0:
            raise TrainingError("lr must be > 0, grad_accum >= 1, warmup_steps and save_every "
                                ">= 0")
        resolve_compute_dtype(self.compute_dtype, TrainingError)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.max_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


class BatchSource(Protocol):
    """Deterministic batches: ``batch(i)`` is the same for the same ``i`` in every run."""

    def batch(self, i: int) -> dict[str, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class Stateful(Protocol):
    """A method's own state that a resume needs (PRILoRA's masks, activation norms)."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def after_step(self, step: int) -> None: ...


Objective = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@dataclass
class StepRecord:
    """One optimizer step as the history keeps it (and ``on_step`` sees it)."""

    step: int            # 1-based: steps completed
    loss: float          # mean over the step's micro-batches
    lr: float
    grad_norm: float
    tokens: int          # training tokens seen so far
    seconds: float       # wall time of this step
    tokens_per_s: float


@dataclass
class TrainResult:
    steps: int
    tokens: int
    history: list[StepRecord] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise TrainingError("the model has no trainable parameters; the method did not attach "
                            "any (check --target / the method's options)")
    return params


def _param_groups(params: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
    """One AdamW group per learning-rate multiplier (a parameter's ``lr_mult`` attribute)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params.values():
        groups.setdefault(float(getattr(p, LR_MULT, 1.0)), []).append(p)
    return [{"params": ps, LR_MULT: m} for m, ps in sorted(groups.items())]


def train(module: nn.Module, objective: Objective, data: BatchSource, config: TrainConfig,
          out: str | Path, *, extra: Stateful | None = None, progress: Progress = no_progress,
          on_step: Callable[[StepRecord], None] | None = None,
          run_info: dict[str, Any] | None = None) -> TrainResult:
    """Train ``module``'s trainable parameters; checkpoints go to ``out/checkpoint``.

    A checkpoint already in ``out`` whose config (``config`` + ``run_info``) equals this run's
    is resumed; one with another config is refused (delete it, or use another ``out``).

    Raises:
        TrainingDiverged: a NaN/Inf loss or gradient norm (the last checkpoint is kept).
        KeyboardInterrupt: after saving a checkpoint of the last completed step.
    """
    out = Path(out)
    params = trainable_parameters(module)
    identity = {"train": config.to_dict(), "data": data.describe(), **(run_info or {})}
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(_param_groups(params), lr=config.lr, betas=config.betas,
                            eps=config.eps, weight_decay=config.weight_decay)
    result = TrainResult(0, 0)
    ckpt = out / CHECKPOINT
    if (ckpt / "state.json").is_file():
        _load_checkpoint(ckpt, identity, params, opt, extra, result)
    dtype = resolve_compute_dtype(config.compute_dtype, TrainingError)
    module.train()
    rng = torch.get_rng_state()
    saved = result.steps if result.resumed_from else -1
    start = time.perf_counter()
    steps = range(result.steps, config.max_steps)
    try:
        with _deferred_interrupt() as interrupted:
            for step in progress(steps, config.max_steps - result.steps, "fine-tuning"):
                rec = _one_step(module, objective, data, config, opt, params, step, dtype,
                                result)
                result.steps, result.tokens = step + 1, rec.tokens
                result.history.append(rec)
                if extra is not None:
                    extra.after_step(step + 1)
                rng = torch.get_rng_state()
                if on_step is not None:
                    on_step(rec)
                if interrupted():
                    raise KeyboardInterrupt
                if config.save_every and (step + 1) % config.save_every == 0:
                    _save_checkpoint(ckpt, identity, params, opt, extra, result, rng)
                    saved = result.steps
    except _NonFinite as e:
        last = f"step {saved}" if saved > 0 else "none yet"
        raise TrainingDiverged(
            f"the {e.args[0]} became {e.args[1]} at step {e.args[2]}; training stopped and the "
            f"last good checkpoint ({last}) was kept. Lower the learning rate (--lr) or use "
            f"float32 (--compute-dtype float32), then run the same command again to resume"
            ) from None
    except KeyboardInterrupt:
        if saved != result.steps:
            _save_checkpoint(ckpt, identity, params, opt, extra, result, rng)
        raise
    finally:
        module.eval()
        result.seconds += time.perf_counter() - start
    if saved != result.steps:
        _save_checkpoint(ckpt, identity, params, opt, extra, result, rng)
    return result


def _one_step(module: nn.Module, objective: Objective, data: BatchSource, config: TrainConfig,
              opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], step: int,
              dtype: torch.dtype, result: TrainResult) -> StepRecord:
    t0 = time.perf_counter()
    lr = config.lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr * g[LR_MULT]
    opt.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for j in range(config.grad_accum):
        batch = data.batch(step * config.grad_accum + j)
        with _autocast(dtype):
            loss, n = objective(module, batch)
        loss = loss.float()
        if not torch.isfinite(loss):
            raise _NonFinite("loss", float(loss.detach()), step + 1)
        (loss / config.grad_accum).backward()
        total += float(loss.detach())
        tokens += n
    norm = torch.nn.utils.clip_grad_norm_(
        list(params.values()), config.clip_norm if config.clip_norm else float("inf"))
    if not torch.isfinite(norm):
        raise _NonFinite("gradient norm", float(norm), step + 1)
    opt.step()
    dt = time.perf_counter() - t0
    return StepRecord(step + 1, total / config.grad_accum, lr, float(norm),
                      result.tokens + tokens, dt, tokens / dt if dt > 0 else 0.0)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C lets the current optimizer step finish (a half-applied update cannot
    be checkpointed); a second one interrupts at once. Only in the main thread; the previous
    handler is restored on the way out."""
    hits: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _autocast(dtype: torch.dtype) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


class _NonFinite(Exception):
    """(what, value, step): raised inside a step, reported by ``train``."""


# --- checkpoints ------------------------------------------------------------------------------


def _save_checkpoint(ckpt: Path, identity: dict[str, Any], params: dict[str, nn.Parameter],
                     opt: torch.optim.Optimizer, extra: Stateful | None, result: TrainResult,
                     rng: torch.Tensor) -> None:
    trainable = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    if extra is not None:
        trainable.update({f"extra.{k}": v.detach().contiguous()
                          for k, v in extra.state_tensors().items()})
    moments: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            moments[f"{name}.{k}"] = v.detach().reshape(v.shape).contiguous()
    state = {"identity": identity, "step": result.steps, "tokens": result.tokens,
             "seconds": result.seconds, "history": [asdict(r) for r in result.history]}
    with atomic_dir(ckpt, force=True) as tmp:
        safetensors.torch.save_file(trainable, str(tmp / "trainable.safetensors"))
        safetensors.torch.save_file(moments, str(tmp / "optimizer.safetensors"))
        safetensors.torch.save_file({"torch": rng}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def _load_checkpoint(ckpt: Path, identity: dict[str, Any], params: dict[str, nn.Parameter],
                     opt: torch.optim.Optimizer, extra: Stateful | None,
                     result: TrainResult) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    if json.loads(json.dumps(identity)) != state["identity"]:
        raise TrainingError(f"{ckpt} belongs to a run with other settings; resume it with the "
                            f"same command, or start over (--force / another output folder)")
    trainable = safetensors.torch.load_file(str(ckpt / "trainable.safetensors"))
    moments = safetensors.torch.load_file(str(ckpt / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            if f"param.{name}" not in trainable:
                raise TrainingError(f"{ckpt} lacks parameter {name}; start over with --force")
            p.copy_(trainable[f"param.{name}"])
            st = {k.removeprefix(name + "."): v for k, v in moments.items()
                  if k.rsplit(".", 1)[0] == name}
            if st:
                opt.state[p] = st
    if extra is not None:
        extra.load_state_tensors({k.removeprefix("extra."): v for k, v in trainable.items()
                                  if k.startswith("extra.")})
    torch.set_rng_state(safetensors.torch.load_file(str(ckpt / "rng.safetensors"))["torch"])
    result.steps, result.tokens = state["step"], state["tokens"]
    result.seconds = state.get("seconds", 0.0)
    result.history = [StepRecord(**r) for r in state["history"]]
    result.resumed_from = result.steps


def read_history(out: str | Path) -> list[StepRecord]:
    """The loss history of the checkpoint in ``out`` (empty if there is none)."""
    path = Path(out) / CHECKPOINT / "state.json"
    if not path.is_file():
        return []
    return [StepRecord(**r) for r in json.loads(path.read_text())["history"]]


def write_run_files(out: str | Path, config: dict[str, Any], history: list[StepRecord]) -> None:
    """``config.json`` (the full run config) and ``loss.png`` (the loss curve) in ``out``."""
    out = Path(out)
    with atomic_file(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if not history:
        return
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend switch

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([r.step for r in history], [r.loss for r in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
