"""``bisection``: :class:`SandwichBisectionSearcher` over the sorted grid, the paper's search (and the first half of
``auto``, the default)."""

from __future__ import annotations

from typing import Any

from minidisc_ray.strategies.base import Machinery, ReplaySettings, Strategy, TuneParts, register, replay_cost


@register
class Bisection(Strategy):
    name = "bisection"

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        searcher = kit.bisection_searcher(sorted(cfg.pruning.grid), metric="tradeoff", mode="max",
                                             points_per_round=cfg.search.points_per_round, sweep=cfg.search.sweep)
        return TuneParts(kit.candidate_trial, searcher, {}, -1)

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        order, pick = settings.bisection(curve)
        return {"pick": pick, "evaluated": len(set(order)), "cpu": replay_cost(rec, order, pick)}
