"""The lambda-tradeoff that ranks teacher-assistant candidates (MiniDisc, arXiv 2205.14570, Sec. 3)."""

from __future__ import annotations

import math


def lambda_tradeoff(metric: float, sparsity: float, lam: float = 0.2) -> float:
    """Scale-performance tradeoff ``metric + lam * sparsity``.

    Equivalent to ``metric - lam * scale`` with ``scale = 1 - sparsity`` up to the constant ``lam``.
    A higher value is a better teacher assistant. NaN in gives NaN out (a failed candidate).

    Args:
        metric: the candidate's task metric on dev, in [0, 1].
        sparsity: fraction of the teacher's prunable parameters the candidate removed, in [0, 1).
        lam: weight of sparsity against the metric (the paper's default is 0.2).
    """
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    if math.isnan(metric) or math.isnan(sparsity):
        return math.nan
    return float(metric) + float(lam) * float(sparsity)
