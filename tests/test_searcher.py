"""SandwichBisectionSearcher driven directly through Ray Tune's Searcher contract (no Ray cluster)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest
from ray.tune.search import Searcher

from minidisc_ray.search.searcher import SandwichBisectionSearcher
from minidisc_ray.tradeoff import best_index

PHI = (1 + math.sqrt(5)) / 2


def drive(searcher: SandwichBisectionSearcher, objective: Callable[[float], dict | None],
          fail: Sequence[float] = (), stop_after: int | None = None) -> list[float]:
    """Run the searcher to completion in rounds, as Tune would with unlimited concurrency."""
    asked: list[float] = []
    n = 0
    while True:
        batch = []
        while True:
            cfg = searcher.suggest(f"t{n}")
            if cfg is None or cfg == Searcher.FINISHED:
                break
            batch.append((f"t{n}", cfg["sparsity"]))
            n += 1
        if not batch:
            assert cfg == Searcher.FINISHED, "a searcher with nothing pending must finish, not wait"
            return asked
        for tid, s in batch:
            asked.append(s)
            if s in fail:
                searcher.on_trial_complete(tid, None, error=True)
            else:
                searcher.on_trial_complete(tid, objective(s))
            if stop_after is not None and len(asked) >= stop_after:
                return asked


def unimodal(k: int, rng: random.Random) -> list[float]:
    peak = rng.randrange(k)
    up = sorted(rng.random() for _ in range(peak + 1))
    down = sorted((rng.random() * up[-1] * 0.999 for _ in range(k - peak - 1)), reverse=True)
    return up + down


def grid_of(k: int) -> list[float]:
    return [round(0.5 + 0.45 * i / max(1, k - 1), 6) for i in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 13, 21, 34, 50, 64, 100])
def test_unimodal_exact_argmax_within_golden_bound(k: int) -> None:
    rng = random.Random(k)
    grid = grid_of(k)
    bound = math.ceil(math.log(k, PHI)) + 2 if k > 1 else 1
    for _ in range(30):
        curve = dict(zip(grid, unimodal(k, rng), strict=True))
        s = SandwichBisectionSearcher(grid, points_per_round=1)
        asked = drive(s, lambda x, c=curve: {"tradeoff": c[x]})
        assert s.answer == grid[best_index(list(curve.values()))]  # type: ignore[index]
        assert len(asked) == len(set(asked)), "no candidate is evaluated twice"
        assert s.evaluations <= bound


@pytest.mark.parametrize("points", [1, 2, 3, 4])
def test_agrees_with_grid_on_200_random_unimodal_curves(points: int) -> None:
    rng = random.Random(points)
    for _ in range(200):
        k = rng.randint(2, 64)
        grid = grid_of(k)
        values = unimodal(k, rng)
        curve = dict(zip(grid, values, strict=True))
        s = SandwichBisectionSearcher(grid, points_per_round=points)
        drive(s, lambda x, c=curve: {"tradeoff": c[x]})
        assert s.answer == grid[best_index(values)]  # type: ignore[index]
        if points == 2:
            assert s.evaluations <= math.ceil(math.log(k, PHI)) + 3


def test_parallel_rounds_propose_several_points() -> None:
    s = SandwichBisectionSearcher(grid_of(20), points_per_round=3)
    first = [s.suggest(f"t{i}") for i in range(4)]
    assert all(isinstance(c, dict) for c in first[:3])
    assert first[3] is None  # waits for the round


def test_plateau_curve_returns_a_maximiser() -> None:
    grid = grid_of(16)
    values = [0.1 * i for i in range(5)] + [0.6] * 6 + [0.5 - 0.1 * i for i in range(5)]
    curve = dict(zip(grid, values, strict=True))
    s = SandwichBisectionSearcher(grid)
    drive(s, lambda x: {"tradeoff": curve[x]})
    assert curve[s.answer] == 0.6  # type: ignore[index]


def test_noisy_curve_lands_near_the_peak() -> None:
    rng = random.Random(7)
    grid = grid_of(32)
    values = [1 - (i - 20) ** 2 / 400 + rng.gauss(0, 0.002) for i in range(32)]
    curve = dict(zip(grid, values, strict=True))
    s = SandwichBisectionSearcher(grid)
    drive(s, lambda x: {"tradeoff": curve[x]})
    assert abs(grid.index(s.answer) - 20) <= 2  # type: ignore[arg-type]
    assert s.evaluations < 32


def test_nan_missing_metric_and_failed_trial_are_failures_not_crashes() -> None:
    grid = grid_of(13)
    values = [1 - abs(i - 8) / 10 for i in range(13)]
    curve = dict(zip(grid, values, strict=True))
    broken = {grid[4]: {"tradeoff": float("nan")}, grid[5]: {"other": 1.0}, grid[3]: None}

    def objective(x: float) -> dict | None:
        return broken.get(x, {"tradeoff": curve[x]})

    s = SandwichBisectionSearcher(grid)
    asked = drive(s, objective, fail=[grid[7]])
    assert s.answer == grid[8]
    for x in asked:
        if x in broken or x == grid[7]:
            assert s.values[grid.index(x)] == -math.inf


def test_all_failures_finish_without_answer() -> None:
    s = SandwichBisectionSearcher(grid_of(5))
    drive(s, lambda x: {"tradeoff": float("nan")})
    assert s.answer is None
    assert s.finished


def two_peaks(k: int, rng: random.Random) -> list[float]:
    a, b = sorted(rng.sample(range(k), 2))
    ha, hb = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    wa, wb = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2)
    return [max(ha - wa * abs(i - a), hb - wb * abs(i - b)) + rng.uniform(0, 1e-6) for i in range(k)]


def test_two_peak_curves_trigger_the_neighbourhood_check() -> None:
    rng = random.Random(11)
    triggered = improved = 0
    for _ in range(300):
        k = rng.randint(8, 40)
        grid = grid_of(k)
        values = two_peaks(k, rng)
        curve = dict(zip(grid, values, strict=True))

        def objective(x: float, c: dict = curve) -> dict:
            return {"tradeoff": c[x]}

        guarded = SandwichBisectionSearcher(grid)
        drive(guarded, objective)
        plain = SandwichBisectionSearcher(grid)
        plain.guard_done = plain.sweep_done = True  # the same search with the gap sweep and the guard off
        drive(plain, objective)
        assert curve[guarded.answer] >= curve[plain.answer]  # type: ignore[index]
        if not guarded.is_unimodal():
            triggered += 1
            b = grid.index(guarded.answer)  # type: ignore[arg-type]
            assert all(j in guarded.values for j in range(max(0, b - 2), min(k, b + 3)))
            improved += curve[guarded.answer] > curve[plain.answer]  # type: ignore[index]
    assert triggered >= 10
    assert improved >= 1


def test_min_mode_and_custom_metric() -> None:
    grid = grid_of(10)
    s = SandwichBisectionSearcher(grid, metric="loss", mode="min")
    drive(s, lambda x: {"loss": (x - grid[6]) ** 2})
    assert s.answer == grid[6]


@pytest.mark.parametrize("points", [1, 2])
def test_save_restore_mid_search_gives_same_answer(tmp_path, points: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    grid = grid_of(40)
    values = unimodal(40, rng)
    curve = dict(zip(grid, values, strict=True))

    def objective(x: float) -> dict:
        return {"tradeoff": curve[x]}

    straight = SandwichBisectionSearcher(grid, points_per_round=points)
    drive(straight, objective)

    first = SandwichBisectionSearcher(grid, points_per_round=points)
    drive(first, objective, stop_after=3)
    # trials still running at save time, as when the driver dies mid-search
    first.suggest("extra")
    assert first.pending
    first.save(str(tmp_path / "searcher.json"))
    resumed = SandwichBisectionSearcher([0.0])
    resumed.restore(str(tmp_path / "searcher.json"))
    assert resumed.pending == first.pending
    assert resumed.grid == grid
    # Tune re-runs unfinished trials under their old ids; the searcher must not propose them again
    for trial_id, idx in list(resumed.pending.items()):
        resumed.on_trial_complete(trial_id, objective(grid[idx]))
    drive(resumed, objective)
    assert resumed.answer == straight.answer == grid[best_index(values)]  # type: ignore[index]
    assert resumed.evaluations == straight.evaluations


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="grid"):
        SandwichBisectionSearcher([])
    with pytest.raises(ValueError, match="points_per_round"):
        SandwichBisectionSearcher([0.5], points_per_round=0)
    s = SandwichBisectionSearcher([0.9, 0.5, 0.7, 0.5])
    assert s.grid == [0.5, 0.7, 0.9]


def test_metric_or_mode_missing_fails_loudly_and_unknown_modes_are_rejected() -> None:
    no_metric = SandwichBisectionSearcher([0.5, 0.7, 0.9], metric=None, mode=None)
    with pytest.raises(ValueError, match="no metric/mode"):
        no_metric.suggest("t1")
    assert no_metric.set_search_properties("tradeoff", "max", {})
    assert no_metric.suggest("t1") is not None
    with pytest.raises(ValueError, match="mode: got 'maximise'"):
        SandwichBisectionSearcher([0.5], mode="maximise")
    with pytest.raises(ValueError, match="mode: got 'up'"):
        SandwichBisectionSearcher([0.5]).set_search_properties(None, "up", {})


def test_warm_start_and_concurrency_limit() -> None:
    curve = {0.5: 0.90, 0.6: 0.93, 0.7: 0.95, 0.8: 0.94, 0.9: 0.91}
    warm = SandwichBisectionSearcher(sorted(curve), points_per_round=2)
    for s, v in curve.items():
        warm.add_evaluated_point({"sparsity": s}, v)
    assert warm.answer == 0.7
    assert warm.evaluations == 5
    assert warm.suggest("t") == Searcher.FINISHED, "every point known: nothing left to evaluate"
    with pytest.raises(ValueError, match="grid"):
        warm.add_evaluated_point({"sparsity": 0.55}, 0.9)
    limited = SandwichBisectionSearcher(sorted(curve), points_per_round=3)
    assert limited.set_max_concurrency(1) is True
    first = limited.suggest("a")
    assert isinstance(first, dict), "one trial at a time"
    assert limited.suggest("b") is None, "one trial at a time"
    limited.on_trial_complete("a", {"tradeoff": curve[first["sparsity"]]})
    assert isinstance(limited.suggest("b"), dict)


def test_exact_on_the_recorded_real_curve_and_its_leave_one_and_two_out_variants() -> None:
    """The committed SST-2 lambda curve (K = 9, not unimodal) and all 45 variants without one or two points."""
    import itertools
    import json

    from .conftest import REPO

    data = json.loads((REPO / "benchmarks" / "results" / "sst2_grid_curve.json").read_text())
    curve = [c["tradeoff"] for c in sorted(data["candidates"], key=lambda c: c["sparsity"])]
    variants = [curve] + [[v for j, v in enumerate(curve) if j not in drop]
                          for r in (1, 2) for drop in itertools.combinations(range(len(curve)), r)]
    assert len(variants) == 46
    for points in (1, 2):
        exact = 0
        for values in variants:
            grid = grid_of(len(values))
            s = SandwichBisectionSearcher(grid, points_per_round=points)
            drive(s, lambda x, g=grid, v=values: {"tradeoff": v[g.index(x)]})
            exact += values[grid.index(s.answer)] == max(values)  # type: ignore[arg-type]
        assert exact / len(variants) >= 0.95, (points, exact)


@pytest.mark.parametrize("points", [1, 2])
def test_unimodal_curves_stay_within_the_evaluation_bound(points: int) -> None:
    rng = random.Random(3)
    for k in (5, 8, 13, 21, 40, 64):
        bound = math.ceil(math.log(k) / math.log((1 + 5 ** 0.5) / 2)) + 2
        for _ in range(25):
            peak = rng.randrange(k)
            values = [-abs(i - peak) + rng.uniform(0, 0.1) * (i == peak) for i in range(k)]
            grid = grid_of(k)
            s = SandwichBisectionSearcher(grid, points_per_round=points)
            drive(s, lambda x, g=grid, v=values: {"tradeoff": v[g.index(x)]})
            assert s.answer == grid[peak], (k, s.evaluations, bound)
            assert s.evaluations <= bound, (k, s.evaluations, bound)
