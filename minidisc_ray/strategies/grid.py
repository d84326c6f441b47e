"""``grid``: every candidate on the lambda-tradeoff (the ground truth of the proxy)."""

from __future__ import annotations

from typing import Any

from minidisc_ray.strategies.base import Machinery, ReplaySettings, Strategy, TuneParts, register, replay_cost
from minidisc_ray.tradeoff import best_index


@register
class Grid(Strategy):
    name = "grid"
    exhaustive = False

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        from ray import tune  # deferred: Ray Tune, see minidisc_ray.strategies

        space: dict[str, Any] = {"sparsity": tune.grid_search(sorted(cfg.pruning.grid))}
        if self.exhaustive:
            space["exhaustive"] = True
        return TuneParts(kit.candidate_trial, None, space, 1)

    def expected_trials(self, cfg: Any, parts: TuneParts) -> int | None:
        return len(cfg.pruning.grid)

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        pick = best_index(curve)
        assert pick is not None
        everything = list(range(len(curve)))
        return {"pick": pick, "evaluated": len(curve), "cpu": replay_cost(rec, everything, pick)}
