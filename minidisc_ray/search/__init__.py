"""Teacher-assistant search on Ray Tune: the sandwich-bisection searcher, the candidate trial, strategies."""

from __future__ import annotations

from minidisc_ray.search.searcher import SandwichBisectionSearcher
from minidisc_ray.tradeoff import best_index

__all__ = ["SandwichBisectionSearcher", "best_index"]
