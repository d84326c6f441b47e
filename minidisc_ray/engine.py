"""The one training loop every stage runs on (plain torch, no Ray).

Fine-tuning the teacher, recovering a candidate, the sandwich trial, the three chain stages and the
direct-KD baseline all call :class:`Loop`: they differ only in their loss function, their budget and
what they do after an evaluation (keep the best weights, write a checkpoint, report to Ray). Ray Tune
and Ray Train wrap it in a few lines (``search/trial.py``, ``chain/stage_loop.py``).

What the loop owns:

* **device**: every batch goes to the model's device; evaluation too (:func:`evaluate`);
* **precision**: bf16 autocast on CUDA (weights and optimiser stay fp32), fp32 on CPU;
* **optimisation**: AdamW without decay on biases and norms, linear warm-up then linear decay,
  gradient accumulation over ``grad_accum`` micro-batches (DDP/FSDP synchronise only on the last),
  gradient clipping;
* **evaluation and stopping**: every ``eval_every`` steps and at the end; ``patience`` evaluations
  without improvement stop the run; the best weights are kept (on the CPU) when asked;
* **resumption**: :class:`LoopState` is plain JSON; a loop built with a restored state, optimiser and
  scheduler continues from the step it names.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from minidisc_ray.metrics import LM_METRIC, lm_metrics, task_metrics

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class LoopSpec:
    """Budget and optimisation of one run of the loop."""

    steps: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    eval_every: int | None = None
    patience: int | None = None
    keep_best: bool = False
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16


@dataclass
class LoopState:
    """Where a run stands; JSON-serialisable so checkpoints need no pickle."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        known = {k: data[k] for k in ("step", "best_metric", "best_step", "bad_evals", "stopped", "history")
                 if k in data}
        return cls(**known)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a model without tensors."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of ``batch`` to ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def scan_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_samples: int | None,
          handles: list[Any], step: Callable[[dict[str, torch.Tensor]], None]) -> int:
    """Run ``step`` on batches (moved to the model's device, model in eval mode) until ``max_samples`` rows;
    then remove the hooks ``handles`` and restore the model's mode. Returns the rows seen."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            step(to_device(batch, device))
            seen += int(batch["input_ids"].shape[0])
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); nothing elsewhere (CPU stays fp32)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and norms) with linear warm-up then linear decay to zero."""
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


def evaluate(model: nn.Module, loader: DataLoader, metric: str) -> dict[str, float]:
    """Task metrics of ``model`` on ``loader`` (eval mode, on the model's device; the mode is restored)."""
    return evaluate_rows(model, loader, metric)[0]


