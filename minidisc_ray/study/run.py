"""``minidisc study``: plans the trials (paths, arms, direct KD, sandwich; then two-assistant chains), runs them as
Tune experiments, and writes the analysis (``study.{json,md,png}``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.config import Config
from minidisc_ray.errors import JobFailed, UserInputError
from minidisc_ray.logs import log
from minidisc_ray.outputs import check_run_output, one_job
from minidisc_ray.pipeline import Prepared, prepare
from minidisc_ray.records import EvaluationStore, machine
from minidisc_ray.report import write_study
from minidisc_ray.search.arms import HalvingPayload
from minidisc_ray.search.arms import make_payload as make_halving_payload
from minidisc_ray.search.driver import resources_check, search_payload
from minidisc_ray.search.replay import bisection_order
from minidisc_ray.study.analyse import analyse, compare_two
from minidisc_ray.study.records import SeedRecord, pick_candidates, seed_records
from minidisc_ray.study.replay import HalvingReplay
from minidisc_ray.study.trials import KEPT_FIELDS, StudyPayload, StudyUnit, study_trial
from minidisc_ray.tradeoff import Tradeoff, best_index
from minidisc_ray.tune_experiment import TrialLog, experiment_name, experiment_path, run_experiment


@one_job
def run_study(cfg: Config, output_dir: str | Path, seeds: int = 3, candidates: int | None = None,
              sandwich: bool = True, command: str = "", assistants: int = 1) -> dict[str, Any]:
    """``minidisc study``: every trial on Ray Tune, then ``study.json``, ``study.md`` and ``study.png``."""
    check_arguments(seeds=seeds, candidates=candidates, assistants=assistants)
    if cfg.pruning.by_budget and sandwich:  # its shared network nests widths: hidden and depth shapes are not nested
        log("[study] pruning.axes cuts hidden or depth: the sandwich trials are left out (its one network nests "
            "head and FFN widths only)")
        sandwich = False
    grid = pick_candidates(list(cfg.pruning.grid), candidates, cfg.pruning.student_sparsity)
    out = check_run_output(output_dir)
    t_start = time.perf_counter()
    prep = prepare(cfg, out, on_inputs_checked=resources_check(cfg, ["grid"]))
    payload = search_payload(prep, None)
    hp, rungs = arm_payload(payload, cfg)
    sp = StudyPayload(payload, cfg.distill, grid, cfg.pruning.importance_samples, cfg.pruning.batch_size, cfg.seed, hp)
    seed_list = [cfg.seed + k for k in range(seeds)]
    units = plan_units(grid, seed_list, sandwich=sandwich, student_sparsity=cfg.pruning.student_sparsity)
    trials = StudyTrials(cfg, out, sp, total=len(units))
    payload.finished = trials.recorded(units)
    steps = len(grid) * (2 * cfg.recovery.steps + 2 * cfg.distill.steps + rungs[-1]) + (
        2 * cfg.distill.steps if any(u["kind"] == "direct" for u in units) else 0)
    log(f"[study] {len(grid)} candidates {grid} x {seeds} seed(s): {len(units)} trials "
        f"(~{steps * seeds} training steps at batch {cfg.distill.batch_size}"
        f"{', plus the sandwich' if sandwich else ''}); {len(payload.finished)} recorded by an earlier run")
    recorded_before = len(payload.finished)
    # phase 1: paths, arms, direct KD and sandwich
    results = trials.fit(units, "trials")
    records = seed_records(sp, results, seed_list, grid, cfg.pruning.student_sparsity)
    two: list[StudyUnit] = []
    if assistants >= 2:  # phase 2: the chain with two assistants, as minidisc run would schedule them per seed
        two, found, done = run_two_assistants(trials, records, grid, cfg)
        recorded_before += found
        results.update(done)
    analysis = analyse(records, grid, lam=cfg.pruning.lam, teacher_metric=prep.teacher_metrics["metric"],
                       chance=payload.chance_metric, points_per_round=cfg.search.points_per_round,
                       optuna_budget=cfg.search.optuna_trials,
                       optuna_seed=cfg.search.optuna_seed if cfg.search.optuna_seed is not None else cfg.seed,
                       halving=halving_replay(cfg, grid, rungs))
    if two:
        analysis["two_assistants"] = compare_two(records, grid, [results[sp.key(u)] for u in two])
    data = study_data(cfg, prep, grid=grid, analysis=analysis, results=results, command=command,
                      seconds=round(time.perf_counter() - t_start, 1), recorded_before=recorded_before)
    write_study(data, out)
    log(f"[study] done in {data['seconds']:.0f}s; wrote {out / 'study.json'}, study.md, study.png")
    return data


class StudyTrials:
    """The study's Tune experiments over its trial records (``OUTPUT/evaluations``): which trials are recorded
    already, and one experiment per phase for the rest, each trial recorded as it finishes."""

    def __init__(self, cfg: Config, out: Path, sp: StudyPayload, total: int) -> None:
        self.cfg, self.out, self.sp = cfg, out, sp
        self.store = EvaluationStore(out / "evaluations")
        self.progress = Progress(total=total)
        self.storage = experiment_path(cfg, out, "").rstrip("/")

    def recorded(self, units: list[StudyUnit]) -> dict[str, dict[str, Any]]:
        """The records of ``units`` found in the store, by key."""
        return {k: r for u in units if (r := self.store.get(k := self.sp.key(u))) is not None}

    def fit(self, todo: list[StudyUnit], phase: str) -> dict[str, dict[str, Any]]:
        """Run ``todo`` as one Tune experiment (recorded ones are reported, not trained); their records, by key."""
        # the payload goes to the trials as it is now: with the records found for this phase (a trainable made
        # once before the first phase would hand the second phase's trials none, and they would train again)
        cfg = self.cfg
        name = experiment_name(f"study-{phase}")
        run_experiment(study_trial, payload=self.sp,
                       resources={"cpu": cfg.search.trial_cpus, "gpu": cfg.search.trial_gpus},
                       cfg=cfg, output_dir=self.out, name=name, param_space={"unit": tune.grid_search(todo)},
                       callbacks=[RecordTrials(self.store, self.progress)])
        done = self.recorded(todo)
        missing = [u for u in todo if self.sp.key(u) not in done]
        if missing:
            raise JobFailed(f"study: {len(missing)} of {len(todo)} trials failed (first: {missing[0]}); rerun the "
                            f"same command to retry them (finished ones are recorded in {self.store.directory}); "
                            f"Ray's logs: {self.storage}/{name}")
        return done


@dataclass
class Progress:
    """The study's trials so far, over every phase: reported (``seen``) of ``total``."""

    total: int
    seen: int = 0


