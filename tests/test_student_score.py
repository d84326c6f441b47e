"""The student-side score: the statistics of a student's gradients under a candidate's distillation signal."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from minidisc_ray.candidates import student_side_score
from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
from minidisc_ray.student_score import capacity_gap_prior, student_signal

from .conftest import batch_with_padding, tiny_bert, tiny_search_payload


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = tiny_bert(seed=4)
    imp = compute_importance(teacher, [batch_with_padding()])
    return teacher, prune_model(teacher, plan_for_sparsity(imp, 0.5))


def test_stability_is_one_when_every_batch_pulls_the_same_way_and_less_otherwise() -> None:
    teacher, student = _pair()
    before = copy.deepcopy(student.state_dict())
    same = student_signal(teacher, student, [batch_with_padding(seed=1)] * 4)
    assert same["stability"] == pytest.approx(1.0, abs=1e-9)
    varied = student_signal(teacher, student, [batch_with_padding(seed=s) for s in range(1, 5)])
    assert 0.0 < varied["stability"] < 0.999
    for out in (same, varied):
        assert -1.0 <= out["alignment"] <= 1.0 and out["kd_loss"] > 0 and out["batches"] == 4
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items()), "the score trains nothing"
    assert all(p.grad is None for p in student.parameters())
    with pytest.raises(ValueError, match="at least 2 batches"):
        student_signal(teacher, student, [batch_with_padding()])


def test_alignment_is_one_when_the_teacher_says_the_labels() -> None:
    """A teacher that puts its mass on the gold labels pulls the student where the labels do: the KD gradient
    (hidden-state terms aside, zero here: the teacher is the student) is the task gradient's direction."""
    _, student = _pair()
    batch = batch_with_padding(seed=1)
    oracle = copy.deepcopy(student)  # its hidden states are the student's: no hidden-state gradient
    labels = batch["labels"]

    class Says(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = oracle

        def forward(self, **kw):  # type: ignore[no-untyped-def]
            out = self.inner(**kw)  # then its logits: 20 x one-hot of each row's label
            out.logits = 20.0 * torch.nn.functional.one_hot(labels, out.logits.shape[-1]).float()
            return out

    says = Says()
    says.config = oracle.config  # type: ignore[assignment]
    out = student_signal(says, student, [batch, batch])
    assert out["alignment"] > 0.9


def test_the_capacity_gap_prior_is_the_candidate_nearest_two_and_a_half_students() -> None:
    prior = capacity_gap_prior(1_000, {0.5: 5_000, 0.7: 2_600, 0.9: 1_000})
    assert prior["sparsity"] == 0.7 and prior["target_params"] == 2_500


def test_student_side_score_of_an_assistant_and_of_no_assistant(sst2_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, tokenize_task

    data = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=300, max_dev_samples=40), seed=0)
    train, dev, _ = tokenize_task(data, tokenizer, 32, use_cache=False)
    payload = tiny_search_payload(train, dev, tokenizer, recovery_steps=2)
    ta = student_side_score(payload, 0.5, batches=3)
    none = student_side_score(payload, 0.9, batches=3)
    assert ta["sparsity"] == 0.5 and none["sparsity"] == 0.9
    assert ta["batches"] == none["batches"] == 3
    assert ta != none
    assert student_side_score(payload, 0.5, batches=3) == {**ta, "seconds": pytest.approx(ta["seconds"], abs=60)}
