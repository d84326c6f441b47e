"""A student-side score of a candidate assistant: how the *student* the chain would cut from it responds to its
distillation signal, measured from the student's gradients on a few batches, with no student training.

The lambda-tradeoff judges a candidate by itself (its metric after a short recovery, and its size). What the
method wants is the student's quality after distillation through it, and recent work (GRACE, arXiv 2511.02833)
predicts a teacher's value for a given student from the distribution of the student's gradients under the
teacher's signal. Two statistics of those gradients are measured here, each from running sums (no per-batch
gradient is kept, so memory is two gradient-sized vectors on top of the student's own):

* ``alignment``: the cosine between the mean distillation gradient (the MiniDisc loss against the candidate)
  and the mean task gradient (the student's own loss on the gold labels). A signal that pushes the student
  where the labels do teaches it the task; one that pushes elsewhere teaches it to copy what the task does not
  need.
* ``stability``: ``||mean g||^2 / mean ||g||^2`` of the per-batch distillation gradients, in [0, 1]: 1 when
  every batch pulls the student the same way, near ``1 / batches`` when the pulls are noise (GRACE's stability
  idea, in the signal-to-noise form running sums allow).

For "no assistant" the source is the teacher and the student is cut from the teacher (direct KD). The report
states the capacity-gap prior beside the pick: the Law of Capacity Gap (arXiv 2311.07052) finds the best teacher
about 2.5x the student's parameters (:func:`capacity_gap_prior`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from minidisc_ray.engine import model_device, to_device
from minidisc_ray.training import distill_loss_on_batch

CAPACITY_GAP_RATIO = 2.5  # the best teacher's size over the student's (arXiv 2311.07052)


def _flat_grad(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def student_signal(source: nn.Module, student: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                   temperature: float = 1.0, regression: bool = False) -> dict[str, Any]:
    """``alignment`` and ``stability`` (module docstring) of ``student``'s gradients under ``source``'s distillation
    signal over ``batches`` (labelled rows; at least two batches), and the mean distillation loss. ``student``'s
    weights are not changed; its gradients are left cleared."""
    device = model_device(student)
    source.eval()
    was_training = student.training
    student.eval()  # dropout off: the statistics are of the teacher's signal, not of dropout's noise
    params = [p for p in student.parameters() if p.requires_grad]
    kd_sum: torch.Tensor | None = None
    task_sum: torch.Tensor | None = None
    sq_norms, losses, n = 0.0, 0.0, 0
    t0 = time.perf_counter()
    try:
        for batch in batches:
            batch = to_device(batch, device)
            student.zero_grad(set_to_none=True)
            loss = distill_loss_on_batch(student, source, batch, temperature, regression)
            loss.backward()
            g = _flat_grad(params)
            kd_sum = g if kd_sum is None else kd_sum.add_(g)
            sq_norms += float(g.dot(g))
            losses += float(loss.detach())
            student.zero_grad(set_to_none=True)
            inputs = {k: v for k, v in batch.items() if k != "row_id"}
            student(**inputs).loss.backward()
            t = _flat_grad(params)
            task_sum = t if task_sum is None else task_sum.add_(t)
            n += 1
    finally:
        student.zero_grad(set_to_none=True)
        student.train(was_training)
    if n < 2 or kd_sum is None or task_sum is None:
        raise ValueError(f"student_signal needs at least 2 batches, got {n}")
    mean_sq = float(kd_sum.dot(kd_sum)) / n ** 2
    alignment = float(torch.nn.functional.cosine_similarity(kd_sum, task_sum, dim=0))
    return {"alignment": alignment, "stability": mean_sq / max(sq_norms / n, 1e-30), "kd_loss": losses / n,
            "batches": n, "seconds": round(time.perf_counter() - t0, 2)}


def capacity_gap_prior(student_params: int, candidates: dict[float, int]) -> dict[str, Any]:
    """The candidate (sparsity -> parameters) nearest, in log size, to :data:`CAPACITY_GAP_RATIO` x the student's
    parameters: a prior the report states beside the pick, not a selector."""
    import math

    target = CAPACITY_GAP_RATIO * student_params
    best = min(candidates, key=lambda s: (abs(math.log(candidates[s] / target)), s))
    return {"ratio": CAPACITY_GAP_RATIO, "target_params": int(target), "sparsity": best,
            "params": candidates[best], "source": "Law of Capacity Gap, arXiv 2311.07052"}

