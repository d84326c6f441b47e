"""``minidisc study``: plans the trials (paths, arms, direct KD, sandwich; then two-assistant chains), runs them as
Tune experiments, and writes the analysis (``study.{json,md,png}``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import tune

from minidisc_ray.config import Config
from minidisc_ray.errors import JobFailed, UserInputError
from minidisc_ray.logs import log
from minidisc_ray.outputs import check_run_output
from minidisc_ray.pipeline import prepare
from minidisc_ray.records import EvaluationStore, machine
from minidisc_ray.report import write_study
from minidisc_ray.search.arms import make_payload as make_halving_payload
from minidisc_ray.search.driver import resources_check, search_payload
from minidisc_ray.search.replay import bisection_order
from minidisc_ray.study.analyse import analyse, compare_two
from minidisc_ray.study.records import SeedRecord, pick_candidates, seed_records
from minidisc_ray.study.trials import KEPT_FIELDS, StudyPayload, study_trial
from minidisc_ray.tradeoff import Tradeoff, best_index
from minidisc_ray.tune_experiment import TrialLog, experiment_name, experiment_path, run_experiment


def run_study(cfg: Config, output_dir: str | Path, seeds: int = 3, candidates: int | None = None,
              sandwich: bool = True, command: str = "", assistants: int = 1) -> dict[str, Any]:
    """``minidisc study``: every trial on Ray Tune, then ``study.json``, ``study.md`` and ``study.png``."""
    if seeds < 1:
        raise UserInputError("--seeds", seeds, "use 1 or more (3 gives intervals worth reading)")
    if candidates is not None and candidates < 2:
        raise UserInputError("--candidates", candidates, "use at least 2 (the two ends of the grid)")
    if assistants not in (1, 2):
        raise UserInputError("--assistants", assistants, "use 1, or 2 to compare chains with two assistants")
    grid = pick_candidates(list(cfg.pruning.grid), candidates, cfg.pruning.student_sparsity)
    out = check_run_output(output_dir)
    t_start = time.perf_counter()
    prep = prepare(cfg, out, on_inputs_checked=resources_check(cfg, ["grid"]))
    payload = search_payload(prep, None)
    # the halving arms: their student evaluated at the configured rungs and every distill.eval_every, so that
    # successive halving (halving, auto) is replayed on what its arms really train
    hp = make_halving_payload(payload, cfg)
    rungs = list(hp.rungs)
    hp.rungs = sorted(set(rungs) | set(range(cfg.distill.eval_every, hp.rungs[-1] + 1, cfg.distill.eval_every)))
    sp = StudyPayload(payload, cfg.distill, grid, cfg.pruning.importance_samples, cfg.pruning.batch_size, cfg.seed, hp)
    seed_list = [cfg.seed + k for k in range(seeds)]
    units = [{"kind": "path", "sparsity": s, "seed": j} for j in seed_list for s in grid]
    units += [{"kind": "direct", "seed": j} for j in seed_list]
    units += [{"kind": "arm", "sparsity": s, "seed": j} for j in seed_list for s in grid]
    if sandwich:
        units += [{"kind": "sandwich", "seed": j} for j in seed_list]
    store = EvaluationStore(out / "evaluations")
    payload.finished = {k: r for u in units if (r := store.get(k := sp.key(u))) is not None}
    steps = len(grid) * (2 * cfg.recovery.steps + 2 * cfg.distill.steps + rungs[-1]) + 2 * cfg.distill.steps
    log(f"[study] {len(grid)} candidates {grid} x {seeds} seed(s): {len(units)} trials "
        f"(~{steps * seeds} training steps at batch {cfg.distill.batch_size}"
        f"{', plus the sandwich' if sandwich else ''}); {len(payload.finished)} recorded by an earlier run")
    recorded_before = len(payload.finished)
    seen: list[int] = [0]

    class Record(TrialLog):
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            seen[0] += 1
            if not result.get("reused") and result.get("eval_key"):
                keep = {k: v for k, v in result.items() if k in KEPT_FIELDS}
                store.put(result["eval_key"], keep)
            a = result.get("assistant_metric")
            what = (f"s={result['sparsity']:.2f}: candidate {result['candidate_metric']:.4f}, assistant "
                    f"{'-' if a is None else format(a, '.4f')}, student "
                    f"{result['metric']:.4f}" if result.get("kind") == "path" else
                    f"halving arm s={result['sparsity']:.2f}: student {result['metric']:.4f} after "
                    f"{result.get('student_steps')} link steps" if result.get("kind") == "arm" else
                    f"{result.get('kind')}: {result.get('metric', float('nan')):.4f}")
            took = " (recorded)" if result.get("reused") else f" ({result.get('seconds', 0.0):.0f}s)"
            log(f"[study] {seen[0]}/{len(units)} seed {result.get('seed')} {what}{took}")

    storage = experiment_path(cfg, out, "").rstrip("/")

    def fit(todo: list[dict[str, Any]], phase: str) -> dict[str, dict[str, Any]]:
        # the payload goes to the trials as it is now: with the records found for this phase (a trainable made
        # once before the first phase would hand the second phase's trials none, and they would train again)
        name = experiment_name(f"study-{phase}")
        run_experiment(study_trial, payload=sp, resources={"cpu": cfg.search.trial_cpus, "gpu": cfg.search.trial_gpus},
                       cfg=cfg, output_dir=out, name=name,
                       param_space={"unit": tune.grid_search(todo)}, callbacks=[Record()])
        done = {k: r for u in todo if (r := store.get(k := sp.key(u))) is not None}
        missing = [u for u in todo if sp.key(u) not in done]
        if missing:
            raise JobFailed(f"study: {len(missing)} of {len(todo)} trials failed (first: {missing[0]}); rerun the "
                            f"same command to retry them (finished ones are recorded in {store.directory}); Ray's "
                            f"logs: {storage}/{name}")
        return done

    results = fit(units, "trials")
    records = seed_records(sp, units, results, seed_list, grid)
    scorer = payload.tradeoff
    two: list[dict[str, Any]] = []
    if assistants >= 2:  # phase 2: the chain with two assistants, as minidisc run would schedule them per seed
        two = _two_assistant_units(records, grid, scorer, cfg)
        found = {k: r for u in two if (r := store.get(k := sp.key(u))) is not None}
        payload.finished.update(found)
        recorded_before += len(found)
        if two:
            units += two
            log(f"[study] two assistants: {len(two)} trial(s), chains {[u['sparsities'] for u in two]}")
            results.update(fit(two, "two-assistants"))
    analysis = analyse(records, grid, cfg.pruning.lam, prep.teacher_metrics["metric"], payload.chance_metric,
                       cfg.search.points_per_round, cfg.search.optuna_trials,
                       cfg.search.optuna_seed if cfg.search.optuna_seed is not None else cfg.seed,
                       halving={"stage_steps": cfg.distill.steps, "reduction": cfg.search.halving_reduction,
                                "rungs": rungs,
                                "shortlist": cfg.search.shortlist,
                                "no_assistant": grid.index(s_student) if (s_student := cfg.pruning.student_sparsity)
                                in grid else None})
    if two:
        analysis["two_assistants"] = compare_two(records, grid, [results[sp.key(u)] for u in two])
    data = {"command": command, "machine": machine(), "metric_name": prep.task.metric, "data": prep.task.describe(),
            "teacher": {"metric": prep.teacher_metrics["metric"], "params": prep.total, "path": prep.teacher_dir},
            "grid": grid, "student_sparsity": cfg.pruning.student_sparsity,
            "budget": {"recovery_steps": cfg.recovery.steps, "stage_steps": cfg.distill.steps,
                       "direct_kd_steps": 2 * cfg.distill.steps, "batch_size": cfg.distill.batch_size,
                       "eval_every": cfg.distill.eval_every, "patience": cfg.distill.patience},
            **analysis, "seconds": round(time.perf_counter() - t_start, 1),
            "trials": len(results), "trials_recorded_before": recorded_before,
            "trial_seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 1),
            "trial_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in results.values()), 1),
            "config": cfg.to_dict()}
    write_study(data, out)
    log(f"[study] done in {data['seconds']:.0f}s; wrote {out / 'study.json'}, study.md, study.png")
    return data


def _two_assistant_units(records: list[SeedRecord], grid: list[float], scorer: Tradeoff,
                         cfg: Config) -> list[dict[str, Any]]:
    """Per seed, the two-assistant chain ``minidisc run`` with ``pruning.assistants: 2`` would schedule:
    TA 1 = the bisection's pick on that seed's curve, TA 2 = the best tradeoff among the candidates
    between TA 1 and the student (ranked by the same seed's scores of candidates cut from the teacher,
    where the run would search again below the distilled TA 1). Seeds without room for TA 2 are left out."""
    out = []
    for rec in records:
        curve = [scorer(m, a) for m, a in zip(rec.metric, rec.actual, strict=True)]
        first = grid[bisection_order(curve, cfg.search.points_per_round)[1]]
        below = [i for i, s in enumerate(grid) if first < s < cfg.pruning.student_sparsity]
        if not below:
            continue
        second = below[best_index([curve[i] for i in below]) or 0]
        out.append({"kind": "two", "seed": rec.seed, "sparsities": [first, grid[second]]})
    return out


