"""The lambda-tradeoff that ranks teacher-assistant candidates (MiniDisc, arXiv 2205.14570, Sec. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def lambda_tradeoff(metric: float, sparsity: float, lam: float = 0.2) -> float:
    """Scale-performance tradeoff ``metric + lam * sparsity``.

    Equivalent to ``metric - lam * scale`` with ``scale = 1 - sparsity`` up to the constant ``lam``.
    A higher value is a better teacher assistant. NaN in gives NaN out (a failed candidate).

    Args:
        metric: the candidate's task metric on dev, in [0, 1].
        sparsity: fraction of the teacher's prunable parameters the candidate removed, in [0, 1).
        lam: weight of sparsity against the metric (the paper's default is 0.2).
    """
    return Tradeoff(lam)(metric, sparsity)


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a non-negative number, got {lam!r}")


TRADEOFF_FORMS = ("paper", "retained")


def retained_skill(metric: float, teacher_metric: float, chance_metric: float) -> float:
    """The fraction of the teacher's above-chance skill a model keeps: ``(metric - chance) / (teacher - chance)``.

    1 = as good as the teacher, 0 = as good as always answering the majority class (0 correlation for
    regression, a uniform guess for language modelling). A teacher no better than chance leaves nothing
    to scale by: the metric's distance from chance is returned unscaled.
    """
    span = teacher_metric - chance_metric
    if not span > 1e-9:
        return float(metric) - float(chance_metric)
    return (float(metric) - float(chance_metric)) / span


@dataclass(frozen=True)
class Tradeoff:
    """How a candidate is scored: ``pruning.tradeoff`` with ``pruning.lam``.

    * ``paper``: ``metric + lam * sparsity`` (MiniDisc's form). How much metric one unit of sparsity is
      worth is fixed in the metric's own units, so the same lambda means more on a task whose candidates
      lose little accuracy (1.5 points from 0.5 to 0.9 sparsity is 0.015 against lam x 0.4 = 0.08)
      than on one whose candidates lose much.
    * ``retained``: ``retained_skill(metric) + lam * sparsity``: the metric in units of the teacher's
      above-chance skill, so lambda is the share of that skill one unit of sparsity is worth, whatever
      the task's accuracy scale (a 86% teacher over a 51% majority class turns 1.5 points into 0.043).
    """

    lam: float = 0.2
    form: str = "paper"
    teacher_metric: float = 1.0
    chance_metric: float = 0.0

    def __post_init__(self) -> None:  # lambda is checked here, once per scorer, not at every score
        _check_lam(self.lam)
        if self.form not in TRADEOFF_FORMS:
            raise ValueError(f"form must be one of {', '.join(TRADEOFF_FORMS)}, got {self.form!r}")

    def scaled(self, metric: float) -> float:
        """The metric term of the tradeoff."""
        if self.form == "retained" and not math.isnan(metric):
            return retained_skill(metric, self.teacher_metric, self.chance_metric)
        return float(metric)

    def __call__(self, metric: float, sparsity: float) -> float:
        """``scaled(metric) + lam * sparsity`` (``sparsity``: the parameter sparsity); NaN in gives NaN out."""
        scaled = self.scaled(metric)
        if math.isnan(scaled) or math.isnan(sparsity):
            return math.nan
        return scaled + float(self.lam) * float(sparsity)


def lambda_range(metrics: list[float], sparsities: list[float], target: int) -> list[float] | None:
    """[lo, hi] of lambda >= 0 for which ``metrics[i] + lam * sparsities[i]`` is largest at ``target``
    (ties to the sparser candidate, as the search breaks them); None when no lambda picks it. Exact: each
    candidate's tradeoff is a line in lambda, so the set where one line is on top is an interval."""
    lo, hi = 0.0, math.inf
    mt, st = metrics[target], sparsities[target]
    for i, (m, s) in enumerate(zip(metrics, sparsities, strict=True)):
        if i == target:
            continue
        if s == st:  # same size: only the metric decides (and a tie goes to the later entry)
            if m > mt or (m == mt and i > target):
                return None
            continue
        edge = (m - mt) / (st - s)  # the lambda where the two lines cross
        if s < st:  # a denser candidate: target wins for lambda >= edge
            lo = max(lo, edge)
        else:  # a sparser one: target wins for lambda < edge
            hi = min(hi, edge)
    return [lo, hi] if lo < hi or (lo == hi == 0.0) else None


def lambda_range_of_pick(search: dict[str, Any], scorer: Tradeoff) -> list[float] | None:
    """The lambdas for which a search's chosen assistant stays the argmax of the candidates it evaluated (how
    much the pick hangs on ``pruning.lam``; ``minidisc study`` tells whether the argmax is the best one)."""
    rows = [c for c in search["candidates"] if isinstance(c, dict)]
    evaluated = sorted((c for c in rows if not c.get("failed") and c.get("metric") is not None),
                       key=lambda c: c["sparsity"])
    chosen = [i for i, c in enumerate(evaluated) if c["sparsity"] == search["chosen_sparsity"]]
    if not chosen or len(evaluated) < 2:
        return None
    return lambda_range([scorer.scaled(c["metric"]) for c in evaluated],
                        [float(c.get("param_sparsity") or c["sparsity"]) for c in evaluated], chosen[-1])


def best_index(values: Sequence[float]) -> int | None:
    """Index of the largest finite value; ties go to the later (sparser) candidate. None if none."""
    best = None
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        if best is None or v >= values[best]:
            best = i
    return best
