"""Multi-fidelity assistant selection on the real objective: the student's dev metric after trial distillation.

``search.strategy: halving`` runs one Ray Tune trial per *arm*: every candidate assistant below the student
(or a shortlist of them) and "no assistant". An arm distils its path the way the chain will
(:mod:`minidisc_ray.schedule`): the assistant is cut from the teacher and distilled from it for the recovery
budget (the search's own view of a candidate), the student is cut from the assistant by the assistant's
importance and distilled from it; "no assistant" is direct KD from the teacher for the same total steps.
The student link is trained in rungs (``search.halving_min_fraction`` of ``search.halving_steps``, times
``search.halving_reduction`` per rung) and the student's dev metric is reported at each rung, as Minitron
distils its top candidates briefly before choosing. ``search.halving_scheduler``: ``successive`` (default;
synchronous successive halving, one Tune experiment per rung over the arms still in, each trained from its
start to the rung, until one arm is left), or one Tune experiment under Tune's ``AsyncHyperBandScheduler``
(``asha``) or ``HyperBandScheduler`` (``hyperband``).

``search.strategy: auto`` (the default of ``minidisc run``) first runs the lambda search as the paper does
(bisection, cheap), keeping each candidate's recovered weights, then this halving round among its
``search.shortlist`` best candidates and "no assistant", each arm starting from the kept candidate.

Every finished rung is recorded (``OUTPUT/evaluations``) and reported from the record on a rerun; an arm
whose next rung is not recorded trains again from its start (a trial keeps no model checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, HyperBandScheduler, TrialScheduler

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.errors import JobFailed
from minidisc_ray.logs import log
from minidisc_ray.pipeline import Prepared
from minidisc_ray.records import EvaluationStore
from minidisc_ray.report import evidence_lines
from minidisc_ray.search.arm_trials import halving_trial, rung_trial
from minidisc_ray.search.arms import HalvingPayload, arm_name, record_rung, with_records
from minidisc_ray.search.summary import trial_distillation_summary, trials_started_again
from minidisc_ray.stats import dev_noise, paired_noise, unpack_rows
from minidisc_ray.tune_experiment import TrialLog, experiment_name, experiment_path, run_experiment


def scheduler_for(kind: str, rungs: list[int], reduction: int) -> TrialScheduler:
    """The Tune scheduler over rungs (``training_iteration`` counts rungs) of ``asha`` and ``hyperband``."""
    if kind == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=len(rungs), reduction_factor=reduction)
    return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1,
                                   reduction_factor=reduction, brackets=1)


def summarise(rows: list[dict[str, Any]], rungs: list[int], metric: str, dev_rows: int,
              student_sparsity: float) -> dict[str, Any]:
    """Which arm won each rung and by how much, against the dev set's noise; the pick is the best arm at
    the highest rung any arm reached. The noise is the paired standard error of the winner's and the
    runner-up's difference where both rows carry their per-row correctness (``dev_correct``: accuracy),
    ``noise_kind: paired``; otherwise :func:`dev_noise`'s bound for two independent models (``unpaired``)."""
    by_rung: list[dict[str, Any]] = []
    for i, steps in enumerate(rungs, 1):
        at = sorted(((r["arm"], r["student_metric"]) for r in rows if r.get("rung") == i),
                    key=lambda x: (-x[1], -x[0]))
        correct = {r["arm"]: r["dev_correct"] for r in rows if r.get("rung") == i and r.get("dev_correct")}
        if not at:
            continue
        entry: dict[str, Any] = {"rung": i, "student_steps": steps, "arms": [{"arm": arm_name(a, student_sparsity),
                                                                               "sparsity": a, "metric": m}
                                                                              for a, m in at]}
        if len(at) > 1:
            margin = at[0][1] - at[1][1]
            first, second = correct.get(at[0][0]), correct.get(at[1][0])
            pair = (unpack_rows(first), unpack_rows(second)) if first and second else None
            noise: float | None
            if pair is not None and len(pair[0]) == len(pair[1]) > 1:
                noise, disagree = paired_noise(*pair)
                entry.update(noise_kind="paired", disagree=disagree, rows=len(pair[0]))
            else:
                noise = dev_noise(metric, at[0][1], dev_rows)
                entry.update(noise_kind="unpaired")
            entry.update(winner=arm_name(at[0][0], student_sparsity), runner_up=arm_name(at[1][0], student_sparsity),
                         margin=margin, noise=noise,
                         beyond_noise=None if noise is None else bool(margin > noise))
        else:
            entry.update(winner=arm_name(at[0][0], student_sparsity), margin=None, noise=None, beyond_noise=None)
        by_rung.append(entry)
    pick = by_rung[-1]["arms"][0] if by_rung else None
    return {"rungs": by_rung, "chosen_sparsity": pick["sparsity"] if pick else None,
            "chosen_metric": pick["metric"] if pick else None}


