"""Search strategies as objects: one module each, one registry.

A strategy says three things, the way a Ray Tune searcher or an Optuna sampler does and nothing more:

* how it runs: the Tune parts (:meth:`Strategy.tune_parts`: trainable, search algorithm, parameter space,
  number of samples) that :func:`minidisc_ray.search.driver.run_tune` runs and records, or, with
  ``tune_experiment = False``, its own :meth:`Strategy.run` (the trial-distillation strategies: halving,
  auto, optuna-kd);
* how it chooses among the rows its trials reported (:meth:`Strategy.choose`);
* how ``minidisc study`` replays it on one seed's recorded candidates (:meth:`Strategy.replay`), or None
  when it cannot be replayed from those records.

A new strategy is a new module here that calls :func:`register`; nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from minidisc_ray.errors import UserInputError


@dataclass
class TuneParts:
    """What ``tune.Tuner`` needs of a strategy."""

    trainable: Any
    search_alg: Any = None
    param_space: dict[str, Any] | None = None
    num_samples: int = 1


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


class Strategy:
    """Base class: a strategy scored on the lambda-tradeoff of the candidates' recovery metric."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = "tradeoff"  # the row field the strategy maximises
    uses_optuna_study: ClassVar[bool] = False  # resumes a persistent Optuna study (search.optuna_storage)
    one_trial: ClassVar[bool] = False  # a single trial scores every candidate (the sandwich)
    tune_experiment: ClassVar[bool] = True  # run by driver.run_tune from tune_parts; False: by its own run()

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None) -> TuneParts:
        raise NotImplementedError(f"{self.name} runs its own trials (Strategy.run)")

    def expected_trials(self, cfg: Any, parts: TuneParts) -> int | None:
        """How many trials the progress lines count towards (None: not known in advance)."""
        return None

    def choose(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The row of the chosen candidate: the best ``objective`` on the sorted grid (ties to the sparser)."""
        from minidisc_ray.search.searcher import best_index

        ok = [r for r in rows if not r.get("failed") and r.get(self.objective) is not None
              and math.isfinite(r[self.objective])]
        if not ok:
            return None
        ok.sort(key=lambda r: r["sparsity"])
        idx = best_index([r[self.objective] for r in ok])
        return ok[idx] if idx is not None else None

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """A strategy that is not one Tune experiment over the candidates runs itself (``run_named(name)``
        runs another strategy on the same job); returns the content of ``search.json``."""
        raise NotImplementedError(f"{self.name} is a Tune experiment: driver.run_tune runs it")

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        """On one study seed (``rec``: a :class:`minidisc_ray.study.SeedRecord`, ``curve``: its tradeoff per
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


def get_strategy(name: str, field: str = "search.strategy") -> Strategy:
    if name not in REGISTRY:
        raise UserInputError(field, name, f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


from minidisc_ray.search.strategies import (  # noqa: E402 - the modules register themselves
    bisection,
    grid,
    optuna_tpe,
    sandwich,
    trial_distillation,
)

__all__ = ["REGISTRY", "ReplaySettings", "Strategy", "TuneParts", "bisection", "get_strategy", "grid", "optuna_tpe",
           "register", "replay_cost", "sandwich", "trial_distillation"]
