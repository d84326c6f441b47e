"""``search.strategy: optuna-kd``: Optuna TPE over the same arms as the halving round, each trial an arm distilled
rung by rung in a Ray actor, pruned by Optuna's Hyperband or successive-halving pruner on the student's dev metric
(the real objective), the study kept in an RDB (``search.optuna_storage``) and resumed on a rerun."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import optuna
import ray

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.config import Config
from minidisc_ray.keys import OPTUNA
from minidisc_ray.logs import log
from minidisc_ray.outputs import run_dir_id
from minidisc_ray.pipeline import Prepared
from minidisc_ray.ray_env import resolved
from minidisc_ray.records import EvaluationStore, digest
from minidisc_ray.report import evidence_lines
from minidisc_ray.search.arms import ArmRun, HalvingPayload, arm_name, record_rung, with_records
from minidisc_ray.search.halving import summarise
from minidisc_ray.search.summary import trial_distillation_summary
from minidisc_ray.search.trial import _threads


class _ArmActor:
    """An :class:`ArmRun` in a Ray actor: keeps the arm's student between the rungs Optuna asks for."""

    def __init__(self, hp: HalvingPayload, arm: float) -> None:
        _threads()
        self.run = ArmRun(resolved(hp), arm)

    def advance(self, rung: int, evaluate_it: bool = True) -> dict[str, Any] | None:
        return self.run.advance(rung, evaluate_it)


def optuna_kd_study_name(cfg: Config, payload: SearchPayload, hp: HalvingPayload, arms: list[float],
                         output_dir: Path) -> str:
    """The ``optuna-kd`` study of ``arms``: named by what determines its trials (the teacher and data, the arms and
    their rungs, and the config fields the key table names for Optuna studies) and by the job's output directory
    (one study per job, as :func:`minidisc_ray.search.driver.optuna_study_name`)."""
    se = cfg.search
    seed = se.optuna_seed if se.optuna_seed is not None else cfg.seed
    return "minidisc-kd-" + digest(payload.context_key, arms, hp.rungs, se.optuna_pruner, se.halving_reduction, seed,
                                   hp.lr, hp.batch_size, payload.recovery, payload.config_keys.get(OPTUNA, ""),
                                   str(Path(output_dir).resolve()), run_dir_id(output_dir))[:16]


def _open_study(cfg: Config, payload: SearchPayload, hp: HalvingPayload, output_dir: Path,
                arms: list[float]) -> tuple[optuna.Study, optuna.storages.RDBStorage, str, str]:
    """(study, its RDB storage, the storage URL, the study name): the persistent study of these arms, named by
    what determines its trials, created or loaded to resume."""
    se = cfg.search
    logging.getLogger("optuna").setLevel(logging.WARNING)
    url = se.optuna_storage or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    seed = se.optuna_seed if se.optuna_seed is not None else cfg.seed
    name = optuna_kd_study_name(cfg, payload, hp, arms, output_dir)
    if se.optuna_pruner == "successive-halving":
        pruner: optuna.pruners.BasePruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=hp.rungs[0], reduction_factor=se.halving_reduction)
    else:
        pruner = optuna.pruners.HyperbandPruner(min_resource=hp.rungs[0], max_resource=hp.rungs[-1],
                                                reduction_factor=se.halving_reduction)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, len(arms)))
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=sampler, pruner=pruner)
    return study, storage, url, name


def _trials_done(study: optuna.Study, storage: optuna.storages.RDBStorage) -> int:
    """How many of the study's trials completed or were pruned; a killed search's RUNNING trials are marked FAIL."""
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:  # a killed search's trial
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        elif t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            done += 1
    return done