class RecordTrials(TrialLog):
    """Records each trial's result as it arrives (what :data:`KEPT_FIELDS` keeps) and logs it in one line."""

    def __init__(self, store: EvaluationStore, progress: Progress) -> None:
        super().__init__()
        self.store, self.progress = store, progress

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        self.progress.seen += 1
        if not result.get("reused") and result.get("eval_key"):
            keep = {k: v for k, v in result.items() if k in KEPT_FIELDS}
            self.store.put(result["eval_key"], keep)
        took = " (recorded)" if result.get("reused") else f" ({result.get('seconds', 0.0):.0f}s)"
        log(f"[study] {self.progress.seen}/{self.progress.total} seed {result.get('seed')} {trial_line(result)}{took}")


def trial_line(result: dict[str, Any]) -> str:
    """What a trial measured, in a few words for the log."""
    a = result.get("assistant_metric")
    if result.get("kind") == "path":
        return (f"s={result['sparsity']:.2f}: candidate {result['candidate_metric']:.4f}, assistant "
                f"{'-' if a is None else format(a, '.4f')}, student {result['metric']:.4f}")
    if result.get("kind") == "arm":
        return (f"halving arm s={result['sparsity']:.2f}: student {result['metric']:.4f} after "
                f"{result.get('student_steps')} link steps")
    return f"{result.get('kind')}: {result.get('metric', float('nan')):.4f}"


def run_two_assistants(trials: StudyTrials, records: list[SeedRecord], grid: list[float],
                       cfg: Config) -> tuple[list[StudyUnit], int, dict[str, dict[str, Any]]]:
    """Phase 2: the chains with two assistants, as minidisc run would schedule them per seed (those recorded by an
    earlier run handed to the trials); their units, how many were recorded before, and their records."""
    payload = trials.sp.search
    two = _two_assistant_units(records, grid, payload.tradeoff, cfg)
    found = trials.recorded(two)
    payload.finished.update(found)
    if not two:
        return two, len(found), {}
    trials.progress.total += len(two)
    log(f"[study] two assistants: {len(two)} trial(s), chains {[u['sparsities'] for u in two]}")
    return two, len(found), trials.fit(two, "two-assistants")


