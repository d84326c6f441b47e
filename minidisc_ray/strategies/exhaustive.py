"""``exhaustive``: trial distillation through every candidate, chosen on the student's dev metric (the ground
truth the cheaper strategies are measured against)."""

from __future__ import annotations

from typing import Any

from minidisc_ray.strategies.base import ReplaySettings, register
from minidisc_ray.strategies.grid import Grid
from minidisc_ray.tradeoff import best_index


@register
class Exhaustive(Grid):
    name = "exhaustive"
    objective = "student_metric"
    exhaustive = True
    offline_teacher = False  # trial distillation runs the online teacher
    sharded_trials = False
    multi_worker_trials = False
    needs_tradeoff = False  # chosen on the student's metric

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:

        return {"pick": best_index(rec.student) or 0, "evaluated": len(curve), "cpu": float(sum(rec.chain_cpu))}