@torch.no_grad()
def evaluate_rows(model: nn.Module, loader: DataLoader, metric: str) -> tuple[dict[str, float], np.ndarray | None]:
    """:func:`evaluate`, and for ``accuracy`` whether each row (in the loader's order) was predicted right (0/1),
    so that two models evaluated on the same rows can be compared pairwise; None for other metrics."""
    if metric == LM_METRIC:
        return _evaluate_lm(model, loader), None
    was = model.training
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    with autocast_for(device):
        for batch in loader:
            batch = to_device(batch, device)
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits.append(out.logits.float().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    model.train(was)
    all_logits, all_labels = np.concatenate(logits), np.concatenate(labels)
    correct = (all_logits.argmax(axis=-1) == all_labels).astype(np.int8) if metric == "accuracy" else None
    return task_metrics(all_logits, all_labels, metric), correct


@torch.no_grad()
def _evaluate_lm(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Next-token NLL summed over every labelled position (labels -100 are skipped), then perplexity."""
    was = model.training
    model.eval()
    device = model_device(model)
    nll, tokens, vocab = 0.0, 0, 0
    with autocast_for(device):
        for batch in loader:
            batch = to_device(batch, device)
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            logits = out.logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            vocab = logits.shape[-1]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            tokens += int((target != -100).sum())
    model.train(was)
    return lm_metrics(nll, tokens, max(vocab, 2))


def task_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own task loss (fine-tuning)."""
    loss: torch.Tensor = model(**batch).loss
    return loss


class Loop:
    """One training run: ``model`` optimised on ``loss_fn`` for ``spec.steps`` steps.

    Args:
        model: what is trained (possibly DDP- or FSDP-wrapped; ``core`` is the unwrapped module used for
            evaluation and the best weights).
        spec: budget and optimisation.
        loss_fn: ``(model, batch) -> scalar loss`` on a batch already on the model's device.
        evaluate_fn: ``core -> metrics dict with "metric"`` (higher is better); needed for ``eval_every``.
        core: the unwrapped model (default ``model``).
        state, optimizer, scheduler: a restored run to continue (default: a fresh one).
        best_state: the best weights so far of a restored run.

    Example:
        >>> loop = Loop(student, LoopSpec(steps=100, lr=1e-4), lambda m, b: kd_loss(m, teacher, b))
        >>> state = loop.run(batches)
    """

    def __init__(self, model: nn.Module, spec: LoopSpec, loss_fn: LossFn,
                 evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None, core: nn.Module | None = None,
                 state: LoopState | None = None, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, best_state: dict[str, torch.Tensor] | None = None) -> None:
        if spec.eval_every is not None and evaluate_fn is None:
            raise ValueError("eval_every needs an evaluate_fn")
        self.model, self.spec, self.loss_fn, self.evaluate_fn = model, spec, loss_fn, evaluate_fn
        self.core = core if core is not None else model
        if optimizer is None:
            optimizer, scheduler = make_optimizer(model, spec.lr, spec.weight_decay,
                                                  int(spec.warmup_ratio * spec.steps), spec.steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.state = state or LoopState()
        self.best_state = best_state
        self.device = model_device(self.core)
        self.mean_loss = float("nan")  # mean loss since the last evaluation (the whole run without one)
        self.train_seconds = 0.0  # wall time inside optimiser steps (no evaluation, checkpoint or report)
        self.first_step_seconds = 0.0  # the first step of this run (lazy initialisation lands there)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        no_sync = getattr(self.model, "no_sync", None)  # DDP: all-reduce only on the last micro-batch
        if not last and no_sync is not None:
            return no_sync()  # type: ignore[no-any-return]
        return contextlib.nullcontext()

    def step(self, batches: Iterator[Batch]) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss."""
        accum = max(1, self.spec.grad_accum)
        total = 0.0
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        for i in range(accum):
            last = i == accum - 1
            if set_sync is not None:
                set_sync(last)
            batch = to_device(next(batches), self.device)
            with self._sync_context(last), autocast_for(self.device, self.spec.precision):
                loss = self.loss_fn(self.model, batch) / accum
            loss.backward()
            total += float(loss.detach())
        if self.spec.clip_norm is not None:
            # zero-size weights (a fully pruned block) add nothing to the norm; under FSDP they are the
            # only unsharded tensors, which the norm's reduction cannot mix with sharded ones
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.numel()], self.spec.clip_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total

    def _evaluate(self, running: float, seen: int, t0: float) -> dict[str, Any]:
        assert self.evaluate_fn is not None
        metrics = self.evaluate_fn(self.core)
        st = self.state
        if metrics["metric"] > st.best_metric:
            st.best_metric, st.best_step, st.bad_evals = float(metrics["metric"]), st.step, 0
            if self.spec.keep_best:
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.core.state_dict().items()}
        else:
            st.bad_evals += 1
        if self.spec.patience is not None and st.bad_evals >= self.spec.patience:
            st.stopped = True
        entry = {"step": st.step, "loss": running / max(1, seen), **metrics, "best_metric": st.best_metric,
                 "seconds": time.perf_counter() - t0, "train_seconds": self.train_seconds,
                 "first_step_seconds": self.first_step_seconds}
        st.history.append(entry)
        return entry

    def run(self, batches: Iterator[Batch], on_eval: Callable[[Loop, dict[str, Any]], None] | None = None,
            on_step: Callable[[Loop, float], None] | None = None) -> LoopState:
        """Train until ``spec.steps`` (or early stop); ``on_eval`` runs after every evaluation."""
        self.model.train()
        running, seen = 0.0, 0
        t0 = time.perf_counter()
        st = self.state
        while st.step < self.spec.steps and not st.stopped:
            t_step = time.perf_counter()
            loss = self.step(batches)
            took = time.perf_counter() - t_step
            self.train_seconds += took
            if not self.first_step_seconds:
                self.first_step_seconds = took
            running += loss
            seen += 1
            if on_step is not None:
                on_step(self, loss)
            every = self.spec.eval_every
            if every is not None and (st.step % every == 0 or st.step == self.spec.steps):
                entry = self._evaluate(running, seen, t0)
                running, seen = 0.0, 0
                if st.step == self.spec.steps:
                    st.stopped = True
                if on_eval is not None:
                    on_eval(self, entry)
        if st.step >= self.spec.steps:
            st.stopped = True
        self.mean_loss = running / max(1, seen)
        self.model.eval()
        return st