def check_arguments(*, seeds: int, candidates: int | None, assistants: int) -> None:
    """Refuse the command's arguments a study cannot run with, before anything starts."""
    if seeds < 1:
        raise UserInputError("--seeds", seeds, "use 1 or more (3 gives intervals worth reading)")
    if candidates is not None and candidates < 2:
        raise UserInputError("--candidates", candidates, "use at least 2 (the two ends of the grid)")
    if assistants not in (1, 2):
        raise UserInputError("--assistants", assistants, "use 1, or 2 to compare chains with two assistants")


def arm_payload(payload: SearchPayload, cfg: Config) -> tuple[HalvingPayload, list[int]]:
    """The halving arms' payload, their student evaluated at the configured rungs and every distill.eval_every, so
    that successive halving (halving, auto) is replayed on what its arms really train; and the configured rungs."""
    hp = make_halving_payload(payload, cfg)
    rungs = list(hp.rungs)
    hp.rungs = sorted(set(rungs) | set(range(cfg.distill.eval_every, hp.rungs[-1] + 1, cfg.distill.eval_every)))
    return hp, rungs


def plan_units(grid: list[float], seeds: list[int], *, sandwich: bool,
               student_sparsity: float | None = None) -> list[StudyUnit]:
    """Phase 1's trials: per seed a path through every candidate, direct KD, every candidate's halving arm and
    (with ``sandwich``) the sandwich. Direct KD is trained once per seed: where the student's own sparsity is on
    the grid, its path ("no assistant": teacher -> student at the TA path's total steps, the same run with the
    same seed) is the direct-KD row, and no ``direct`` trial is planned."""
    units: list[StudyUnit] = [{"kind": "path", "sparsity": s, "seed": j} for j in seeds for s in grid]
    if student_sparsity not in grid:
        units += [{"kind": "direct", "seed": j} for j in seeds]
    units += [{"kind": "arm", "sparsity": s, "seed": j} for j in seeds for s in grid]
    if sandwich:
        units += [{"kind": "sandwich", "seed": j} for j in seeds]
    return units


def halving_replay(cfg: Config, grid: list[float], rungs: list[int]) -> HalvingReplay:
    """How the analysis replays halving and auto: the study's stage, reduction, rungs and shortlist, and "no
    assistant" (the grid index of the student's own sparsity, if it is on the grid)."""
    s_student = cfg.pruning.student_sparsity
    return {"stage_steps": cfg.distill.steps, "reduction": cfg.search.halving_reduction, "rungs": rungs,
            "shortlist": cfg.search.shortlist, "no_assistant": grid.index(s_student) if s_student in grid else None}


def study_data(cfg: Config, prep: Prepared, *, grid: list[float], analysis: dict[str, Any],
               results: dict[str, dict[str, Any]], command: str, seconds: float,
               recorded_before: int) -> dict[str, Any]:
    """The content of ``study.json``: the job, the budgets, the analysis and the trials' times."""
    return {"command": command, "machine": machine(), "metric_name": prep.task.metric, "data": prep.task.describe(),
            "teacher": {"metric": prep.teacher_metrics["metric"], "params": prep.total, "path": prep.teacher_dir},
            "grid": grid, "student_sparsity": cfg.pruning.student_sparsity,
            "budget": {"recovery_steps": cfg.recovery.steps, "stage_steps": cfg.distill.steps,
                       "direct_kd_steps": 2 * cfg.distill.steps, "batch_size": cfg.distill.batch_size,
                       "eval_every": cfg.distill.eval_every, "patience": cfg.distill.patience},
            **analysis, "seconds": seconds,
            "trials": len(results), "trials_recorded_before": recorded_before,
            "trial_seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 1),
            "trial_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in results.values()), 1),
            "config": cfg.to_dict()}


def _two_assistant_units(records: list[SeedRecord], grid: list[float], scorer: Tradeoff,
                         cfg: Config) -> list[StudyUnit]:
    """Per seed, the two-assistant chain ``minidisc run`` with ``pruning.assistants: 2`` would schedule:
    TA 1 = the bisection's pick on that seed's curve, TA 2 = the best tradeoff among the candidates
    between TA 1 and the student (ranked by the same seed's scores of candidates cut from the teacher,
    where the run would search again below the distilled TA 1). Seeds without room for TA 2 are left out."""
    out: list[StudyUnit] = []
    for rec in records:
        curve = [scorer(m, a) for m, a in zip(rec.metric, rec.actual, strict=True)]
        first = grid[bisection_order(curve, cfg.search.points_per_round)[1]]
        below = [i for i, s in enumerate(grid) if first < s < cfg.pruning.student_sparsity]
        if not below:
            continue
        second = below[best_index([curve[i] for i in below]) or 0]
        out.append({"kind": "two", "seed": rec.seed, "sparsities": [first, grid[second]]})
    return out


