"""The strategies that choose on the student's dev metric after short trial distillation
(:mod:`minidisc_ray.search.halving`): ``halving`` (every assistant below the student and "no assistant" as
arms, a Ray Tune ASHA/HyperBand scheduler), ``optuna-kd`` (Optuna TPE with a Hyperband or
successive-halving pruner over the same arms) and ``auto`` (the lambda search, then a halving round among
its shortlist and "no assistant")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from minidisc_ray.search.strategies import Strategy, register


def _arms(cfg: Any) -> list[float]:
    s_student = cfg.pruning.student_sparsity
    return sorted({s for s in cfg.pruning.grid if s < s_student} | {s_student})


@register
class Halving(Strategy):
    name = "halving"
    tune_experiment = False
    objective = "student_metric"

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        from minidisc_ray.search.halving import run_halving

        return run_halving(prep, payload, output_dir, _arms(prep.cfg), self.name, run_id)


@register
class OptunaKD(Strategy):
    name = "optuna-kd"
    tune_experiment = False
    objective = "student_metric"
    uses_optuna_study = True

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        from minidisc_ray.search.halving import run_optuna_kd

        return run_optuna_kd(prep, payload, output_dir, _arms(prep.cfg))


@register
class Auto(Strategy):
    name = "auto"
    tune_experiment = False
    objective = "student_metric"

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        from minidisc_ray.pipeline import log
        from minidisc_ray.search.halving import run_halving, shortlist
        cfg = prep.cfg
        s_student = cfg.pruning.student_sparsity
        lam = run_named("bisection")
        picks = shortlist(lam, s_student, cfg.search.shortlist)
        log(f"[search] auto: the lambda search picked {lam['chosen_sparsity']}; its shortlist {picks} and no "
            "assistant go to a halving round on the student's dev metric")
        summary = run_halving(prep, payload, output_dir, [*picks, s_student], self.name, run_id)
        summary.update(candidates=lam["candidates"], lambda_pick=lam["chosen_sparsity"],
                       evaluations=lam["evaluations"] + summary["evaluations"],
                       reused=lam["reused"] + summary["reused"],
                       seconds=round(lam["seconds"] + summary["seconds"], 2),
                       cpu_seconds=round(lam["cpu_seconds"] + summary["cpu_seconds"], 2),
                       cpu_seconds_spent=round(lam["cpu_seconds_spent"] + summary["cpu_seconds_spent"], 2),
                       nodes=lam["nodes"],
                       lambda_search={k: lam[k] for k in ("evaluations", "seconds", "cpu_seconds", "chosen_sparsity",
                                                          "experiment_path")})
        return summary