class RungLog(TrialLog):
    """Driver-side Tune callback of a halving round: one line per arm and rung as its result arrives, and
    the rung recorded (``OUTPUT/evaluations``) when it was trained rather than read from the record."""

    def __init__(self, hp: HalvingPayload, store: EvaluationStore, student_sparsity: float) -> None:
        self.hp, self.store, self.student_sparsity = hp, store, student_sparsity

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        if "student_metric" not in result:
            return
        first = " (first link loaded)" if result.get("first_link") == "reused" else ""
        log(f"[halving] {arm_name(result['arm'], self.student_sparsity)} rung {result['rung']}/{len(self.hp.rungs)} "
            f"({result['student_steps']} student steps): student {result['student_metric']:.4f}"
            f"{' (recorded)' if result.get('reused') else first}")
        if not result.get("reused") and result.get("eval_key"):
            record_rung(self.store, result["eval_key"], result["sparsity"], result)


class HalvingRound:
    """One halving round over ``arms``: its Tune experiments (:meth:`successive` or :meth:`scheduled`), the rows
    and per-arm trial lines they report (:meth:`take`), and the summary (:meth:`summary`)."""

    def __init__(self, prep: Prepared, payload: SearchPayload, output_dir: Path, arms: list[float], strategy: str,
                 recovered: dict[float, tuple[str, str]] | None) -> None:
        cfg = prep.cfg
        self.prep, self.payload, self.output_dir, self.arms, self.strategy = prep, payload, output_dir, arms, strategy
        self.se = cfg.search
        if payload.recovered_dir is None and self.se.halving_scheduler == "successive":  # an arm keeps the first
            payload.keep_recovered_in(output_dir)  # link it trains, for its later rungs (each rung is a trial)
        self.hp, self.store = with_records(payload, cfg, output_dir, arms)
        self.hp.recovered = dict(recovered or {})
        self.s_student = cfg.pruning.student_sparsity
        self.rows: list[dict[str, Any]] = []  # one per arm and rung reported
        self.trials: dict[float, dict[str, Any]] = {}  # one per arm: its cost, how far it got, how it started
        self.failed = 0
        self.storage = experiment_path(cfg, output_dir, "").rstrip("/")  # where its experiments keep Tune's files
        self.name = experiment_name(f"search-{strategy}")

    def announce(self) -> None:
        """The round's opening line: arms, rungs, scheduler, and what earlier runs left."""
        hp, se, arms = self.hp, self.se, self.arms
        names = ", ".join(arm_name(a, self.s_student) for a in arms)
        loaded = sum(1 for a in arms if a in hp.recovered)
        log(f"[halving] {len(arms)} arms ({names}); student link rungs {hp.rungs} steps after "
            f"{self.payload.recovery.steps} first-link steps"
            + (f" ({loaded} first link(s) kept by the lambda search)" if loaded else "")
            + f"; {se.halving_scheduler} with reduction {se.halving_reduction}"
            + (f"; {len(hp.search.finished)} rung(s) recorded by an earlier run" if hp.search.finished else ""))

    def fit(self, trainable: Callable[..., None], space: dict[str, Any], scheduler: TrialScheduler | None,
            exp: str) -> list[tuple[float, list[dict[str, Any]]]]:
        """One Tune experiment; (arm, its reported results) per trial, an empty list for a failed one."""
        grid = run_experiment(trainable, payload=self.hp, resources={"cpu": self.se.trial_cpus,
                                                                      "gpu": self.se.trial_gpus},
                              cfg=self.prep.cfg, output_dir=self.output_dir, name=exp, param_space=space,
                              callbacks=[RungLog(self.hp, self.store, self.s_student)], metric="student_metric",
                              scheduler=scheduler, reuse_actors=False)
        out = []
        for res in list(grid):
            df = res.metrics_dataframe
            ok = res.error is None and df is not None and not df.empty and "student_metric" in df
            out.append((float((res.config or {}).get("arm", float("nan"))), df.to_dict("records") if ok else []))
        return out

    def take(self, arm: float, hist: list[dict[str, Any]]) -> None:
        """Add one trial's reported results (``hist``; empty: it failed) to the rows and to its arm's line."""
        if not hist:
            self.failed += 1
            self.trials.setdefault(arm, {"arm": arm, "failed": True})
            return
        self.rows.extend({k: h.get(k) for k in ("arm", "rung", "student_metric", "student_steps", "steps",
                                                "dev_correct")} for h in hist)
        t = self.trials.setdefault(arm, {"arm": arm, "cpu_seconds": 0.0, "cpu_seconds_spent": 0.0, "reused": True})
        t.pop("failed", None)
        last = hist[-1]  # its cpu_seconds: the trial's whole process time (cumulative over its rungs)
        t.update(rungs_reached=int(last["rung"]), metric=last["student_metric"])
        t["cpu_seconds"] += float(last.get("cpu_seconds") or 0.0)
        t["cpu_seconds_spent"] += 0.0 if last.get("reused") else float(last.get("cpu_seconds") or 0.0)
        t["reused"] = t["reused"] and bool(last.get("reused"))
        if last.get("first_link"):  # how its first round got its first link (later rounds load their own)
            t.setdefault("first_link", last["first_link"])
        kept = self.hp.search.recovered_path(arm) if last.get("recovered_sha256") else None
        if kept is not None:  # the arm kept its first link: its later rungs load it
            self.hp.recovered[arm] = (kept, last["recovered_sha256"])

    def successive(self) -> None:
        """Synchronous successive halving: one experiment per rung over the arms still in, the best
        ``1 / reduction`` going on, until one arm is left or the last rung is run."""
        alive = list(self.arms)
        rungs = len(self.hp.rungs)
        for i in range(rungs):
            got: dict[float, float] = {}
            for arm, hist in self.fit(rung_trial, {"arm": tune.grid_search(alive), "rung": i}, None,
                                      f"{self.name}-rung{i + 1}"):
                self.take(arm, hist)
                if hist:
                    got[arm] = float(hist[-1]["student_metric"])
            ranked = sorted(got, key=lambda a: (-got[a], -a))
            if not ranked or i == rungs - 1:
                break
            alive = ranked[:max(1, -(-len(ranked) // self.se.halving_reduction))]
            if len(alive) == 1:
                log(f"[halving] one arm left after rung {i + 1} ({arm_name(alive[0], self.s_student)}): no further "
                    "rung; the chain trains it in full")
                break

    def scheduled(self) -> None:
        """One experiment over every arm, trained rung after rung under Tune's ASHA or HyperBand scheduler."""
        se = self.se
        for arm, hist in self.fit(halving_trial, {"arm": tune.grid_search([float(a) for a in self.arms])},
                                  scheduler_for(se.halving_scheduler, self.hp.rungs, se.halving_reduction), self.name):
            self.take(arm, hist)

    def summary(self, wall: float) -> dict[str, Any]:
        """The search summary (``search.json``) with its ``halving`` section; every trial failed: JobFailed."""
        prep, se, arms, trials = self.prep, self.se, self.arms, self.trials
        ok = [t for t in trials.values() if not t.get("failed")]
        if not ok:
            raise JobFailed(f"search: every one of the {len(trials)} halving trial(s) failed, so no teacher "
                            f"assistant can be chosen; see {self.storage}/{self.name}*")
        dev_rows = len(prep.dev)
        h = summarise(self.rows, self.hp.rungs, prep.task.metric, dev_rows, self.s_student)
        h.update(arms=[float(a) for a in arms], trials=list(trials.values()), scheduler=se.halving_scheduler,
                 reduction=se.halving_reduction, first_link_steps=self.payload.recovery.steps, dev_rows=dev_rows,
                 first_links_loaded=sorted(a for a in arms if trials.get(a, {}).get("first_link") == "reused"))
        for line in evidence_lines(h, prep.task.metric):
            log(f"[halving] {line}")
        chosen = h["chosen_sparsity"]
        log(f"[halving] pick: {arm_name(chosen, self.s_student) if chosen is not None else None} in {wall:.0f}s")
        return trial_distillation_summary(
            prep, self.strategy, h, evaluations=len(self.rows), reused=sum(1 for t in ok if t["reused"]),
            failed=self.failed, seconds=wall, cpu_seconds=sum(t["cpu_seconds"] for t in ok),
            cpu_seconds_spent=sum(t["cpu_seconds_spent"] for t in ok),
            experiment_path=f"{self.storage}/{self.name}")


def run_halving(prep: Prepared, payload: SearchPayload, output_dir: Path, arms: list[float],
                strategy: str = "halving", run_id: str = "",
                recovered: dict[float, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Trial distillation of ``arms`` (unit sparsities; the student's own = no assistant) stopped early by the
    configured scheduler; returns the search summary (``search.json``) with a ``halving`` section.

    ``successive`` (synchronous successive halving): one Tune experiment per rung over the arms still in;
    each trains from its start to the rung (the first link loaded where ``recovered`` holds it) and the
    best ``1 / reduction`` go on; the round ends as soon as one arm is left (the chain then trains it in
    full). ``asha`` / ``hyperband``: one Tune experiment over every arm with that Tune scheduler, each
    trial training rung after rung."""
    round_ = HalvingRound(prep, payload, output_dir, arms, strategy, recovered)
    round_.announce()
    t0, started = time.perf_counter(), time.time()
    if round_.se.halving_scheduler == "successive":
        round_.successive()
    else:
        round_.scheduled()
    summary = round_.summary(time.perf_counter() - t0)
    summary["trials_started_again"] = trials_started_again(payload.events_path, started, "halving")
    return summary


def shortlist(search: dict[str, Any], student_sparsity: float, k: int) -> list[float]:
    """The ``k`` best lambda-tradeoff candidates a search evaluated below the student (best first)."""
    ok = [c for c in search["candidates"] if not c.get("failed") and c.get("tradeoff") is not None
          and c["sparsity"] < student_sparsity]
    ok.sort(key=lambda c: (-c["tradeoff"], -c["sparsity"]))
    return sorted({float(c["sparsity"]) for c in ok[:k]})


