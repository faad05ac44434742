"""Fine-tuning quantized models: LoRA / QLoRA / PRILoRA on a packed base, QAT and LR-QAT with
distillation, merge and re-quantize — over one training loop with resumable checkpoints.

    import edgequant as eq
    r = eq.finetune("out/smollm2-rtn", method="qat", data="wiki", out="out/qat", max_steps=200)
    r.model            # the converted artifact, also saved in out/qat/model

(The package is ``finetuning``, not ``finetune``: importing ``edgequant.finetune`` would
rebind ``eq.finetune`` to the package — see ARCHITECTURE.md's naming rule.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .api import FinetuneConfig, FinetuneResult, finetune, load_finetuned
    from .data import DataConfig
    from .loop import TrainConfig
    from .lora import LoraConfig

__all__ = ["DataConfig", "FinetuneConfig", "FinetuneResult", "LoraConfig", "TrainConfig",
           "finetune", "load_finetuned"]

__getattr__ = lazy_attributes(__name__, {
    "FinetuneConfig": ".api", "FinetuneResult": ".api", "finetune": ".api",
    "load_finetuned": ".api", "DataConfig": ".data", "LoraConfig": ".lora",
    "TrainConfig": ".loop"})
