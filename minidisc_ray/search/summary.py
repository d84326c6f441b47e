"""The search summary (``search.json``): the part every strategy writes alike (:func:`summary_head`) and the
summary of a trial-distillation strategy (:func:`trial_distillation_summary`), shaped like the lambda ones'."""

from __future__ import annotations

from typing import Any

import ray

from minidisc_ray.pipeline import Prepared


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
