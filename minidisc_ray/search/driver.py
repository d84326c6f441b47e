"""Search drivers: run one strategy (``minidisc search``, and the search of ``minidisc run``) or several side
by side (``minidisc compare``), record every evaluation as it arrives, and summarise.

The strategies themselves live in :mod:`minidisc_ray.strategies` (one module each: bisection,
grid and exhaustive, optuna, sandwich, and the trial-distillation ones: halving, auto, optuna-kd);
:func:`run_tune` runs those that are a Tune experiment over the candidates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune import ResultGrid
from torch import nn

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.config import Config
from minidisc_ray.errors import JobFailed, UserInputError
from minidisc_ray.keys import OPTUNA
from minidisc_ray.logs import log
from minidisc_ray.offline import ensure_targets, with_row_ids
from minidisc_ray.outputs import check_run_output, one_job, run_dir_id, write_json
from minidisc_ray.pipeline import Prepared, prepare
from minidisc_ray.pruning import plan_for_sparsity, prune_model
from minidisc_ray.ray_env import (
    check_resources,
    ensure_ray,
    shared_ref,
)
from minidisc_ray.records import EvaluationStore, digest
from minidisc_ray.report import write_compare
from minidisc_ray.search.halving import run_halving, shortlist
from minidisc_ray.search.optuna_kd import run_optuna_kd
from minidisc_ray.search.searcher import SandwichBisectionSearcher
from minidisc_ray.search.summary import cluster_resources, summary_head, trials_started_again
from minidisc_ray.search.train_trial import TRIAL_CPU
from minidisc_ray.search.trial import candidate_trial, sandwich_trial
from minidisc_ray.strategies import REGISTRY, Machinery, Strategy, get_strategy
from minidisc_ray.tracking import tune_callback
from minidisc_ray.tune_experiment import TrialLog, experiment_name, experiment_path, run_experiment

# what the strategies run with (they import none of it: see minidisc_ray.strategies.base.Machinery)
MACHINERY = Machinery(candidate_trial=candidate_trial, sandwich_trial=sandwich_trial, run_halving=run_halving,
                      run_optuna_kd=run_optuna_kd, shortlist=shortlist, bisection_searcher=SandwichBisectionSearcher)


def search_payload(prep: Prepared, events_path: str | None, output_dir: Path | None = None) -> SearchPayload:
    """The job's :class:`SearchPayload` with the teacher and its data in the object store (once per job).

    With ``teacher.placement: offline`` (and an ``output_dir`` to keep them in) the candidates recover on the
    teacher's stored top-k targets (:mod:`minidisc_ray.offline`, one Ray Data pass, reused); their
    evaluations are recorded under keys of their own."""
    payload = SearchPayload.from_prepared(prep, events_path, share=shared_ref)
    tc = prep.cfg.teacher
    if tc.placement != "offline" or output_dir is None:
        return payload

    table = prep.train.with_format(None).data.table
    where, _ = ensure_targets(output_dir, payload.teacher_blob, payload.teacher_fp, table, prep.data_key,
                              prep.tokenizer, tc.top_k, prep.cfg.recovery.temperature,
                              use_gpu=prep.cfg.search.trial_gpus > 0, who="search")
    return dataclasses.replace(payload, offline_targets=str(where),
                               train_table=shared_ref("train_rows", prep.data_key, lambda: with_row_ids(table)),
                               context_key=digest(payload.context_key, "offline", tc.top_k))


def _finished(payload: SearchPayload, store: EvaluationStore, grid: list[float]) -> dict[str, dict[str, Any]]:
    """The recorded evaluations this search could need (every kind, every grid point)."""
    keys = [payload.evaluation_key(kind, s) for kind in ("candidate", "exhaustive") for s in grid]
    keys.append(payload.evaluation_key("sandwich", grid))
    return {k: r for k in keys if (r := store.get(k)) is not None}


class RecordEvaluations(TrialLog):
    """A Tune callback (driver side) that records every evaluation the moment its result arrives, and
    prints the live table of candidates (one line per result, the best so far marked)."""

    KEPT = ("sparsity", "param_sparsity", "metric", "prunable", "params", "recovery_loss", "seconds", "cpu_seconds",
            "student_metric", "student_params", "candidates", "recovered_sha256")

    def __init__(self, store: EvaluationStore, expected: int | None = None) -> None:
        self.store, self.expected = store, expected
        self.seen: list[dict[str, Any]] = []

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        self._progress(result)
        if result.get("reused") or not result.get("eval_key"):
            return
        record = {k: result[k] for k in self.KEPT if k in result}
        self.store.put(result["eval_key"], record)
        if result.get("candidate_key"):
            self.store.put(result["candidate_key"], {k: v for k, v in record.items()
                                                     if k not in ("student_metric", "student_params")})

    def _progress(self, result: dict[str, Any]) -> None:
        if "tradeoff" not in result or "sparsity" not in result:
            return
        self.seen.append(result)
        best = max(self.seen, key=lambda r: (r["tradeoff"], r["sparsity"]))
        of = f"/{self.expected}" if self.expected else ""
        extra = f", student {result['student_metric']:.4f}" if "student_metric" in result else ""
        log(f"[search] {len(self.seen)}{of} s={result['sparsity']:.2f}: metric {result['metric']:.4f}{extra}, "
            f"tradeoff {result['tradeoff']:.4f}{' (recorded)' if result.get('reused') else ''} "
            f"({result.get('seconds', 0.0):.0f}s) | best so far s={best['sparsity']:.2f} ({best['tradeoff']:.4f})")


def optuna_study_name(cfg: Config, payload: SearchPayload, output_dir: Path) -> str:
    """The ``optuna`` strategy's study: named by what determines its trials (the teacher and data, and the config
    fields the key table names for Optuna studies: grid, lambda, tradeoff form, recovery, sampler seed...) and by
    the job's output directory: one study per job, which its rerun continues and no other job touches (a job
    marks the trials its killed predecessor left RUNNING as failed: with one job per directory, they are dead)."""
    seed = cfg.search.optuna_seed if cfg.search.optuna_seed is not None else cfg.seed
    return "minidisc-" + digest(payload.context_key, sorted(cfg.pruning.grid), cfg.pruning.lam, cfg.recovery,
                                seed, payload.layout,
                                *(() if cfg.pruning.tradeoff == "paper" else (cfg.pruning.tradeoff,)),
                                payload.config_keys.get(OPTUNA, ""), str(Path(output_dir).resolve()),
                                run_dir_id(output_dir))[:16]


def optuna_study(cfg: Config, payload: SearchPayload, output_dir: Path
                 ) -> tuple[optuna.storages.RDBStorage, str, list[float]]:
    """(RDB storage, study name, sparsities the study already completed) of this search's Optuna study.

    The study is named by what determines its trials (teacher, data, importance, grid, lambda, recovery
    budget, sampler seed), so a rerun after an interruption continues the same study with its history;
    trials a killed search left RUNNING are marked FAIL first.
    """
    url = cfg.search.optuna_storage or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    logging.getLogger("optuna").setLevel(logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    name = optuna_study_name(cfg, payload, output_dir)
    done: list[float] = []
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return storage, name, done
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        elif t.state == optuna.trial.TrialState.COMPLETE and "sparsity" in t.params:
            done.append(float(t.params["sparsity"]))
    return storage, name, done


def _rows(result_grid: ResultGrid, one_trial: bool) -> list[dict[str, Any]]:
    """One row per candidate scored (the sandwich's one trial: one per width), a failed trial's with its error;
    in the order they finished, numbered."""
    rows: list[dict[str, Any]] = []
    for i in range(len(result_grid)):
        res = result_grid[i]
        m = res.metrics or {}
        if res.error is not None or not m:
            s = (res.config or {}).get("sparsity")
            rows.append({"sparsity": s, "failed": True, "error": str(res.error)[:200] if res.error else "no result"})
            continue
        if one_trial:  # the sandwich: one trial scored every candidate
            cands = json.loads(m["candidates"])
            for c in cands:
                rows.append({**c, "seconds": m["seconds"] / len(cands), "cpu_seconds": m["cpu_seconds"] / len(cands),
                             "node": m.get("node"), "trial_id": m.get("trial_id"), "finished_at": m["finished_at"],
                             **({"reused": True} if m.get("reused") else {})})
            continue
        row = {k: m.get(k) for k in ("sparsity", "param_sparsity", "metric", "tradeoff", "prunable", "params",
                                     "seconds", "cpu_seconds", "node", "trial_id", "finished_at",
                                     "student_metric", "student_params", "reused")}
        rows.append({k: v for k, v in row.items() if v is not None})
    rows.sort(key=lambda r: r.get("finished_at", 0.0))
    for i, r in enumerate(rows):
        r["order"] = i + 1
    return rows


def run_strategy(prep: Prepared, payload: SearchPayload, output_dir: Path, strategy: str,
                 run_id: str = "") -> dict[str, Any]:
    """Run the strategy named ``strategy`` (:mod:`minidisc_ray.strategies`); returns the content of
    ``search.json``."""
    chosen = get_strategy(strategy)
    if chosen.tune_experiment:
        return with_shapes(run_tune(chosen, prep, payload, output_dir, run_id), payload)
    return with_shapes(chosen.run(prep, payload, output_dir, run_id,
                                  lambda name: run_strategy(prep, payload, output_dir, name, run_id), MACHINERY),
                       payload)


def with_shapes(summary: dict[str, Any], payload: SearchPayload) -> dict[str, Any]:
    """With ``pruning.axes`` beyond heads and FFN: each candidate's shape (layers, hidden, heads or KV groups, FFN,
    parameters) beside it, and every grid point's and the student's under ``shapes``."""
    if not payload.plans:
        return summary
    shapes = {s: plan.meta["arch"] for s, plan in sorted(payload.plans.items()) if "arch" in plan.meta}
    for c in summary.get("candidates", []):
        if c.get("sparsity") in shapes:
            c["shape"] = shapes[c["sparsity"]]
    return {**summary, "shapes": {f"{s:g}": a for s, a in shapes.items()}}


def _tune_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds: a multi-worker trial holds almost nothing itself (its Ray Train workers hold the
    trial's CPUs and GPUs)."""
    if cfg.search.trial_workers == 1:
        return {"cpu": cfg.search.trial_cpus, "gpu": cfg.search.trial_gpus}
    return {"cpu": TRIAL_CPU, "gpu": 0}