class _Objective:
    """Optuna's objective: one arm distilled rung by rung in a Ray actor (recorded rungs from the record), the
    student's dev metric reported per rung; keeps the rows it reported and the CPU-seconds it trained."""

    def __init__(self, hp: HalvingPayload, store: EvaluationStore, arms: list[float], student_sparsity: float,
                 trial_cpus: float, trial_gpus: float) -> None:
        self.hp, self.store, self.arms, self.s_student = hp, store, arms, student_sparsity
        self.actor_cls: Any = ray.remote(num_cpus=trial_cpus, num_gpus=trial_gpus)(_ArmActor)
        self.rows: list[dict[str, Any]] = []
        self.trained_cpu = 0.0

    def _rung(self, arm: float, i: int, actor: Any) -> tuple[dict[str, Any], Any]:
        """Rung ``i`` trained in the arm's actor (started here, trained through the recorded rungs, when
        ``actor`` is None) and recorded; (its result, the actor)."""
        if actor is None:
            actor = self.actor_cls.remote(self.hp, arm)
            if i > 0:
                ray.get(actor.advance.remote(i - 1, False))
        result = ray.get(actor.advance.remote(i))
        self.trained_cpu += float(result.get("cpu_seconds", 0.0))
        record_rung(self.store, self.hp.rung_key(arm, i), arm, result)
        return result, actor

    def __call__(self, trial: optuna.Trial) -> float:
        hp = self.hp
        arm = float(trial.suggest_categorical("arm", list(self.arms)))
        recorded = ArmRun(hp, arm).recorded()
        actor: Any = None
        result: dict[str, Any] = {}
        try:
            for i in range(len(hp.rungs)):
                if i < len(recorded):
                    result = recorded[i]
                else:
                    result, actor = self._rung(arm, i, actor)
                self.rows.append({"arm": arm, "rung": i + 1, "student_metric": result["student_metric"],
                                  "student_steps": hp.rungs[i], "trial": trial.number,
                                  "dev_correct": result.get("dev_correct")})
                log(f"[optuna-kd] trial {trial.number} {arm_name(arm, self.s_student)} rung {i + 1}/{len(hp.rungs)}: "
                    f"student {result['student_metric']:.4f}{' (recorded)' if i < len(recorded) else ''}")
                trial.report(result["student_metric"], hp.rungs[i])
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return float(result["student_metric"])
        finally:
            if actor is not None:
                ray.kill(actor)


def run_optuna_kd(prep: Prepared, payload: SearchPayload, output_dir: Path, arms: list[float],
                  strategy: str = "optuna-kd") -> dict[str, Any]:
    """Optuna on the real objective: TPE over the arms, the student's dev metric reported per rung with
    ``trial.report`` and cut by Optuna's pruner (``search.optuna_pruner``: ``HyperbandPruner`` or
    ``SuccessiveHalvingPruner``), in the persistent RDB study (``search.optuna_storage``, default
    ``OUTPUT/optuna.db``). Each trial's arm runs in a Ray actor on the cluster; ``search.max_concurrent_trials``
    trials at a time. Rungs are recorded and reused exactly as ``halving``'s (same keys)."""

    cfg = prep.cfg
    se = cfg.search
    hp, store = with_records(payload, cfg, output_dir, arms)
    s_student = cfg.pruning.student_sparsity
    study, storage, url, name = _open_study(cfg, payload, hp, output_dir, arms)
    done = _trials_done(study, storage)
    todo = max(0, se.optuna_trials - done)
    log(f"[optuna-kd] study {name}: {done} trial(s) done, {todo} to run over {len(arms)} arms; rungs {hp.rungs} "
        f"student steps; {se.optuna_pruner} pruner")
    objective = _Objective(hp, store, arms, s_student, se.trial_cpus, se.trial_gpus)
    t0 = time.perf_counter()
    if todo:
        study.optimize(objective, n_trials=todo, n_jobs=max(1, se.max_concurrent_trials), catch=())
    wall = time.perf_counter() - t0
    dev_rows = len(prep.dev)
    all_rows = objective.rows or [{"arm": t.params["arm"], "rung": len(t.intermediate_values),
                                   "student_metric": list(t.intermediate_values.values())[-1],
                                   "student_steps": list(t.intermediate_values)[-1], "trial": t.number}
                                  for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    h = summarise(all_rows, hp.rungs, prep.task.metric, dev_rows, s_student)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    h.update(arms=[float(a) for a in arms], scheduler=f"optuna {se.optuna_pruner}", reduction=se.halving_reduction,
             first_link_steps=payload.recovery.steps, dev_rows=dev_rows, study=name,
             trials={s: states.count(s) for s in sorted(set(states))})
    for line in evidence_lines(h, prep.task.metric):
        log(f"[optuna-kd] {line}")
    return trial_distillation_summary(
        prep, strategy, h, evaluations=todo, reused=0, failed=states.count("FAIL"), seconds=wall,
        cpu_seconds=objective.trained_cpu, cpu_seconds_spent=objective.trained_cpu, experiment_path=url)
