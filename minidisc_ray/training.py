"""Training recipes on the one loop of :mod:`minidisc_ray.engine`: fine-tuning and distillation.

No Ray here: the Tune trainable and the Ray Train loop call these functions, and unit tests call them
directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from minidisc_ray.axes import teacher_states_for
from minidisc_ray.config import DistillConfig
from minidisc_ray.engine import Loop, LoopSpec, evaluate, make_optimizer, task_loss
from minidisc_ray.families import get_adaptor
from minidisc_ray.losses import hidden_layer_indices, minidisc_loss

Log = Callable[[str], None]

__all__ = ["distill", "distill_loss_on_batch", "distill_stage", "evaluate", "finetune", "forward_latency_ms",
           "kd_loss_fn", "make_optimizer", "memory_savers"]


def finetune(model: nn.Module, train_iter: Iterator[dict[str, torch.Tensor]], dev_loader: DataLoader,
             metric: str, steps: int, lr: float, warmup_ratio: float, weight_decay: float,
             eval_every: int, log: Log = print) -> dict[str, Any]:
    """Fine-tune ``model`` on its task loss; keep the weights of the best dev evaluation."""
    spec = LoopSpec(steps=steps, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                    eval_every=eval_every, keep_best=True)
    loop = Loop(model, spec, task_loss, evaluate_fn=lambda m: evaluate(m, dev_loader, metric))
    start = time.perf_counter()

    def report(_: Loop, e: dict[str, Any]) -> None:
        log(f"[finetune] step {e['step']}/{steps} loss {e['loss']:.4f} dev {metric} {e['metric']:.4f} "
            f"({time.perf_counter() - start:.0f}s)")

    state = loop.run(train_iter, on_eval=report)
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    model.eval()
    best_entry = next(e for e in state.history if e["step"] == state.best_step)
    best = {"step": state.best_step, **{k: v for k, v in best_entry.items()
                                        if k not in ("step", "loss", "best_metric", "seconds")}}
    history = [{k: v for k, v in e.items() if k not in ("best_metric", "seconds")} for e in state.history]
    return {"best": best, "history": history, "seconds": time.perf_counter() - start}


def memory_savers(student: nn.Module, dc: DistillConfig) -> None:
    """``distill.activation_checkpointing``: transformers' gradient checkpointing of every layer (non-reentrant,
    so it composes with FSDP2 and the loop's ``no_sync``). The chunked KL is passed to the loss."""
    if getattr(dc, "activation_checkpointing", False):
        enable = getattr(student, "gradient_checkpointing_enable", None)
        if enable is None:
            raise TypeError(f"{type(student).__name__} has no gradient checkpointing")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def distill_loss_on_batch(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor],
                          temperature: float = 1.0, regression: bool = False,
                          hard_label_weight: float = 0.0, kl_chunk: int = 0) -> torch.Tensor:
    """MiniDisc loss of ``student`` against ``teacher`` (teacher run without gradients) on one batch (a
    ``row_id`` column, which rows keyed for offline targets carry, is not a model input)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_id")}
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    # keep only the teacher's hidden states the loss matches (every L/6-th layer of the student, at the teacher
    # layers and channels a hidden or depth cut kept), not all L + 1, while the student runs forward and backward
    layers = len(get_adaptor(getattr(student, "module", student)).layers(getattr(student, "module", student)))
    t_logits = t_out.logits
    t_hidden = teacher_states_for(student, t_out.hidden_states, hidden_layer_indices(layers))
    t_hidden += [None] * (layers + 1 - len(t_hidden))
    del t_out
    s_out = student(**inputs, output_hidden_states=True)
    return minidisc_loss(s_out.logits, t_logits, s_out.hidden_states, t_hidden,  # type: ignore[arg-type]
                         batch["attention_mask"], temperature, regression, batch.get("labels"),
                         hard_label_weight, kl_chunk)


def kd_loss_fn(teacher: nn.Module, temperature: float = 1.0, regression: bool = False,
               hard_label_weight: float = 0.0, kl_chunk: int = 0
               ) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """The loop's loss function for distilling from ``teacher`` (frozen, in eval mode)."""
    teacher.eval()

    def loss(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distill_loss_on_batch(student, teacher, batch, temperature, regression, hard_label_weight, kl_chunk)

    return loss


def distill(student: nn.Module, teacher: nn.Module, train_iter: Iterator[dict[str, torch.Tensor]],
            steps: int, lr: float, temperature: float = 1.0, regression: bool = False,
            hard_label_weight: float = 0.0, warmup_ratio: float = 0.1, weight_decay: float = 0.01,
            loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None) -> float:
    """Recover ``student`` by ``steps`` steps of distillation from ``teacher`` (or on ``loss_fn``, e.g. the
    offline teacher's stored targets); returns the mean loss."""
    spec = LoopSpec(steps=steps, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
    loop = Loop(student, spec, loss_fn or kd_loss_fn(teacher, temperature, regression, hard_label_weight))
    loop.run(train_iter)
    return loop.mean_loss


def distill_stage(student: nn.Module, teacher: nn.Module, train_iter: Iterator[dict[str, torch.Tensor]],
                  dev_loader: DataLoader, metric: str, regression: bool, dc: DistillConfig) -> dict[str, Any]:
    """One chain stage in this process, with the recipe ``minidisc run`` gives a Ray Train stage (``dc`` a
    ``DistillConfig``: steps, warm-up and decay, evaluation every ``eval_every``, early stop after
    ``patience``); ``student`` ends with the best evaluation's weights. Returns its dev metric, the best
    step and the steps run."""
    spec = LoopSpec(steps=dc.steps, lr=dc.lr, weight_decay=dc.weight_decay, warmup_ratio=dc.warmup_ratio,
                    grad_accum=dc.grad_accum, eval_every=dc.eval_every, patience=dc.patience, keep_best=True)
    memory_savers(student, dc)
    loop = Loop(student, spec, kd_loss_fn(teacher, dc.temperature, regression, dc.hard_label_weight,
                                          getattr(dc, "kl_chunk", 0)),
                evaluate_fn=lambda m: evaluate(m, dev_loader, metric))
    state = loop.run(train_iter)
    if loop.best_state is not None:
        student.load_state_dict(loop.best_state)
    student.eval()
    curve = [[int(e["step"]), float(e["metric"])] for e in state.history if "metric" in e]
    return {"metric": float(state.best_metric), "best_step": state.best_step, "steps_run": state.step,
            "curve": curve}


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median wall time of one forward pass on ``batch`` in milliseconds (after one warm-up pass)."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model(**inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))
