"""``optuna``: Ray Tune's ``OptunaSearch`` with TPE over the same grid and objective (the lambda-tradeoff),
with a trial budget, in a persistent RDB study that a rerun continues."""

from __future__ import annotations

from typing import Any

from minidisc_ray.errors import UserInputError
from minidisc_ray.strategies.base import Machinery, ReplaySettings, Strategy, TuneParts, register, replay_cost


@register
class OptunaTPE(Strategy):
    name = "optuna"
    uses_optuna_study = True

    def tune_parts(self, cfg: Any, study: tuple[Any, str, list[float]] | None, kit: Machinery) -> TuneParts:
        try:  # deferred: Optuna and Ray Tune, see minidisc_ray.strategies
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserInputError("search.strategy", "optuna", "install optuna: pip install optuna") from None

        grid = sorted(cfg.pruning.grid)
        seed = cfg.search.optuna_seed if cfg.search.optuna_seed is not None else cfg.seed
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, len(grid)))
        space: dict[str, optuna.distributions.BaseDistribution] = {
            "sparsity": optuna.distributions.CategoricalDistribution(grid)}
        storage, name, done = study if study is not None else (None, None, [])
        alg = OptunaSearch(space=space, metric="tradeoff", mode="max", sampler=sampler, storage=storage,
                           study_name=name)
        return TuneParts(kit.candidate_trial, alg, {}, max(1, cfg.search.optuna_trials - len(done)))

    def expected_trials(self, cfg: Any, parts: TuneParts) -> int | None:
        return parts.num_samples

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        order, pick = settings.optuna(curve)
        return {"pick": pick, "evaluated": len(set(order)), "cpu": replay_cost(rec, order, pick)}
