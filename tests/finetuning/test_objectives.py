"""Objectives: cross-entropy on labelled tokens only; KL to the teacher as the KLD metric."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgequant.finetuning.data import IGNORE
from edgequant.finetuning.objectives import Distillation, cross_entropy, kl_to_teacher


def test_cross_entropy_counts_only_labelled_next_tokens():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[3, IGNORE, 5, 7]])          # position 0 predicts label 1 (ignored)
    loss, n = cross_entropy(logits, labels)
    ref = (F.cross_entropy(logits[0, 1:3], torch.tensor([5, 7])))
    assert n == 2 and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_kl_matches_the_definition_and_is_zero_for_the_teacher():
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    p = F.softmax(t[mask], -1)
    ref = (p * (p.log() - F.log_softmax(s[mask], -1))).sum(-1).mean()
    assert kl_to_teacher(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_to_teacher(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_from_itself_is_zero_and_teacher_gets_no_grad(tiny_llama):
    teacher = copy.deepcopy(tiny_llama)
    obj = Distillation(teacher)
    ids = torch.randint(0, 128, (2, 8))
    loss, n = obj(tiny_llama, {"input_ids": ids, "labels": ids})
    assert n == 14 and loss.item() == pytest.approx(0.0, abs=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
