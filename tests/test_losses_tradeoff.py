from __future__ import annotations

import copy
import math

import pytest
import torch

from minidisc_ray.losses import hidden_layer_indices, logit_loss, masked_hidden_mse, minidisc_loss
from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
from minidisc_ray.tradeoff import lambda_tradeoff
from minidisc_ray.training import distill_loss_on_batch

from .conftest import batch_with_padding, tiny_bert


def test_kd_loss_is_zero_when_student_equals_teacher() -> None:
    teacher = tiny_bert()
    student = copy.deepcopy(teacher).eval()
    loss = distill_loss_on_batch(student.eval(), teacher, batch_with_padding(), temperature=2.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_is_positive_for_a_pruned_student_and_has_gradients() -> None:
    teacher = tiny_bert()
    batch = batch_with_padding()
    student = prune_model(teacher, plan_for_sparsity(compute_importance(teacher, [batch]), 0.5)).eval()
    loss = distill_loss_on_batch(student, teacher, batch)
    assert float(loss.detach()) > 0
    loss.backward()
    assert student.classifier.weight.grad is not None



def test_the_teacher_keeps_only_the_matched_hidden_states_and_the_loss_is_unchanged() -> None:
    """A 12-layer teacher: the loss matches layers 2, 4, ..., 12, and distill_loss_on_batch drops the other
    seven of the teacher's 13 hidden states before the student runs; the loss and its gradients equal the
    MiniDisc loss computed on all of them."""
    teacher = tiny_bert(layers=12)
    batch = batch_with_padding()
    student = prune_model(teacher, plan_for_sparsity(compute_importance(teacher, [batch]), 0.5)).eval()
    assert hidden_layer_indices(12) == [2, 4, 6, 8, 10, 12]
    trimmed = distill_loss_on_batch(student, teacher, batch)
    trimmed.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    s_out = student(**inputs, output_hidden_states=True)
    full = minidisc_loss(s_out.logits, t_out.logits, s_out.hidden_states, t_out.hidden_states,
                         batch["attention_mask"])
    full.backward()
    assert float(trimmed) == pytest.approx(float(full), abs=1e-7)
    assert float(full) > 0
    for n, p in student.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-7), n