def _with_study_rows(rows: list[dict[str, Any]], payload: SearchPayload,
                     study: tuple[optuna.storages.RDBStorage, str, list[float]]) -> None:
    """The study's trials of an interrupted search, from the evaluation record, ahead of ``rows``; renumbered."""
    for s in study[2]:
        rec = payload.finished.get(payload.evaluation_key("candidate", s))
        if rec is not None and not any(r.get("sparsity") == s and r.get("reused") for r in rows):
            rows.insert(0, {**{k: rec.get(k) for k in ("sparsity", "param_sparsity", "metric", "tradeoff",
                                                       "prunable", "params", "seconds", "cpu_seconds",
                                                       "node") if k in rec},
                            "reused": True, "from_study": study[1]})
    for i, r in enumerate(rows):
        r["order"] = i + 1


def _tune_summary(strategy: Strategy, prep: Prepared, rows: list[dict[str, Any]], wall: float,
                  path: str) -> dict[str, Any]:
    """``search.json`` of a Tune strategy from its rows; every trial failed: :class:`JobFailed`."""
    name_ = strategy.name
    evaluated = [r for r in rows if not r.get("failed")]
    failed = [r for r in rows if r.get("failed")]
    if not evaluated:
        first = failed[0]["error"].strip().splitlines()[-1][:200] if failed else "no trial ran"
        raise JobFailed(f"search: every one of the {len(failed)} {name_} trial(s) failed, so no teacher assistant "
                        f"can be chosen (last line of the first error: {first}); see {path}")
    if failed:
        log(f"[search] warning: {len(failed)} of {len(rows)} trials failed; choosing among the {len(evaluated)} "
            "that finished")
    chosen = strategy.choose(rows)
    summary: dict[str, Any] = {
        **summary_head(prep, name_),
        "candidates": rows, "chosen_sparsity": chosen["sparsity"] if chosen else None, "chosen": chosen,
        "evaluations": len(rows) if not strategy.one_trial else 1,
        "reused": sum(1 for r in evaluated if r.get("reused")) if not strategy.one_trial
        else int(any(r.get("reused") for r in evaluated)),
        "failed": len(failed), "candidates_scored": len(evaluated), "seconds": round(wall, 2),
        "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) or 0.0 for r in rows), 2),
        "cpu_seconds_spent": round(sum(r.get("cpu_seconds", 0.0) or 0.0 for r in rows if not r.get("reused")), 2),
        "nodes": sorted({str(r.get("node")) for r in evaluated}), "experiment_path": str(path),
        "resources": cluster_resources(),
    }
    if summary["chosen_sparsity"] is not None and summary["chosen_sparsity"] >= prep.cfg.pruning.student_sparsity:
        summary["note"] = "the best candidate is the student's own sparsity: no teacher assistant is used"
    log(f"[search] {name_}: {summary['evaluations']} evaluations ({summary['reused']} reused from the record) "
        f"in {wall:.1f}s, chosen TA sparsity {summary['chosen_sparsity']}")
    return summary


