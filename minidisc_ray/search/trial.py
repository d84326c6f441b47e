"""The candidate trial: one Ray Tune trial = one teacher-assistant candidate.

The teacher, its importance scores and the tokenised data travel in one :class:`SearchPayload` that
``tune.with_parameters`` puts into the Ray object store once per search; no trial reloads anything
from disk. A trial slices its candidate out of the teacher, recovers it by distillation from the
teacher for ``recovery.steps`` steps, scores it on dev and reports metric, sparsity, parameters,
lambda-tradeoff and seconds spent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from torch import nn
from transformers import PreTrainedTokenizerBase

from minidisc_ray.config import RecoveryConfig
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.families import count_params
from minidisc_ray.modelio import model_from_blob
from minidisc_ray.pruning import Importance, PruningPlan, plan_for_sparsity, prune_model, sliced
from minidisc_ray.records import digest
from minidisc_ray.tradeoff import lambda_tradeoff
from minidisc_ray.training import distill, distill_loss_on_batch, evaluate, make_optimizer


@dataclass
class SearchPayload:
    """What every trial of one search shares (put into the object store once)."""

    teacher_blob: dict[str, Any]
    tokenizer: PreTrainedTokenizerBase
    importance: Importance
    train_table: pa.Table
    dev_table: pa.Table
    metric: str
    regression: bool
    teacher_prunable: int
    teacher_units: tuple[int, int]
    lam: float
    recovery: RecoveryConfig
    student_sparsity: float
    seed: int
    events_path: str | None = None
    context_key: str = ""  # identity of teacher, data, importance sample and seed (see records.py)
    finished: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # evaluation key -> result

    def evaluation_key(self, kind: str, sparsity: float | list[float]) -> str:
        """Key of one evaluation: everything that determines its result (lambda is applied afterwards)."""
        extra = self.student_sparsity if kind == "exhaustive" else None
        return digest(self.context_key, kind, sparsity, self.recovery, extra)

    def teacher(self) -> nn.Module:
        """The teacher, rebuilt from the object-store blob (weights shared by every trial's copy)."""
        return model_from_blob(self.teacher_blob)

    def dataset(self, which: str) -> datasets.Dataset:
        table = self.train_table if which == "train" else self.dev_table
        return datasets.Dataset(InMemoryTable(table)).with_format("torch")


def _event(payload: SearchPayload, **fields: Any) -> None:
    """Append a line to the search's event log (when its directory is visible from this node)."""
    if payload.events_path and Path(payload.events_path).parent.is_dir():
        with open(payload.events_path, "a") as fh:
            fh.write(json.dumps({**fields, "pid": os.getpid(), "time": time.time()}) + "\n")


def _node() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())[:12]
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def _threads() -> None:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
    except Exception:  # noqa: BLE001 - outside Ray keep torch's default
        pass


