"""The training loop: schedule, accumulation, resume after a kill or Ctrl-C, NaN guard."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

from edgequant.finetuning.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    read_history,
    train,
    write_run_files,
)
from edgequant.finetuning.lora import LoraConfig, attach
from edgequant.finetuning.objectives import CrossEntropy

from ._helpers import windows


def _lora_model(tiny_llama, dropout=0.1):
    torch.manual_seed(0)
    m = copy.deepcopy(tiny_llama)
    attach(m, LoraConfig(r=4, alpha=8, dropout=dropout))
    return m


def _cfg(**kw):
    base = dict(max_steps=6, lr=1e-2, warmup_steps=2, save_every=2, compute_dtype="float32")
    return TrainConfig(**{**base, **kw})


def _losses(history):
    return [r.loss for r in history]


def test_schedule_warmup_then_cosine_to_floor():
    c = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [c.lr_at(0), c.lr_at(1)] == [0.5, 1.0]
    assert c.lr_at(2) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(0.1)
    assert c.lr_at(6) == pytest.approx(0.55)            # halfway down the cosine
    k = TrainConfig(max_steps=10, lr=1.0, warmup_steps=0, schedule="constant")
    assert {k.lr_at(i) for i in range(10)} == {1.0}
    with pytest.raises(TrainingError, match="schedule"):
        TrainConfig(schedule="linear")


def test_killed_run_resumes_on_the_same_loss_curve(tiny_llama, tmp_path):
    ref = train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(), tmp_path / "ref")
    assert len(ref.history) == 6 and ref.history[-1].loss < ref.history[0].loss

    def crash(rec):  # a hard kill after step 3: nothing saved since step 2
        if rec.step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(), tmp_path / "run",
              on_step=crash)
    assert [r.step for r in read_history(tmp_path / "run")] == [1, 2]
    # a fresh process would rebuild the model from scratch: new init, different RNG state
    torch.manual_seed(999)
    resumed = train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(),
                    tmp_path / "run")
    assert resumed.resumed_from == 2
    assert _losses(resumed.history) == _losses(ref.history)      # bit for bit
    assert [r.tokens for r in resumed.history] == [r.tokens for r in ref.history]


def test_ctrl_c_saves_the_step_and_resumes(tiny_llama, tmp_path):
    ref = train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(save_every=0),
                tmp_path / "ref")

    def interrupt(rec):
        if rec.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(save_every=0),
              tmp_path / "run", on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert len(read_history(tmp_path / "run")) == 3
    resumed = train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(save_every=0),
                    tmp_path / "run")
    assert _losses(resumed.history) == _losses(ref.history)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    calls = []

    def objective(module, batch):
        loss, n = CrossEntropy()(module, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 4 else loss), n

    with pytest.raises(TrainingDiverged, match=r"nan at step 4.*checkpoint \(step 2\)"):
        train(_lora_model(tiny_llama), objective, windows(), _cfg(), tmp_path / "run")
    assert [r.step for r in read_history(tmp_path / "run")] == [1, 2]


def test_changed_config_is_not_resumed(tiny_llama, tmp_path):
    train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(max_steps=2), tmp_path)
    with pytest.raises(TrainingError, match="other settings"):
        train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(max_steps=2, lr=1e-3),
              tmp_path)


def test_gradient_accumulation_matches_one_big_batch(tiny_llama, tmp_path):
    cfg = dict(max_steps=1, warmup_steps=0, clip_norm=None)
    a = _lora_model(tiny_llama, dropout=0.0)
    b = copy.deepcopy(a)
    train(a, CrossEntropy(), windows(batch_size=4), _cfg(**cfg), tmp_path / "a")
    train(b, CrossEntropy(), windows(batch_size=2), _cfg(**cfg, grad_accum=2), tmp_path / "b")
    pa = {n: p for n, p in a.named_parameters() if p.requires_grad}
    for n, p in b.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, pa[n], rtol=1e-5, atol=1e-6)


def test_run_files(tmp_path, tiny_llama):
    res = train(_lora_model(tiny_llama), CrossEntropy(), windows(), _cfg(max_steps=3),
                tmp_path)
    write_run_files(tmp_path, {"method": "lora"}, res.history)
    assert json.loads((tmp_path / "config.json").read_text()) == {"method": "lora"}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert res.history[0].tokens_per_s > 0 and res.history[-1].tokens == 3 * 2 * 15
