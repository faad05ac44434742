"""The fine-tuning peers, set up so that *our* loop trains them: torchao's QAT and peft +
bitsandbytes QLoRA.

Each function returns a plain ``nn.Module`` whose trainable parameters are exactly what the
peer's own recipe trains, so ``edgequant.finetuning.loop.train`` can run it with the same
objective (distillation from the fp32 model), data, token budget, LR schedule and clipping as
our methods — the only difference in the comparison is the method.

- torchao QAT (``torchao.quantization.qat.QATConfig``, prepare → train → convert) with an
  ``IntxWeightOnlyConfig`` int4 symmetric per-group base: the one int4 weight-only config
  that converts to something that runs on CPU (``Int4WeightOnlyConfig`` needs CUDA/XPU).
  torchao requires ``in_features % group_size == 0``: SmolLM2's 576-wide rows refuse group
  128 (our format keeps a ragged last group), so the benchmark uses group 64
  (:data:`TORCHAO_GROUP`), which divides 576 and 1536. The fake quantizer recomputes the
  scales from the weights on every forward (no range learning), and convert recomputes them
  the same way, so the converted model computes what the trained one did.
- peft QLoRA: bitsandbytes NF4 + double quantization loaded through transformers'
  ``BitsAndBytesConfig`` (bf16 compute), peft ``LoraConfig(r=16, alpha=32, dropout=0.05)`` on
  q/k/v/o — the QLoRA paper's recipe, and our ``qlora`` method's defaults. No
  ``prepare_model_for_kbit_training``: the model loads in float32 already and gradient
  checkpointing (its other effect) would only trade speed for memory, which ours does not do.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCHAO_GROUP = 64
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _torchao_base(bits: int, group_size: int) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                granularity=PerGroup(group_size))


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    """Only the transformer blocks' projections, as ours: embeddings and lm_head stay float."""
    return isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] in BLOCK_LINEARS


def torchao_group_ok(module: nn.Module, group_size: int) -> bool:
    """Whether torchao accepts ``group_size`` on every block linear (it needs it to divide
    ``in_features``; ours allows a ragged last group)."""
    return all(m.in_features % group_size == 0 for n, m in module.named_modules()
               if _is_block_linear(m, n))


def prepare_torchao_qat(hf_module: nn.Module, bits: int = 4,
                        group_size: int = TORCHAO_GROUP) -> nn.Module:
    """torchao's QAT prepare step on ``hf_module`` (in place): block linears become
    ``FakeQuantizedLinear`` (int``bits`` symmetric per-group weight fake quant, STE).

    Everything is frozen but those layers' weights (and biases) — what torchao's recipe
    trains, and what our ``qat`` trains bar its learnable scales.

    Raises:
        ValueError: ``group_size`` does not divide some layer's ``in_features`` (torchao's
            own check, raised before any layer is touched).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    if not torchao_group_ok(hf_module, group_size):
        widths = sorted({m.in_features for n, m in hf_module.named_modules()
                         if _is_block_linear(m, n)})
        raise ValueError(f"torchao needs group_size to divide in_features; {group_size} does "
                         f"not divide all of {widths}")
    quantize_(hf_module, QATConfig(_torchao_base(bits, group_size), step="prepare"),
              filter_fn=_is_block_linear)
    for p in hf_module.parameters():
        p.requires_grad_(False)
    for m in hf_module.modules():
        if isinstance(m, FakeQuantizedLinear):
            for p in m.parameters():
                p.requires_grad_(True)
    return hf_module


def convert_torchao_qat(module: nn.Module) -> nn.Module:
    """torchao's QAT convert step (in place): each ``FakeQuantizedLinear`` becomes an
    ``nn.Linear`` holding torchao's ``IntxUnpackedToInt8Tensor`` weight (int codes, per-group
    scales), with the base config prepare used (read back from the fake quantizers)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    fq = [m for m in module.modules() if isinstance(m, FakeQuantizedLinear)]
    if not fq:
        raise ValueError("no FakeQuantizedLinear to convert: run prepare_torchao_qat first")
    wcfg: Any = fq[0].weight_fake_quantizer.config
    bits = int(str(wcfg.dtype).removeprefix("torch.int"))
    group_size = int(wcfg.granularity.group_size)
    quantize_(module, QATConfig(_torchao_base(bits, group_size), step="convert"),
              filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def bnb_nf4_config() -> Any:
    """transformers' QLoRA base: NF4, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_bnb_nf4(model_path: str | Path) -> nn.Module:
    """The HF checkpoint in ``model_path`` loaded as bitsandbytes NF4-dq (CPU, float32 rest)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
        str(model_path), quantization_config=bnb_nf4_config(), dtype=torch.float32,
        device_map="cpu").eval()


