"""Plain torch training pieces: optimiser and schedule, evaluation, fine-tuning, distillation steps.

No Ray here: the Tune trainable and the Ray Train loop call these functions, and unit tests call them
directly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from minidisc_ray.losses import minidisc_loss
from minidisc_ray.metrics import task_metrics

Log = Callable[[str], None]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and LayerNorm) with linear warm-up then linear decay to zero."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, metric: str) -> dict[str, float]:
    """Task metrics of ``model`` on ``loader`` (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits.append(out.logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was)
    return task_metrics(np.concatenate(logits), np.concatenate(labels), metric)


def finetune(model: nn.Module, train_iter: Iterator[dict[str, torch.Tensor]], dev_loader: DataLoader,
             metric: str, steps: int, lr: float, warmup_ratio: float, weight_decay: float,
             eval_every: int, log: Log = print) -> dict[str, Any]:
    """Fine-tune ``model`` on its task loss; keep the weights of the best dev evaluation."""
    opt, sched = make_optimizer(model, lr, weight_decay, int(warmup_ratio * steps), steps)
    model.train()
    best: dict[str, Any] = {"metric": -math.inf}
    best_state = None
    history = []
    start = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        batch = next(train_iter)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += float(loss.detach())
        if step % eval_every == 0 or step == steps:
            m = evaluate(model, dev_loader, metric)
            n = eval_every if step % eval_every == 0 else step % eval_every
            history.append({"step": step, "loss": running / n, **m})
            log(f"[finetune] step {step}/{steps} loss {running / n:.4f} dev {metric} {m['metric']:.4f} "
                f"({time.perf_counter() - start:.0f}s)")
            running = 0.0
            if m["metric"] > best["metric"]:
                best = {"step": step, **m}
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best": best, "history": history, "seconds": time.perf_counter() - start}


def distill_loss_on_batch(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor],
                          temperature: float = 1.0, regression: bool = False,
                          hard_label_weight: float = 0.0) -> torch.Tensor:
    """MiniDisc loss of ``student`` against ``teacher`` (teacher run without gradients) on one batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    s_out = student(**inputs, output_hidden_states=True)
    return minidisc_loss(s_out.logits, t_out.logits, s_out.hidden_states, t_out.hidden_states,
                         batch["attention_mask"], temperature, regression, batch.get("labels"),
                         hard_label_weight)


def distill(student: nn.Module, teacher: nn.Module, train_iter: Iterator[dict[str, torch.Tensor]],
            steps: int, lr: float, temperature: float = 1.0, regression: bool = False,
            hard_label_weight: float = 0.0, warmup_ratio: float = 0.1, weight_decay: float = 0.01) -> float:
    """Recover ``student`` by ``steps`` steps of distillation from ``teacher``; returns the mean loss."""
    opt, sched = make_optimizer(student, lr, weight_decay, int(warmup_ratio * steps), steps)
    teacher.eval()
    student.train()
    total = 0.0
    for _ in range(steps):
        loss = distill_loss_on_batch(student, teacher, next(train_iter), temperature, regression, hard_label_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total += float(loss.detach())
    student.eval()
    return total / max(1, steps)


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
