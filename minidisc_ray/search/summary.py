"""The search summary (``search.json``): the part every strategy writes alike (:func:`summary_head`) and the
summary of a trial-distillation strategy (:func:`trial_distillation_summary`), shaped like the lambda ones'."""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

from minidisc_ray.logs import log
from minidisc_ray.pipeline import Prepared
from minidisc_ray.records import read_jsonl


def summary_head(prep: Prepared, strategy: str) -> dict[str, Any]:
    """What the search was asked: strategy, tradeoff, grid, student, metric and the teacher it started from."""
    cfg = prep.cfg
    return {
        "strategy": strategy, "lam": cfg.pruning.lam, "tradeoff_form": cfg.pruning.tradeoff,
        "grid": sorted(cfg.pruning.grid), "student_sparsity": cfg.pruning.student_sparsity,
        "metric_name": prep.task.metric,
        "teacher": {"sparsity": 0.0, "params": prep.total, "prunable": prep.prunable,
                    "metric": prep.teacher_metrics["metric"], "path": prep.teacher_dir},
    }


def trials_started_again(events_path: str | None, since: float, what: str) -> int:
    """How many trials of this experiment (those that started at ``since`` or later) Tune started again after a
    failure (a lost node or worker; ``tune.FailureConfig`` retries a trial under its own id), from the search's
    event log; logged when any was."""
    starts = Counter(str(e["trial_id"]) for e in (read_jsonl(events_path) if events_path else [])
                     if e.get("event") == "start" and e.get("trial_id") and float(e.get("time", 0.0)) >= since)
    again = sum(n - 1 for n in starts.values())
    if again:
        log(f"[{what}] {again} trial(s) ran again after a failure (a lost node or worker): their work was redone")
    return again


def cluster_resources() -> dict[str, float]:
    """The CPUs, GPUs and memory of the Ray cluster the search ran on."""
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}


def trial_distillation_summary(prep: Prepared, strategy: str, h: dict[str, Any], *, evaluations: int, reused: int,
                               failed: int, seconds: float, cpu_seconds: float, cpu_seconds_spent: float,
                               experiment_path: str) -> dict[str, Any]:
    """``search.json`` of a trial-distillation strategy (halving, auto's round, optuna-kd): its round ``h``
    under ``halving``, no candidate rows."""
    return {
        **summary_head(prep, strategy),
        "candidates": [], "chosen_sparsity": h["chosen_sparsity"], "chosen": None, "halving": h,
        "evaluations": evaluations, "reused": reused, "failed": failed, "candidates_scored": 0,
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
        "cpu_seconds_spent": round(cpu_seconds_spent, 2), "nodes": [], "experiment_path": experiment_path,
        "resources": cluster_resources(),
    }
