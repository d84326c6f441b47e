"""Strategies replayed on a recorded curve: which candidates a strategy would evaluate, in what order.

A search on Ray Tune evaluates candidates by training them; once every candidate's value is known (a
``grid`` search, or the per-seed curves of ``minidisc study``), what the bisection searcher or an
Optuna sampler would have evaluated and picked follows without training anything: the same searcher
and the same Optuna samplers, told the recorded values. ``minidisc study`` and the searcher benchmarks
use these.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from minidisc_ray.search.searcher import SandwichBisectionSearcher
from minidisc_ray.tradeoff import best_index


def bisection_order(curve: Sequence[float], points_per_round: int = 1, sweep: bool = True) -> tuple[list[int], int]:
    """(indices evaluated in order, index answered) of :class:`SandwichBisectionSearcher` on ``curve``
    (values on the sorted grid; higher is better)."""
    searcher = SandwichBisectionSearcher(list(range(len(curve))), points_per_round=points_per_round, sweep=sweep)
    order: list[int] = []
    n = 0
    while True:
        batch = []
        while isinstance(cfg := searcher.suggest(f"t{n}"), dict):
            batch.append((f"t{n}", int(cfg["sparsity"])))
            n += 1
        if not batch:
            answer = searcher.answer
            return order, int(answer) if answer is not None else order[-1]
        for tid, i in batch:
            order.append(i)
            searcher.on_trial_complete(tid, {"tradeoff": curve[i]})


def optuna_order(curve: Sequence[float], seed: int, budget: int | None = None, sampler: str = "tpe",
                 integer: bool = False, stop_at_best: bool = False) -> tuple[list[int], int]:
    """(indices suggested in order, index of the best value seen) of an Optuna study over the grid:
    TPE (as ``search.strategy: optuna`` runs it: categorical, 3 start-up trials), the random sampler,
    or the grid sampler; ``integer`` suggests an integer index instead of a category. It runs
    ``budget`` trials (default 3 K), or stops at the curve's argmax with ``stop_at_best``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    k = len(curve)
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, k)),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "grid": lambda: optuna.samplers.GridSampler({"i": list(range(k))}, seed=seed)}
    if sampler not in samplers:
        raise ValueError(f"sampler: got {sampler!r}; use one of {', '.join(samplers)}")
    study = optuna.create_study(direction="maximize", sampler=samplers[sampler]())
    order: list[int] = []
    target = best_index(curve)
    limit = budget or 3 * k
    if sampler == "grid":
        limit = min(limit, k)  # the grid sampler visits each point once, then stops the study
    for _ in range(limit):
        trial = study.ask()
        i = trial.suggest_int("i", 0, k - 1) if integer else trial.suggest_categorical("i", list(range(k)))
        order.append(i)
        try:
            study.tell(trial, curve[i])
        except RuntimeError:  # GridSampler calls study.stop() after the last point, outside optimize()
            break
        if stop_at_best and i == target:
            break
    seen = sorted(set(order))
    picked = seen[best_index([curve[i] for i in seen]) or 0]
    return order, picked