def score_candidate(payload: SearchPayload, sparsity: float, exhaustive: bool = False) -> dict[str, Any]:
    """Prune, recover and score one candidate (plain torch; the trial wraps it with Ray reporting).

    With ``exhaustive`` the candidate is used as a TA: a student at ``payload.student_sparsity`` is
    pruned from it and distilled through it with the same budget, and ``student_metric`` is added.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(payload.seed)
    rec = payload.recovery
    teacher = payload.teacher()
    plan = plan_for_sparsity(payload.importance, sparsity)
    candidate = prune_model(teacher, plan)
    train, dev = payload.dataset("train"), payload.dataset("dev")
    data = infinite(make_loader(train, payload.tokenizer, rec.batch_size, shuffle=True, seed=payload.seed))
    loss = distill(candidate, teacher, data, rec.steps, rec.lr, rec.temperature, payload.regression,
                   rec.hard_label_weight)
    dev_loader = make_loader(dev, payload.tokenizer, 64)
    metrics = evaluate(candidate, dev_loader, payload.metric)
    prunable, total = count_params(candidate)
    actual = 1.0 - prunable / payload.teacher_prunable
    out = {"sparsity": float(sparsity), "actual_sparsity": actual, "metric": metrics["metric"],
           "tradeoff": lambda_tradeoff(metrics["metric"], actual, payload.lam), "prunable": prunable,
           "params": total, "recovery_loss": loss}
    if exhaustive:
        from minidisc_ray.pruning import compute_importance

        sample = make_loader(train.select(range(min(256, len(train)))), payload.tokenizer, 32)
        student_plan = plan_for_sparsity(compute_importance(candidate, sample), payload.student_sparsity,
                                         base_units=payload.teacher_units)
        student = prune_model(candidate, student_plan)
        distill(student, candidate, data, rec.steps, rec.lr, rec.temperature, payload.regression,
                rec.hard_label_weight)
        out["student_metric"] = evaluate(student, dev_loader, payload.metric)["metric"]
        out["student_params"] = count_params(student)[1]
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    return out


def _reuse(payload: SearchPayload, key: str, **event: Any) -> dict[str, Any] | None:
    """A finished evaluation's recorded result, re-scored with this search's lambda (None: not recorded)."""
    done = payload.finished.get(key)
    if done is None:
        return None
    _event(payload, event="reused", **event)
    result = {**done, "reused": True, "eval_key": key, "node": _node(), "finished_at": time.time()}
    if "actual_sparsity" in result and "metric" in result:
        result["tradeoff"] = lambda_tradeoff(result["metric"], result["actual_sparsity"], payload.lam)
    return result


def candidate_trial(config: dict[str, Any], payload: SearchPayload) -> None:
    """Ray Tune function trainable for one TA candidate (``config["sparsity"]``)."""
    from ray import tune

    _threads()
    s = float(config["sparsity"])
    exhaustive = bool(config.get("exhaustive", False))
    key = payload.evaluation_key("exhaustive" if exhaustive else "candidate", s)
    trial_id = tune.get_context().get_trial_id()
    reused = _reuse(payload, key, sparsity=s, trial_id=trial_id)
    if reused is not None:
        tune.report(reused)
        return
    _event(payload, event="start", sparsity=s, trial_id=trial_id)
    if os.environ.get("MINIDISC_TEST_FAIL_TRIALS"):  # fault injection for the tests of failure handling
        raise RuntimeError("injected trial failure (MINIDISC_TEST_FAIL_TRIALS is set)")
    result = score_candidate(payload, s, exhaustive=exhaustive)
    result.update(node=_node(), finished_at=time.time(), eval_key=key)
    if exhaustive:  # its candidate half is exactly the candidate trial's evaluation: record it for that too
        result["candidate_key"] = payload.evaluation_key("candidate", s)
    _event(payload, event="finish", sparsity=s, trial_id=trial_id)
    tune.report(result)


def sandwich_trial(config: dict[str, Any], payload: SearchPayload) -> None:
    """The reference code's one-trial schedule: train every candidate width with shared weights.

    The teacher is reordered by importance (so every candidate is a prefix), copied into one shared
    student; every batch runs the teacher once and the student at each candidate width (a slimmable
    forward on slices of the shared weights, so a width costs what its candidate costs), the losses
    are averaged and one optimiser step is taken. Every candidate is then cut out and scored.
    """
    from ray import tune

    _threads()
    grid = sorted(float(s) for s in config["grid"])
    key = payload.evaluation_key("sandwich", grid)
    reused = _reuse(payload, key, sparsity=None, trial_id=tune.get_context().get_trial_id())
    if reused is not None:
        cands = json.loads(reused["candidates"])
        for c in cands:
            c["tradeoff"] = lambda_tradeoff(c["metric"], c["actual_sparsity"], payload.lam)
        best = max(cands, key=lambda c: (c["tradeoff"], c["sparsity"]))
        tune.report({**reused, "candidates": json.dumps(cands), "tradeoff": best["tradeoff"],
                     "sparsity": best["sparsity"]})
        return
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(payload.seed)
    rec = payload.recovery
    teacher = payload.teacher()
    order = plan_for_sparsity(payload.importance, 0.0)  # keep everything, reordered by importance
    shared = prune_model(teacher, order)
    plans = {s: plan_for_sparsity(payload.importance, s) for s in grid}
    prefixes = {s: PruningPlan.prefix(p.heads_per_layer, p.neurons_per_layer, s) for s, p in plans.items()}
    train, dev = payload.dataset("train"), payload.dataset("dev")
    data = infinite(make_loader(train, payload.tokenizer, rec.batch_size, shuffle=True, seed=payload.seed))
    steps = rec.steps  # every step trains all K widths: the candidate-steps of K separate trials
    opt, sched = make_optimizer(shared, rec.lr, 0.01, int(0.1 * steps), steps)
    shared.train()
    for _ in range(steps):
        batch = next(data)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        total = 0.0
        for s in grid:
            with sliced(shared, prefixes[s].heads_per_layer, prefixes[s].neurons_per_layer):
                loss = distill_loss_on_batch(shared, _Cached(t_out), batch, rec.temperature, payload.regression,
                                             rec.hard_label_weight) / len(grid)
                loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(shared.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    dev_loader = make_loader(dev, payload.tokenizer, 64)
    candidates = []
    for s in grid:
        cand = prune_model(shared, prefixes[s])
        m = evaluate(cand, dev_loader, payload.metric)["metric"]
        prunable, total_params = count_params(cand)
        actual = 1.0 - prunable / payload.teacher_prunable
        candidates.append({"sparsity": s, "actual_sparsity": actual, "metric": m, "prunable": prunable,
                           "params": total_params, "tradeoff": lambda_tradeoff(m, actual, payload.lam)})
    best = max(candidates, key=lambda c: (c["tradeoff"], c["sparsity"]))
    tune.report({"candidates": json.dumps(candidates), "tradeoff": best["tradeoff"], "sparsity": best["sparsity"],
                 "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "node": _node(),
                 "finished_at": time.time(), "eval_key": key, "metric": best["metric"]})


class _Cached(nn.Module):
    """A stand-in teacher that returns an output computed once for the batch."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out
