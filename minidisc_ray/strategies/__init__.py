"""The built-in search strategies, one module each; they register themselves in
:data:`~minidisc_ray.strategies.base.REGISTRY` on import.

A strategy says three things, the way a Ray Tune searcher or an Optuna sampler does and nothing more:

* how it runs: the Tune parts (:meth:`Strategy.tune_parts`: trainable, search algorithm, parameter space,
  number of samples) that :func:`minidisc_ray.search.driver.run_tune` runs and records, or, with
  ``tune_experiment = False``, its own :meth:`Strategy.run` (the trial-distillation strategies: halving,
  auto, optuna-kd);
* how it chooses among the rows its trials reported (:meth:`Strategy.choose`);
* how ``minidisc study`` replays it on one seed's recorded candidates (:meth:`Strategy.replay`), or None
  when it cannot be replayed from those records;

and declares what it supports (:mod:`~minidisc_ray.strategies.base`). A new strategy is one module that
subclasses :class:`Strategy` and calls :func:`register`; config validation and the study derive their lists
from the registry. A strategy module imports the registry and nothing of the search machinery: the driver hands
it the trainables, the bisection searcher and the rounds (:class:`Machinery`), the study hands it the replays of
the real searcher and sampler (:class:`ReplaySettings`), and Ray Tune and Optuna themselves are imported inside
the methods that build a Tune experiment, so the config (which validates against the registry) imports without
Ray, as the engine does on a machine that has only torch and transformers.
"""

from __future__ import annotations

# the built-in strategies register in import order, which is the order listings and study tables use
# isort: split
from minidisc_ray.strategies import bisection, grid, optuna_tpe, sandwich  # noqa: F401

# isort: split
from minidisc_ray.strategies import exhaustive  # noqa: F401

# isort: split
from minidisc_ray.strategies import trial_distillation  # noqa: F401

# isort: split

from minidisc_ray.strategies.base import (
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
