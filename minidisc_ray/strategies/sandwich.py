"""``sandwich``: one trial trains every width of the grid at once with shared weights (the sandwich rule)
and scores them all."""

from __future__ import annotations

from typing import Any

from minidisc_ray.strategies.base import Machinery, ReplaySettings, Strategy, TuneParts, register
from minidisc_ray.tradeoff import best_index


@register
class Sandwich(Strategy):
    name = "sandwich"
    one_trial = True
    offline_teacher = False  # one trial holds the teacher whole
    sharded_trials = False
    multi_worker_trials = False

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        return TuneParts(kit.sandwich_trial, None, {"grid": sorted(cfg.pruning.grid)}, 1)

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        if rec.sandwich is None:
            return None
        scored = [settings.scorer(m, a) for m, a in zip(rec.sandwich, rec.actual, strict=True)]
        pick = best_index(scored) or 0
        return {"pick": pick, "evaluated": 1, "cpu": rec.sandwich_cpu + rec.chain_cpu[pick]}