def prepare_peft_qlora(model_path: str | Path, r: int = 16, alpha: int = 32,
                       dropout: float = 0.05, targets: list[str] | None = None,
                       seed: int = 0) -> nn.Module:
    """peft LoRA (``B = 0`` at start, so it computes the bnb base exactly) on a bitsandbytes
    NF4-dq load of ``model_path``; only the adapters train. ``seed`` seeds the A init (as
    our loop seeds ours)."""
    from peft import LoraConfig, get_peft_model

    base = load_bnb_nf4(model_path)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(targets or PEFT_TARGETS), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(base, cfg).eval()  # type: ignore[no-any-return]


@dataclass
class PeerRun:
    """A trained peer: the ``Model`` to measure, the loop's result, the peak RSS right after
    training (before convert / evaluation) and what the row's notes should say."""

    model: Any
    result: Any
    peak_rss_train_mb: float
    notes: str
    trainable_params: int


def train_peer(method: str, teacher: Any, run_dir: str | Path, *, lr: float, seq_len: int,
               batch_size: int, save_every: int = 50, warmup_steps: int = 10,
               max_steps: int | None = None,
               max_tokens: int | None = None) -> PeerRun:
    """Train peer ``method`` (``torchao-qat`` | ``peft-qlora``) from ``teacher`` (the fp32
    ``Model``) with our loop, exactly as ``eq.finetune`` would train ours: the same
    ``build_config`` defaults (schedule, warm-up, clip, seed), data (``wiki``'s training half,
    seed 0), budget (``max_tokens`` → steps as ``steps_for_tokens``) and objective
    (distillation from ``teacher``). ``run_dir`` is cleared first: a stale checkpoint of the
    same config would otherwise be resumed."""
    from edgequant.eval.memory import _peak_rss_mb
    from edgequant.finetuning.api import build_config, steps_for_tokens
    from edgequant.finetuning.data import build_data
    from edgequant.finetuning.loop import train
    from edgequant.finetuning.objectives import Distillation
    from edgequant.models import zoo
    from edgequant.models.model import Model

    cfg = build_config("lora", "wiki", seq_len=seq_len, batch_size=batch_size, lr=lr,
                       save_every=save_every, warmup_steps=warmup_steps)
    if (max_steps is None) == (max_tokens is None):
        raise ValueError("give max_steps or max_tokens (one of them)")
    steps = max_steps if max_steps is not None else steps_for_tokens(int(max_tokens or 0), cfg)
    tcfg = dataclasses.replace(cfg.train, max_steps=steps)
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.manual_seed(tcfg.seed)
    student: nn.Module
    if method == "torchao-qat":
        student = copy.deepcopy(teacher.module)
        g = 128 if torchao_group_ok(student, 128) else TORCHAO_GROUP
        prepare_torchao_qat(student, bits=4, group_size=g)
        notes = (f"torchao QAT (IntxWeightOnlyConfig int4 symmetric, group {g}) from the fp32 "
                 f"model; trains the weights, scales follow them (no range learning)")
        if g != 128:
            notes += ("; g128 refused: torchao needs in_features % group_size == 0 and 128 "
                      "does not divide 576 (ours keeps a ragged last group)")
    elif method == "peft-qlora":
        src = teacher.source
        folder = src.get("path") or src.get("name")
        if folder in zoo.ZOO:
            folder = zoo.pull(folder)
        student = prepare_peft_qlora(folder, seed=tcfg.seed)
        notes = ("bitsandbytes NF4 + double quant (BitsAndBytesConfig, bf16 compute) + peft "
                 "LoRA r16 alpha32 dropout 0.05 on q/k/v/o")
    else:
        raise ValueError(f"unknown peer {method!r}: torchao-qat or peft-qlora")
    data = build_data(cfg.data, teacher.tokenizer)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    res = train(student, Distillation(teacher.module, cfg.temperature), data, tcfg, run_dir,
                run_info={"method": method})
    peak = _peak_rss_mb()
    if method == "torchao-qat":
        convert_torchao_qat(student)
    student.eval()
    return PeerRun(Model(student, teacher.tokenizer, dict(teacher.source)), res, peak, notes,
                   trainable)