def run_tune(strategy: Strategy, prep: Prepared, payload: SearchPayload, output_dir: Path,
             run_id: str = "") -> dict[str, Any]:
    """Run one strategy's Tune experiment over the candidates and summarise it.

    Evaluations recorded in ``OUTPUT/evaluations`` (by an earlier run, a killed run or another strategy)
    are reported from the record instead of trained again; the summary still counts them and their cost.
    """

    cfg = prep.cfg
    name_ = strategy.name
    store = EvaluationStore(output_dir / "evaluations")
    payload.finished = _finished(payload, store, sorted(cfg.pruning.grid))
    study = optuna_study(cfg, payload, output_dir) if strategy.uses_optuna_study else None
    if study is not None and study[2]:
        log(f"[search] Optuna study {study[1]} resumes with {len(study[2])} completed trial(s) of "
            f"{cfg.search.optuna_trials}")
    parts = strategy.tune_parts(cfg, study, MACHINERY)
    callbacks: list[tune.Callback] = [RecordEvaluations(store, strategy.expected_trials(cfg, parts))]
    mlflow_cb = tune_callback(cfg, output_dir, run_id, name_)
    if mlflow_cb is not None:
        callbacks.append(mlflow_cb)
    name = experiment_name(f"search-{name_}")
    path = experiment_path(cfg, output_dir, name)
    t0, started = time.perf_counter(), time.time()
    if payload.finished:
        log(f"[search] {len(payload.finished)} finished evaluation(s) recorded in {store.directory}: "
            "reused, not re-run")
    log(f"[search] strategy {name_}: Tune experiment {path}")
    results = run_experiment(parts.trainable, payload=payload, resources=_tune_resources(cfg), cfg=cfg,
                             output_dir=output_dir, name=name, param_space=parts.param_space or {},
                             callbacks=callbacks, metric="tradeoff", search_alg=parts.search_alg,
                             num_samples=parts.num_samples)
    wall = time.perf_counter() - t0
    rows = _rows(results, strategy.one_trial)
    if study is not None:
        _with_study_rows(rows, payload, study)
    summary = _tune_summary(strategy, prep, rows, wall, path)
    summary["trials_started_again"] = trials_started_again(payload.events_path, started, "search")
    return summary


