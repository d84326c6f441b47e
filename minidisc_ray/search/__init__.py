"""Teacher-assistant search on Ray Tune: the sandwich-bisection searcher, the candidate trial, strategies."""

from __future__ import annotations

from minidisc_ray.search.searcher import SandwichBisectionSearcher, best_index

__all__ = ["SandwichBisectionSearcher", "best_index"]
