"""The built-in search strategies, one module each; they register themselves in
:data:`~minidisc_ray.search.strategies.base.REGISTRY` on import.

A strategy says three things, the way a Ray Tune searcher or an Optuna sampler does and nothing more:

* how it runs: the Tune parts (:meth:`Strategy.tune_parts`: trainable, search algorithm, parameter space,
  number of samples) that :func:`minidisc_ray.search.driver.run_tune` runs and records, or, with
  ``tune_experiment = False``, its own :meth:`Strategy.run` (the trial-distillation strategies: halving,
  auto, optuna-kd);
* how it chooses among the rows its trials reported (:meth:`Strategy.choose`);
* how ``minidisc study`` replays it on one seed's recorded candidates (:meth:`Strategy.replay`), or None
  when it cannot be replayed from those records;

and declares what it supports (:mod:`~minidisc_ray.search.strategies.base`). A new strategy is one module that
subclasses :class:`Strategy` and calls :func:`register`; config validation and the study derive their lists
from the registry. A strategy module imports the registry and nothing of the search machinery: the driver hands
it the trainables and rounds (:class:`Machinery`), and Ray Tune and Optuna are imported inside the methods that
run or replay it, so the config (which validates against the registry) imports without Ray, as the engine does
on a machine that has only torch and transformers.
"""

from __future__ import annotations

# the built-in strategies register in import order, which is the order listings and study tables use
# isort: split
from minidisc_ray.search.strategies import bisection, grid, optuna_tpe, sandwich  # noqa: F401

# isort: split
from minidisc_ray.search.strategies import exhaustive  # noqa: F401

# isort: split
from minidisc_ray.search.strategies import trial_distillation  # noqa: F401

# isort: split

from minidisc_ray.search.strategies.base import (
    REGISTRY,
    Machinery,
    ReplaySettings,
    Strategy,
    TuneParts,
    get_strategy,
    names,
    register,
    replay_cost,
)

__all__ = ["REGISTRY", "Machinery", "ReplaySettings", "Strategy", "TuneParts", "get_strategy", "names", "register",
           "replay_cost"]