def search_below(prep: Prepared, out: Path, run_id: str, source: nn.Module, source_key: str, after: float, k: int,
                 teacher_units: tuple[int, int],
                 source_dir: str | None = None) -> tuple[dict[str, Any], nn.Module] | None:
    """``pruning.assistants`` > 1: search the k-th assistant between the last one (``source``, at unit sparsity
    ``after``) and the student, with ``source`` as the teacher of the search (its importance, its
    distillation), sparsities still relative to the original teacher. Writes ``search_assistant_K.json`` and
    returns (search summary, the chosen candidate's initialisation), or None when no grid point lies between
    or the student's own sparsity wins. ``source_dir`` is where ``source`` was exported (what a sharded
    trial's workers read)."""
    cfg = prep.cfg
    s_student = cfg.pruning.student_sparsity
    # the grid's points below the student (and the student's own, if the grid has it: "no further assistant")
    grid = sorted(s for s in cfg.pruning.grid if after < s <= s_student)
    if not any(s < s_student for s in grid):
        log(f"[chain] assistant {k}: no grid point between {after} and the student's {s_student}; the chain "
            f"keeps {k - 1} assistant(s)")
        return None
    sub_cfg = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, grid=tuple(grid)))
    sub_prep = dataclasses.replace(prep, cfg=sub_cfg, teacher=source, teacher_dir=source_dir or prep.teacher_dir,
                                   importance=None, teacher_fp="")  # the assistant's own, measured here
    log(f"[search] assistant {k}: candidates {grid} pruned from assistant {k - 1} (s={after})")
    payload = dataclasses.replace(search_payload(sub_prep, str((out / "trial_events.jsonl").resolve()), out),
                                  teacher_units=teacher_units, base_units=teacher_units)
    summary = run_strategy(sub_prep, payload, out, cfg.search.strategy, run_id)
    summary["searched_below"] = {"assistant": k - 1, "sparsity": after, "key": source_key}
    write_json(out / f"search_assistant_{k}.json", {**summary, "config": sub_cfg.to_dict()})
    s_k = summary["chosen_sparsity"]
    if s_k is None or s_k >= s_student:
        log(f"[chain] assistant {k}: the search prefers none (chosen {s_k}); the chain keeps {k - 1} assistant(s)")
        return None
    init = prune_model(source, plan_for_sparsity(payload.importance, s_k, base_units=teacher_units,
                                                 layout=payload.layout))
    return summary, init