def test_hidden_mse_ignores_padding() -> None:
    a = [torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    b = [torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    b[1][0, 2] = 100.0  # differs only at a padding position
    mask = torch.tensor([[1, 1, 0]])
    assert float(masked_hidden_mse(a, b, mask, [1])) == 0.0
    b[1][0, 0] = 2.0
    # one token of two differs by 2 in all 4 dims: sum 16 over 2 tokens * 4 dims
    assert float(masked_hidden_mse(a, b, mask, [1])) == pytest.approx(2.0)


def test_logit_loss_values() -> None:
    t = torch.tensor([[2.0, 0.0]])
    s = torch.tensor([[0.0, 0.0]])
    p = torch.softmax(t, -1)
    kl = float((p * (p.log() - math.log(0.5))).sum())
    assert float(logit_loss(s, t)) == pytest.approx(kl, rel=1e-6)
    assert float(logit_loss(s[:, :1], t[:, :1], regression=True)) == pytest.approx(4.0)


def test_minidisc_loss_is_half_sum_plus_hard_term() -> None:
    hs = [torch.zeros(1, 2, 3)] * 7
    ht = [torch.ones(1, 2, 3)] * 7
    mask = torch.ones(1, 2)
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    # six matched layers, each MSE 1.0; logits equal
    assert float(minidisc_loss(s, t, hs, ht, mask)) == pytest.approx(3.0)
    ce = float(torch.nn.functional.cross_entropy(s, torch.tensor([0])))
    assert float(minidisc_loss(s, t, hs, ht, mask, labels=torch.tensor([0]), hard_label_weight=0.5)) == \
        pytest.approx(3.0 + 0.5 * ce)


def test_hidden_layer_map() -> None:
    assert hidden_layer_indices(6) == [1, 2, 3, 4, 5, 6]
    assert hidden_layer_indices(12) == [2, 4, 6, 8, 10, 12]
    assert hidden_layer_indices(2) == [1, 2]
    assert hidden_layer_indices(24) == [4, 8, 12, 16, 20, 24]


def test_lambda_tradeoff_values() -> None:
    assert lambda_tradeoff(0.9, 0.5) == pytest.approx(1.0)
    assert lambda_tradeoff(0.8, 0.9, lam=0.5) == pytest.approx(1.25)
    assert lambda_tradeoff(0.7, 0.0, lam=0.0) == pytest.approx(0.7)
    assert math.isnan(lambda_tradeoff(float("nan"), 0.5))
    # the lambda moves the argmax towards sparser candidates
    curve = {0.5: 0.90, 0.7: 0.87, 0.9: 0.80}
    assert max(curve, key=lambda s: lambda_tradeoff(curve[s], s, 0.0)) == 0.5
    assert max(curve, key=lambda s: lambda_tradeoff(curve[s], s, 0.2)) == 0.7
    assert max(curve, key=lambda s: lambda_tradeoff(curve[s], s, 1.0)) == 0.9
    with pytest.raises(ValueError):
        lambda_tradeoff(0.5, 0.5, lam=-0.1)


def test_offline_top_k_loss_equals_the_online_loss_at_full_vocabulary_and_bounds_it_below() -> None:
    from minidisc_ray.losses import logit_loss, sparse_logit_loss, teacher_top_k

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    for t in (1.0, 2.0):
        online = logit_loss(student, teacher, t, mask=mask)
        idx, val, lse = teacher_top_k(teacher, 50, t)
        assert torch.allclose(sparse_logit_loss(student, idx, val, lse, t, mask), online, atol=1e-5)
        idx, val, lse = teacher_top_k(teacher, 8, t)
        top8 = sparse_logit_loss(student, idx, val, lse, t, mask)
        assert idx.shape == (3, 7, 8)
        assert lse.shape == (3, 7)
        assert torch.equal(val, teacher.topk(8, dim=-1).values)
        # sharp teachers (scale 3) keep most of their mass in 8 of 50: the truncated KL is close, not equal
        assert 0.5 * online < top8 < 1.5 * online
        assert not torch.allclose(top8, online)


def test_chunked_kl_and_activation_checkpointing_change_memory_not_the_loss_or_its_gradient() -> None:
    """``distill.kl_chunk`` and ``distill.activation_checkpointing`` recompute what they drop: the same loss
    and the same gradients as the plain step (a tiny Llama, two positions per KL chunk, odd-sized last chunk)."""
    from types import SimpleNamespace

    from minidisc_ray.losses import logit_loss
    from minidisc_ray.training import distill_loss_on_batch, memory_savers

    from .conftest import tiny_llama

    g = torch.Generator().manual_seed(1)
    s_logits = (torch.randn(3, 7, 40, generator=g) * 2).requires_grad_()
    t_logits = torch.randn(3, 7, 40, generator=g) * 2
    mask = torch.ones(3, 7)
    mask[2, 4:] = 0
    plain = logit_loss(s_logits, t_logits, 2.0, mask=mask)
    (grad_plain,) = torch.autograd.grad(plain, s_logits)
    chunked = logit_loss(s_logits, t_logits, 2.0, mask=mask, chunk=2)
    (grad_chunked,) = torch.autograd.grad(chunked, s_logits)
    assert torch.allclose(plain, chunked, atol=1e-6)
    assert torch.allclose(grad_plain, grad_chunked, atol=1e-7)

    teacher = tiny_llama(seed=0)
    batch = {"input_ids": torch.randint(1, 128, (2, 12), generator=g), "attention_mask": torch.ones(2, 12,
                                                                                                     dtype=torch.long)}
    grads = []
    for savers in (SimpleNamespace(activation_checkpointing=False, kl_chunk=0),
                   SimpleNamespace(activation_checkpointing=True, kl_chunk=5)):
        student = tiny_llama(seed=3).train()
        memory_savers(student, savers)
        loss = distill_loss_on_batch(student, teacher, batch, 1.0, kl_chunk=savers.kl_chunk)
        loss.backward()
        grads.append((float(loss.detach()),
                      {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert student.model.gradient_checkpointing
    assert abs(l0 - l1) < 1e-5
    assert g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-5) for n in g0)
