"""One Ray Tune experiment, built the same way wherever minidisc-ray runs one (the lambda search, the halving
round, ``minidisc study``): storage under ``OUTPUT/tune`` (or ``ray.storage``), a fresh experiment name each
time (Tune's own pickled state is never read back), the stopper that ends it on Ctrl-C or SIGTERM, one retry
of a failed trial, and a callback that says in one line when a trial is retried or fails."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from minidisc_ray.config import Config
from minidisc_ray.interrupts import interruptible, verbose
from minidisc_ray.logs import log
from minidisc_ray.ray_env import interrupt_stopper, storage_root, trial_failure_line

TRIAL_RETRIES = 1  # a failed trial is run once more (a lost node, a killed worker) before it counts as failed


class TrialLog(tune.Callback):
    """Logs a retried or failed trial in one line; subclasses add what they record of each result."""

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        log(trial_failure_line(trial, retried=True))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        log(trial_failure_line(trial, retried=False))


def experiment_name(kind: str) -> str:
    """``<kind>-<YYYYmmdd-HHMMSS>``: a new experiment directory every run."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def experiment_path(cfg: Config, output_dir: Path, name: str) -> str:
    """Where the experiment ``name`` keeps Tune's files."""
    return f"{storage_root(cfg, output_dir, 'tune').rstrip('/')}/{name}"


def run_experiment(trainable: Callable[..., None], *, payload: Any, resources: dict[str, float], cfg: Config,
                   output_dir: Path,
                   name: str, param_space: dict[str, Any], callbacks: list[Any], metric: str | None = None,
                   search_alg: Searcher | None = None, scheduler: TrialScheduler | None = None,
                   num_samples: int = 1, reuse_actors: bool = True) -> Any:  # a ResultGrid
    """Run ``trainable`` (a Tune function trainable taking ``payload``) as one Tune experiment and return its
    ``ResultGrid``; Ctrl-C or SIGTERM stops it cleanly (:func:`~minidisc_ray.interrupts.interruptible`)."""
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, payload=payload), resources), param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                    metric=metric, mode="max" if metric else None,
                                    max_concurrent_trials=cfg.search.max_concurrent_trials,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=storage_root(cfg, output_dir, "tune"),
                                  stop=interrupt_stopper(), callbacks=callbacks, verbose=1 if verbose() else 0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)))
    return interruptible(tuner.fit, stoppable=True)