def resources_check(cfg: Config, strategies: list[str] | None = None, chain: bool = False) -> Callable[[], None]:
    """What runs once the inputs are checked and before any work: start or join Ray, check resources."""

    if cfg.search.optuna_storage and {"optuna", "optuna-kd"} & set(strategies or []):
        check_optuna_storage(cfg.search.optuna_storage)  # now: before any data, model or output is touched

    def check() -> None:
        ensure_ray(cfg.ray)
        check_resources(cfg, strategies, chain)

    return check


def check_optuna_storage(url: str) -> None:
    """Refuse, before anything is written, a ``search.optuna_storage`` that cannot work: a URL SQLAlchemy
    cannot parse, a driver that is not installed, a SQLite file in a missing or unwritable directory, or a
    database server that does not answer. SQLite files are not created here."""
    import sqlalchemy  # deferred: comes with Optuna's RDB storage, needed only to check its URL
    from sqlalchemy.engine import make_url

    field = "search.optuna_storage"
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure is the user's URL
        raise UserInputError(field, url, "not a database URL; use e.g. sqlite:////abs/path/optuna.db or "
                             "postgresql://user@host/db") from None
    if parsed.drivername.startswith("sqlite"):
        db = parsed.database or ""
        if db in ("", ":memory:"):
            raise UserInputError(field, url, "an in-memory SQLite study is lost when the job ends; give a file, "
                                 "e.g. sqlite:////abs/path/optuna.db")
        where = Path(db).expanduser().absolute()
        if where.is_dir():
            raise UserInputError(field, url, "this is a directory; name a database file inside it")
        if not where.parent.is_dir() or not os.access(where.parent, os.W_OK | os.X_OK):
            raise UserInputError(field, url, f"{where.parent} is not a directory you can write; fix the path")
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5} if "postgres" in
                                          parsed.drivername or "mysql" in parsed.drivername else {})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - missing driver, refused connection, bad credentials
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserInputError(field, url, f"the database cannot be reached ({type(exc).__name__}: {first}); start "
                             "it, install its driver, or fix the URL") from None


@one_job
def run_search(cfg: Config, output_dir: str | Path, strategy: str | None = None,
               prep: Prepared | None = None) -> dict[str, Any]:
    """``minidisc search``: prepare the teacher, run the strategy on Tune, write ``search.json``."""
    strategy = strategy or cfg.search.strategy
    get_strategy(strategy, field="--strategy")
    out = check_run_output(output_dir)
    prep = prep or prepare(cfg, out, on_inputs_checked=resources_check(cfg, [strategy]))
    payload = search_payload(prep, str((out / "trial_events.jsonl").resolve()), out)
    summary = run_strategy(prep, payload, out, strategy)
    summary["config"] = cfg.to_dict()
    write_json(out / "search.json", summary)
    log(f"[search] wrote {out / 'search.json'}")
    return summary


@one_job
def run_compare(cfg: Config, output_dir: str | Path, strategies: list[str]) -> dict[str, Any]:
    """``minidisc compare``: strategies side by side on one prepared teacher; compare.{json,md,png}."""
    if not strategies:
        raise UserInputError("--strategies", ",".join(strategies), f"name at least one of {', '.join(REGISTRY)}")
    for s in strategies:
        get_strategy(s, field="--strategies")
    if len(set(strategies)) != len(strategies):
        raise UserInputError("--strategies", ",".join(strategies), "name each strategy once")
    out = check_run_output(output_dir)
    prep = prepare(cfg, out, on_inputs_checked=resources_check(cfg, strategies))
    payload = search_payload(prep, str((out / "trial_events.jsonl").resolve()), out)
    results: dict[str, Any] = {}
    for s in strategies:
        results[s] = run_strategy(prep, payload, out, s)
    reference = results.get("grid")
    truth = reference["chosen_sparsity"] if reference else None
    for r in results.values():
        r["evaluations_to_truth"] = _evals_to(r, truth)
    data = {"strategies": results, "ground_truth": truth, "lam": cfg.pruning.lam,
            "teacher": next(iter(results.values()))["teacher"] if results else None, "config": cfg.to_dict()}
    write_compare(data, out)
    log(f"[compare] wrote {out / 'compare.json'}, compare.md, compare.png")
    return data


def _evals_to(result: dict[str, Any], target: float | None) -> int | None:
    if target is None:
        return None
    for r in result["candidates"]:
        if r.get("sparsity") == target and not r.get("failed"):
            return 1 if get_strategy(result["strategy"]).one_trial else int(r["order"])
    return None
