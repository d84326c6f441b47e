"""What a search strategy is: the :class:`Strategy` base class, the facts every strategy declares about itself,
and the one registry of strategies (:data:`REGISTRY`) that config validation, the driver and ``minidisc study``
all read.

A strategy is a class that calls :func:`register`. Its facts (class attributes) say what it supports:

* ``offline_teacher``: it trains on a ``teacher.placement: offline`` teacher's stored targets;
* ``sharded_trials``: its trials read a ``teacher.placement: sharded`` teacher shard by shard over a trial's
  workers (``search.trial_workers`` > 1);
* ``multi_worker_trials``: its trials can run on several Ray Train workers;
* ``replayable``: ``minidisc study`` replays it on recorded candidates (:meth:`Strategy.replay`);
* ``stage_arms``: the study also replays it with arms that run the chain's whole first stage;
* ``needs_tradeoff``: its pick depends on the tradeoff's form (False where it chooses on the student's metric alone).

This module imports nothing of the search machinery, so the config can validate against the registry; the
built-in strategies register themselves when :mod:`minidisc_ray.strategies` is imported (which
``import minidisc_ray`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from minidisc_ray.errors import UserInputError
from minidisc_ray.tradeoff import best_index


@dataclass
class TuneParts:
    """What ``tune.Tuner`` needs of a strategy."""

    trainable: Any
    search_alg: Any = None
    param_space: dict[str, Any] | None = None
    num_samples: int = 1


@dataclass(frozen=True)
class Machinery:
    """The search machinery a strategy runs with, handed to it by the driver
    (:data:`minidisc_ray.search.driver.MACHINERY`). The trainables and rounds read the config, so a strategy
    module imports none of them: the registry stays below the config, which validates against it."""

    candidate_trial: Callable[..., None]  # one candidate: cut, recovered, scored (search.trial)
    sandwich_trial: Callable[..., None]  # every width at once (search.trial)
    run_halving: Callable[..., dict[str, Any]]  # a halving round over arms (search.halving)
    run_optuna_kd: Callable[..., dict[str, Any]]  # Optuna over arms (search.optuna_kd)
    shortlist: Callable[..., list[float]]  # the lambda search's best candidates (search.halving)
    bisection_searcher: Callable[..., Any]  # SandwichBisectionSearcher (search.searcher), a Ray Tune Searcher


@dataclass
class ReplaySettings:
    """The search settings a replay follows (``search.*`` of the study's config)."""

    points_per_round: int = 1
    optuna_budget: int = 8
    optuna_seed: int = 0
    scorer: Any = None  # the tradeoff (a :class:`minidisc_ray.tradeoff.Tradeoff`) the curve was scored with
    stage_steps: int = 0  # steps of one chain stage (the student's; "no assistant" trains twice as many)
    reduction: int = 3  # successive halving keeps the best 1/reduction of the arms at each rung
    shortlist: int = 3  # auto: the lambda search's top candidates that go on to halving
    no_assistant: int | None = None  # the grid index of the student's own sparsity ("no assistant"), if any
    rungs: list[int] | None = None  # the halving round's rungs (student-link steps), as search.halving_* give them
    # the real searcher and sampler replayed on a curve (minidisc_ray.search.replay; the study passes them)
    bisection_order: Callable[[list[float], int], tuple[list[int], int]] | None = None
    optuna_order: Callable[..., tuple[list[int], int]] | None = None

    def bisection(self, curve: list[float]) -> tuple[list[int], int]:
        """(candidates evaluated in order, pick) of the sandwich bisection on ``curve``."""
        if self.bisection_order is None:
            raise ValueError("ReplaySettings.bisection_order is not set (pass minidisc_ray.search.replay."
                             "bisection_order)")
        return self.bisection_order(curve, self.points_per_round)

    def optuna(self, curve: list[float]) -> tuple[list[int], int]:
        """(candidates evaluated in order, pick) of Optuna's TPE sampler on ``curve``."""
        if self.optuna_order is None:
            raise ValueError("ReplaySettings.optuna_order is not set (pass minidisc_ray.search.replay.optuna_order)")
        return self.optuna_order(curve, self.optuna_seed, budget=self.optuna_budget)


class Strategy:
    """Base class: a strategy scored on the lambda-tradeoff of the candidates' recovery metric."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = "tradeoff"  # the row field the strategy maximises
    uses_optuna_study: ClassVar[bool] = False  # resumes a persistent Optuna study (search.optuna_storage)
    one_trial: ClassVar[bool] = False  # a single trial scores every candidate (the sandwich)
    tune_experiment: ClassVar[bool] = True  # run by driver.run_tune from tune_parts; False: by its own run()
    offline_teacher: ClassVar[bool] = True  # trains on an offline teacher's stored targets
    sharded_trials: ClassVar[bool] = True  # shards a sharded teacher over a multi-worker trial
    multi_worker_trials: ClassVar[bool] = True  # its trials may run on several Ray Train workers
    replayable: ClassVar[bool] = True  # minidisc study replays it from recorded candidates
    stage_arms: ClassVar[bool] = False  # the study also replays it with whole-first-stage arms
    needs_tradeoff: ClassVar[bool] = True  # its pick depends on the tradeoff form (paper / retained)

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        raise NotImplementedError(f"{self.name} runs its own trials (Strategy.run)")

    def expected_trials(self, cfg: Any, parts: TuneParts) -> int | None:
        """How many trials the progress lines count towards (None: not known in advance)."""
        return None

    def choose(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The row of the chosen candidate: the best ``objective`` on the sorted grid (ties to the sparser)."""
        ok = [r for r in rows if not r.get("failed") and r.get(self.objective) is not None
              and math.isfinite(r[self.objective])]
        if not ok:
            return None
        ok.sort(key=lambda r: r["sparsity"])
        idx = best_index([r[self.objective] for r in ok])
        return ok[idx] if idx is not None else None

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]], kit: Machinery) -> dict[str, Any]:
        """A strategy that is not one Tune experiment over the candidates runs itself (``run_named(name)``
        runs another strategy on the same job); returns the content of ``search.json``."""
        raise NotImplementedError(f"{self.name} is a Tune experiment: driver.run_tune runs it")

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        """On one study seed (``rec``: a :class:`minidisc_ray.study.records.SeedRecord`, ``curve``: its tradeoff per
        candidate): {"pick": index, "evaluated": candidates evaluated, "cpu": CPU-seconds}; None when the
        records cannot replay it."""
        return None


def replay_cost(rec: Any, evaluated: list[int], pick: int) -> float:
    """A replayed strategy's CPU-seconds: its candidate evaluations, then the chain through its pick."""
    return float(sum(rec.eval_cpu[i] for i in set(evaluated)) + rec.chain_cpu[pick])


REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``search.strategy: <cls.name>``."""
    REGISTRY[cls.name] = cls()
    return cls


def names(**facts: bool) -> list[str]:
    """The registered strategies whose facts have the given values, e.g. ``names(offline_teacher=True)``."""
    return [n for n, s in REGISTRY.items() if all(getattr(s, k) == v for k, v in facts.items())]


def get_strategy(name: str, field: str = "search.strategy") -> Strategy:
    if name not in REGISTRY:
        raise UserInputError(field, name, f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
