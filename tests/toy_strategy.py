"""A toy search strategy in one file, as a user would write one: ``ends`` scores only the two ends of the grid
(the densest and the sparsest candidate) on the lambda-tradeoff and keeps the better. Nothing else in the
package names it; importing this module registers it."""

from __future__ import annotations

from typing import Any

from minidisc_ray.strategies import Machinery, ReplaySettings, Strategy, TuneParts, register, replay_cost
from minidisc_ray.tradeoff import best_index


@register
class Ends(Strategy):
    name = "toy-ends"
    offline_teacher = False  # declared: the config refuses it with an offline teacher
    multi_worker_trials = False

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        from ray import tune

        grid = sorted(cfg.pruning.grid)
        return TuneParts(kit.candidate_trial, None, {"sparsity": tune.grid_search([grid[0], grid[-1]])}, 1)

    def expected_trials(self, cfg: Any, parts: TuneParts) -> int | None:
        return 2

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        ends = [0, len(curve) - 1]
        pick = ends[best_index([curve[i] for i in ends]) or 0]
        return {"pick": pick, "evaluated": 2, "cpu": replay_cost(rec, ends, pick)}
