"""SandwichBisectionSearcher: find the lambda-tradeoff argmax on a sorted grid of TA sparsities.

The grid of candidate sparsities lies between the teacher (s = 0) and the student (target s); the
lambda-tradeoff over it is, in MiniDisc's observation, close to unimodal. The searcher keeps a
bracket on the sorted grid and narrows it by golden-section search (one new point per round, points
reused, Fibonacci-like placement) or, with ``points_per_round > 1``, by k-section that proposes
several points at once so that ``max_concurrent_trials`` workers stay busy. Failed trials, missing
results and NaN count as failures (worst possible value), never as crashes. If the evaluated points
show the curve is not unimodal, the searcher checks the neighbourhood of its answer and of every
other local peak before it finishes.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from minidisc_ray.tradeoff import best_index

FAILED = -math.inf
_GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...


def _check_mode(mode: str | None) -> None:
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode: got {mode!r}; use 'max' or 'min'")


class SandwichBisectionSearcher(Searcher):
    """Golden-section / k-section search for the best teacher assistant on a sorted sparsity grid.

    Args:
        grid: candidate sparsities (any order; they are sorted numerically and deduplicated).
        metric: result key to maximise (default ``"tradeoff"``, the lambda-tradeoff).
        mode: ``"max"`` or ``"min"``.
        points_per_round: new points proposed per round. 1 is sequential golden-section search (fewest
            evaluations); k > 1 keeps k workers busy at the cost of a few more evaluations.
        param: config key under which the sparsity is suggested.
        neighbourhood: radius (in grid steps) checked around the answer when the curve is not unimodal.
        sweep: after the bracket converges, spend what the unimodal bound ``ceil(log_1.618 K) + 2`` leaves
            on the middles of the largest unevaluated gaps, so a second peak in a region the bracket left
            is seen (real lambda curves are noisy). It makes the answer exact on every recorded real curve
            and its leave-one/two-out variants, at the cost of always spending the bound.

    Example:
        >>> from ray import tune
        >>> from minidisc_ray.search import SandwichBisectionSearcher
        >>> def trainable(config):
        ...     s = config["sparsity"]
        ...     tune.report({"tradeoff": 1.0 - (s - 0.7) ** 2})
        >>> searcher = SandwichBisectionSearcher([0.5, 0.6, 0.7, 0.8, 0.9], points_per_round=2)
        >>> tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        ...     search_alg=searcher, num_samples=-1, max_concurrent_trials=2))
        >>> best = tuner.fit().get_best_result(metric="tradeoff", mode="max")  # doctest: +SKIP
        >>> searcher.answer  # doctest: +SKIP
        0.7
    """

    def __init__(self, grid: Sequence[float], metric: str | None = "tradeoff", mode: str | None = "max",
                 points_per_round: int = 1, param: str = "sparsity", neighbourhood: int = 2,
                 sweep: bool = True) -> None:
        _check_mode(mode)
        super().__init__(metric=metric, mode=mode)
        values = sorted({float(s) for s in grid})
        if not values:
            raise ValueError("grid: got an empty grid; give at least one candidate sparsity")
        if points_per_round < 1:
            raise ValueError(f"points_per_round: got {points_per_round}; use 1 or more")
        self.grid = values
        self.points_per_round = int(points_per_round)
        self.param = param
        self.neighbourhood = int(neighbourhood)
        self.values: dict[int, float] = {}  # grid index -> objective (FAILED for failures)
        self.pending: dict[str, int] = {}  # trial_id -> grid index
        self.queue: deque[int] = deque()
        self.lo, self.hi = -1, len(values)  # exclusive bracket bounds (virtual ends outside the grid)
        if self.points_per_round == 1:
            # Fibonacci search: pad the bracket to a Fibonacci length; padding points are virtual
            # (worst value, never evaluated), so golden-section steps land exactly on the grid
            fib = [1, 2]
            while fib[-1] < len(values) + 1:
                fib.append(fib[-1] + fib[-2])
            self.hi = self.lo + fib[-1]
        self.virtual: set[int] = set()
        self.sweep_done = not sweep
        self.guard_done = False
        self.guard_triggered = False
        self.finished = False
        self.history: list[dict[str, Any]] = []  # evaluation order: {"index", "sparsity", "value"}
        self.max_concurrent = 0  # set_max_concurrency; 0: no limit beyond points_per_round

    # ---- Ray Tune's Searcher contract -------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any],
                              **spec: Any) -> bool:
        _check_mode(mode)
        if metric is not None:
            self._metric = metric
        if mode is not None:
            self._mode = mode
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Never have more than ``max_concurrent`` trials running (0 or less: no limit).

        Returns True, so Tune does not wrap the searcher in a ``ConcurrencyLimiter``; a round of
        ``points_per_round`` points is then proposed ``max_concurrent`` at a time.
        """
        self.max_concurrent = int(max_concurrent)
        return True

    def add_evaluated_point(self, parameters: dict[str, Any], value: float, error: bool = False,
                            pruned: bool = False, intermediate_values: list[float] | None = None) -> None:
        """Warm start: record a candidate evaluated elsewhere (its objective ``value`` in this mode)."""
        s = float(parameters[self.param])
        matches = [i for i, g in enumerate(self.grid) if math.isclose(g, s, rel_tol=0.0, abs_tol=1e-9)]
        if not matches:
            raise ValueError(f"{self.param}: got {s}; add_evaluated_point takes points of the grid {self.grid}")
        v = float(value)
        self.values[matches[0]] = FAILED if error or not math.isfinite(v) else (v if self._mode != "min" else -v)
        self.history.append({"index": matches[0], "sparsity": self.grid[matches[0]],
                             "value": self.values[matches[0]], "warm_start": True})

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self._metric is None or self._mode is None:
            raise ValueError("SandwichBisectionSearcher has no metric/mode: pass metric= and mode= to it, or to "
                             "tune.TuneConfig together with a non-empty param_space (Tune calls "
                             "set_search_properties only then)")
        if self.finished:
            return Searcher.FINISHED
        if not self.queue and not self.pending:
            self._plan_round()
            if self.finished:
                return Searcher.FINISHED
        if not self.queue:
            return None  # wait for running trials
        if 0 < self.max_concurrent <= len(self.pending):
            return None  # at the concurrency limit
        idx = self.queue.popleft()
        self.pending[trial_id] = idx
        return {self.param: self.grid[idx]}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        idx = self.pending.pop(trial_id, None)
        if idx is None:
            return
        value = FAILED
        if not error and result is not None and self._metric in result:
            try:
                raw = float(result[self._metric])
            except (TypeError, ValueError):
                raw = math.nan
            if math.isfinite(raw):
                value = raw if self._mode != "min" else -raw
        self.values[idx] = value
        self.history.append({"index": idx, "sparsity": self.grid[idx], "value": value})

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))

    def get_state(self) -> dict[str, Any]:
        return {"grid": self.grid, "points_per_round": self.points_per_round, "param": self.param,
                "neighbourhood": self.neighbourhood, "metric": self._metric, "mode": self._mode,
                "values": {str(k): v for k, v in self.values.items()}, "pending": self.pending,
                "queue": list(self.queue), "lo": self.lo, "hi": self.hi, "virtual": sorted(self.virtual),
                "guard_done": self.guard_done, "sweep_done": self.sweep_done,
                "guard_triggered": self.guard_triggered, "finished": self.finished,
                "history": self.history}

    def set_state(self, state: dict[str, Any]) -> None:
        self.grid = [float(s) for s in state["grid"]]
        self.points_per_round = int(state["points_per_round"])
        self.param = state["param"]
        self.neighbourhood = int(state["neighbourhood"])
        self._metric, self._mode = state["metric"], state["mode"]
        self.values = {int(k): float(v) for k, v in state["values"].items()}
        self.pending = {str(k): int(v) for k, v in state["pending"].items()}
        self.queue = deque(int(i) for i in state["queue"])
        self.lo, self.hi = int(state["lo"]), int(state["hi"])
        self.virtual = {int(i) for i in state.get("virtual", [])}
        self.guard_done = bool(state["guard_done"])
        self.sweep_done = bool(state.get("sweep_done", False))
        self.guard_triggered = bool(state.get("guard_triggered", False))
        self.finished = bool(state["finished"])
        self.history = list(state["history"])

    # ---- results ------------------------------------------------------------------------------
    @property
    def best(self) -> int | None:
        """Grid index of the best evaluated candidate so far."""
        order = sorted(self.values)
        idx = best_index([self.values[i] for i in order])
        return None if idx is None else order[idx]

    @property
    def answer(self) -> float | None:
        """Sparsity of the best evaluated candidate (the chosen TA once the search has finished)."""
        b = self.best
        return None if b is None else self.grid[b]

    @property
    def evaluations(self) -> int:
        return len(self.values)

    def is_unimodal(self) -> bool:
        """Whether the evaluated points (in grid order, failures skipped) rise then fall."""
        seq = [self.values[i] for i in sorted(self.values) if math.isfinite(self.values[i])]
        falling = False
        for a, b in zip(seq, seq[1:], strict=False):
            if b < a:
                falling = True
            elif b > a and falling:
                return False
        return True

    # ---- planning -----------------------------------------------------------------------------
    def _value(self, i: int) -> float:
        return self.values.get(i, FAILED)

    def _narrow(self) -> None:
        """Shrink the bracket to the known neighbours of the best point inside it.

        Known points are evaluated ones and virtual padding (worse than any failure). With nothing
        finite inside, the bracket closes on the real side of any padding, else on the first point.
        """
        inside = sorted(i for i in (*self.values, *self.virtual) if self.lo < i < self.hi)
        if not inside or (self.points_per_round == 1 and len(inside) < 2):
            return  # Fibonacci search compares two interior points before it narrows
        finite = [i for i in inside if i in self.values and math.isfinite(self.values[i])]
        if finite:
            b = finite[best_index([self.values[i] for i in finite])]  # type: ignore[index]
        else:
            real = [i for i in inside if i not in self.virtual]
            b = real[0] if real else inside[0]
        left = [i for i in inside if i < b]
        right = [i for i in inside if i > b]
        self.lo = left[-1] if left else self.lo
        self.hi = right[0] if right else self.hi

    def _place(self, count: int) -> list[int]:
        """Choose up to ``count`` unevaluated indices inside the bracket."""
        free = [i for i in range(self.lo + 1, min(self.hi, len(self.grid))) if i not in self.values]
        if count == 1:
            return self._fibonacci_step(free)
        if len(free) <= count:
            return free
        inside = [i for i in sorted(self.values) if self.lo < i < self.hi]
        chosen: list[int] = []
        if count == 1 and len(inside) == 1:
            # golden-section step: mirror the retained point inside the bracket
            (b,) = inside
            mirror = self.lo + self.hi - b
            if mirror != b and mirror in free:
                return [mirror]
            # retained point sits in the middle: probe the larger side at the golden ratio
            if b - self.lo >= self.hi - b:
                return [_nearest_free(b - max(1, round((b - self.lo) * (1 - _GOLDEN))), free)]
            return [_nearest_free(b + max(1, round((self.hi - b) * (1 - _GOLDEN))), free)]
        if not inside and count == 1:
            count = 2  # golden-section needs two interior points to compare
        span = self.hi - self.lo
        if not inside and count == 2:
            targets = [self.lo + span * (1 - _GOLDEN), self.lo + span * _GOLDEN]
            for t in targets:
                chosen.append(_nearest_free(round(t), [f for f in free if f not in chosen]))
            return sorted(set(chosen))
        points = sorted(inside)
        while len(chosen) < count:
            marks = sorted([self.lo, *points, *chosen, self.hi])
            gaps = [(marks[k + 1] - marks[k], marks[k]) for k in range(len(marks) - 1)]
            width, start = max(gaps)
            if width < 2:
                break
            candidate = start + width // 2
            options = [f for f in free if f not in chosen]
            if not options:
                break
            chosen.append(_nearest_free(candidate, options))
        return sorted(set(chosen))

    def _fibonacci_step(self, free: list[int]) -> list[int]:
        """Next point of Fibonacci search; padding points beyond the grid are settled for free."""
        while True:
            if not free:
                return []
            inside = sorted(i for i in (*self.values, *self.virtual) if self.lo < i < self.hi)
            if len(inside) >= 2:
                self._narrow()
                free = [i for i in free if self.lo < i < self.hi]
                continue
            span = self.hi - self.lo
            if not inside:
                target = self.lo + round(span * (1 - _GOLDEN))
            else:
                target = self.lo + self.hi - inside[0]
                if target == inside[0]:
                    target = inside[0] + (1 if inside[0] + 1 < self.hi else -1)
            if target >= len(self.grid):
                self.virtual.add(target)
                continue
            if target in free:
                return [target]
            return [_nearest_free(target, free)]

    def _plan_round(self) -> None:
        self._narrow()
        count = self.points_per_round
        if count > 1 and len(self.values) + count > self.evaluation_bound() - 2:
            count = 1  # near the unimodal bound: one golden-section step at a time
        new = self._place(count)
        if new:
            self.queue.extend(new)
            return
        # bracket converged: in a unimodal curve the best point is the argmax. Real curves are noisy and
        # not always unimodal, and a few rising points say little about the regions the bracket left:
        # spend what the unimodal bound leaves on the middles of the largest unevaluated gaps.
        if not self.sweep_done:
            sweep = self._sweep()
            if sweep:
                self.queue.extend(sweep)
                return
            self.sweep_done = True
        if not self.guard_done and not self.is_unimodal():
            self.guard_done = True
            checks = self._neighbourhood_checks()
            if checks:
                self.guard_triggered = True
                self.queue.extend(checks)
                self.lo, self.hi = -1, len(self.grid)
                return
        if self.guard_triggered and self.best is not None:
            # a neighbourhood check may have found a better peak: bracket it and continue
            b = self.best
            left = [i for i in self.values if i < b]
            right = [i for i in self.values if i > b]
            self.lo = max(left) if left else -1
            self.hi = min(right) if right else len(self.grid)
            extra = {i for i in range(self.lo + 1, self.hi) if i not in self.values}
            extra |= {i for i in range(b - self.neighbourhood, b + self.neighbourhood + 1)
                      if 0 <= i < len(self.grid) and i not in self.values}  # the new best's neighbourhood too
            if extra:
                self.queue.extend(sorted(extra))
                return
        self.finished = True

    def evaluation_bound(self) -> int:
        """Evaluations a unimodal curve may cost: ``ceil(log_1.618 K) + 2`` (Fibonacci search's own count
        plus two)."""
        k = len(self.grid)
        return math.ceil(math.log(max(k, 2)) / math.log(1 / _GOLDEN)) + 2

    def _sweep(self) -> list[int]:
        """Middles of the largest runs of unevaluated points, within the unimodal bound's budget."""
        budget = min(self.points_per_round, self.evaluation_bound() - len(self.values))
        chosen: list[int] = []
        while len(chosen) < budget:
            known = sorted({*self.values, *chosen})
            runs = []
            edges = [-1, *known, len(self.grid)]
            for a, b in zip(edges, edges[1:], strict=False):
                if b - a > 1:
                    runs.append((b - a - 1, -a, a, b))  # longest first, then leftmost
            if not runs:
                break
            _, _, a, b = max(runs)
            chosen.append((a + b) // 2)
        if not chosen:
            self.sweep_done = True
        return sorted(set(chosen))

    def _neighbourhood_checks(self) -> list[int]:
        """Unevaluated points near the answer and near every other local peak of the evaluated points."""
        order = [i for i in sorted(self.values) if math.isfinite(self.values[i])]
        peaks = [i for k, i in enumerate(order)
                 if (k == 0 or self.values[order[k - 1]] <= self.values[i])
                 and (k == len(order) - 1 or self.values[order[k + 1]] <= self.values[i])]
        wanted: list[int] = []
        for p in peaks:
            radius = self.neighbourhood if p == self.best else 1
            for i in range(p - radius, p + radius + 1):
                if 0 <= i < len(self.grid) and i not in self.values and i not in wanted:
                    wanted.append(i)
        return sorted(wanted)


def _nearest_free(target: int, free: Sequence[int]) -> int:
    return min(free, key=lambda f: (abs(f - target), f))
