"""``minidisc study CONFIG``: can the lambda-tradeoff's pick be trusted on this task and teacher?

For every candidate TA on the study's grid and every seed, one Ray Tune trial (a *path*) does what a
search and then ``minidisc run`` would do with that TA:

1. the candidate's search score: pruned from the teacher, recovered for ``recovery.steps``, evaluated
   (the value every strategy ranks by the lambda-tradeoff);
2. trial distillation with the **chain's budget**: teacher -> TA for ``distill.steps``, the student
   pruned from the TA by the TA's importance, TA -> student for ``distill.steps`` (the recipe of the
   Ray Train stages: warm-up and decay, evaluation every ``eval_every``, early stop, best weights kept).
   A candidate at the student's own sparsity is the run without a TA: teacher -> student only.

and one more trial (an *arm*) trains what that candidate's arm of a halving round trains
(:class:`~minidisc_ray.search.arms.ArmRun`: recovered candidate, student cut from it, distilled for
``search.halving_steps``), its student evaluated at every rung and every ``distill.eval_every``, so that
``halving`` and ``auto`` are replayed on what their arms really are.

Per seed, one more trial distils the student directly from the teacher with the TA path's total
budget (``2 x distill.steps``: *direct KD at the same compute*), and one runs the ``sandwich``
schedule over the same grid. Seeds vary every random draw of training (data order, dropout) and the
recovery; the fine-tuned teacher and its importance ranking stay those of the job's seed, as in
``minidisc run``.

From those records, with nothing trained again: each strategy's pick on each seed's curve (bisection
and Optuna are replayed with the real searcher and sampler, :mod:`minidisc_ray.search.replay`), its
regret against the best student, the Spearman correlation between tradeoff and student metric, the
range of lambda that would have picked the best TA (for both tradeoff forms), and each strategy's
cost in CPU-seconds against exhaustive trial distillation. Intervals are percentile bootstraps over
seeds. Every trial is recorded in ``OUTPUT/evaluations`` when it finishes, so a rerun continues.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minidisc_ray.candidates import SearchPayload, prune_student, sandwich_scores, score_candidate
from minidisc_ray.config import Config, DistillConfig
from minidisc_ray.errors import JobFailed, UserInputError
from minidisc_ray.logs import log
from minidisc_ray.outputs import check_run_output
from minidisc_ray.pipeline import prepare
from minidisc_ray.ray_env import resolved
from minidisc_ray.records import EvaluationStore, digest, machine
from minidisc_ray.report import write_study
from minidisc_ray.schedule import Link, Schedule, path_total_steps, plan_schedule, run_in_process
from minidisc_ray.search.arms import HalvingPayload
from minidisc_ray.search.arms import make_payload as make_halving_payload
from minidisc_ray.search.replay import bisection_order
from minidisc_ray.search.strategies import REGISTRY, names
from minidisc_ray.tradeoff import Tradeoff, best_index, lambda_range
from minidisc_ray.tune_experiment import TrialLog, experiment_name, experiment_path, run_experiment

AUTO_CHECKED = "auto + direct KD"  # auto's chain or the direct-KD baseline minidisc run trains, the better on dev


def replayed() -> list[str]:
    """The strategies the study replays (the registry's ``replayable`` ones)."""
    return names(replayable=True)


def stage_arm_rows() -> dict[str, str]:
    """Study-only rows: the strategies with ``stage_arms`` (halving, auto) as if each arm's first link were the
    chain's whole teacher -> assistant stage (replayed on the chains' student curves; minidisc run's arms start
    from the recovery budget), row name -> strategy."""
    return {f"{n} (stage arms)": n for n in names(replayable=True, stage_arms=True)}


def form_free(row: str) -> bool:
    """Whether a row's pick is the same under either tradeoff form (chosen on the student's metric alone)."""
    name = stage_arm_rows().get(row, row)
    return name in REGISTRY and not REGISTRY[name].needs_tradeoff
BOOTSTRAP = 2000


# ----------------------------------------------------------------------------- the trials (plain torch)


@dataclass
class StudyPayload:
    """What every study trial shares: the search's payload plus the chain's budget."""

    search: SearchPayload
    distill: DistillConfig
    grid: list[float]
    importance_samples: int
    importance_batch: int
    importance_seed: int
    # the arms of a halving round (``arm`` trials), evaluated at every rung and every distill.eval_every
    halving: HalvingPayload | None = None

    def key(self, unit: dict[str, Any]) -> str:
        """Everything that determines a trial's result."""
        what = self.distill.what_it_computes()
        extra = self.grid if unit["kind"] == "sandwich" else unit.get("sparsities", unit.get("sparsity"))
        parts = ["study", self.search.context_key, unit["kind"], extra, unit["seed"], self.search.recovery,
                 what, self.search.student_sparsity, self.importance_samples, self.importance_seed,
                 self.search.importance_method, self.search.layout]
        if unit["kind"] == "arm" and self.halving is not None:
            h = self.halving
            parts += [h.rungs, h.lr, h.batch_size, h.importance_samples, h.importance_batch]
        if unit["kind"] == "path" and float(unit["sparsity"]) >= self.search.student_sparsity:
            parts.append("no-assistant=direct-kd-at-path-total")  # trained one stage's steps before this
        return digest(*parts)


def _cpu() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def run_unit(sp: StudyPayload, unit: dict[str, Any], device: Any = "cpu") -> dict[str, Any]:
    """One study trial in this process: a ``path`` (candidate score + trial distillation through it),
    ``direct`` (teacher -> student at the TA path's budget) or ``sandwich`` (the one-trial schedule)."""
    import torch

    from minidisc_ray.data import infinite, make_loader
    from minidisc_ray.engine import evaluate
    from minidisc_ray.families import count_params
    from minidisc_ray.pruning import plan_for_sparsity, prune_model
    from minidisc_ray.training import distill_stage

    p = dataclasses.replace(sp.search, seed=int(unit["seed"]))
    seed, kind = int(unit["seed"]), unit["kind"]
    if kind == "sandwich":
        t = _cpu()
        res = sandwich_scores(p, sp.grid, device)
        wall, cpu = _since(t)
        cands = [{k: c[k] for k in ("sparsity", "param_sparsity", "metric")} for c in res["candidates"]]
        return {"kind": kind, "seed": seed, "candidates": cands, "metric": max(c["metric"] for c in cands),
                "seconds": wall, "cpu_seconds": cpu}
    if kind == "arm":  # what a halving arm trains (ArmRun), its student evaluated at every rung
        from minidisc_ray.search.arms import ArmRun

        assert sp.halving is not None
        hp = dataclasses.replace(sp.halving, search=p)
        arm = ArmRun(hp, float(unit["sparsity"]))
        curve = [[steps, float(arm.advance(i)["student_metric"])] for i, steps in enumerate(hp.rungs)]  # type: ignore[index]
        wall, cpu = time.perf_counter() - arm.t0, time.process_time() - arm.c0
        return {"kind": kind, "seed": seed, "sparsity": float(unit["sparsity"]), "metric": curve[-1][1],
                "arm_curve": curve, "student_steps": hp.rungs[-1], "first_link_cpu_seconds": arm.first_cpu_seconds,
                "eval_cpu_seconds": arm.eval_cpu_seconds / len(curve),
                "student_link_cpu_seconds": cpu - arm.first_cpu_seconds - arm.eval_cpu_seconds,
                "seconds": wall, "cpu_seconds": cpu}
    train, dev = p.dataset("train"), p.dataset("dev")
    dev_loader = make_loader(dev, p.tokenizer, 64)
    dc = sp.distill

    def stage(student: Any, teacher: Any, cfg: DistillConfig, stage_seed: int) -> dict[str, Any]:
        torch.manual_seed(stage_seed)
        data = infinite(make_loader(train, p.tokenizer, cfg.batch_size, shuffle=True, seed=stage_seed))
        t0 = _cpu()
        out = distill_stage(student, teacher, data, dev_loader, p.metric, p.regression, cfg)
        out["seconds"], out["cpu_seconds"] = _since(t0)
        return out

    teacher = p.teacher().to(device)

    def cut(link: Link, source: Any) -> Any:
        if link.cut_from == "teacher":  # by the job's importance, as the search's candidates are cut
            return prune_model(source, plan_for_sparsity(p.importance, link.unit_sparsity, layout=p.layout)).to(device)
        return prune_student(source, train, p.tokenizer, link.unit_sparsity, p.teacher_units, sp.importance_samples,
                             sp.importance_batch, sp.importance_seed, p.importance_method, p.layout).to(device)

    def train_link(link: Link, student: Any, source: Any) -> dict[str, Any]:
        out = stage(student, source, dataclasses.replace(dc, steps=link.steps), seed)
        if not math.isfinite(out["metric"]):  # a stage that never evaluated: measure what it ended with
            out["metric"] = evaluate(student, dev_loader, p.metric)["metric"]
        out["params"] = count_params(student)[1]
        return out

    if kind == "direct":  # the baseline of the one-assistant path: teacher -> student at its total steps
        link = plan_schedule([], p.student_sparsity, dc.steps).path[0]
        (st,) = run_in_process(Schedule((dataclasses.replace(link, name="direct_kd"),), None), teacher, cut,
                               train_link).values()
        return {"kind": kind, "seed": seed, "metric": st["metric"], "steps_run": st["steps_run"],
                "best_step": st["best_step"], "params": st["params"], "seconds": st["seconds"],
                "cpu_seconds": st["cpu_seconds"], "curve": st["curve"]}
    if kind == "two":  # teacher -> TA 1 -> TA 2 -> student, the three links sharing the TA path's total steps
        s1, s2 = (float(x) for x in unit["sparsities"])
        plan = plan_schedule([s1, s2], p.student_sparsity, dc.steps, total=path_total_steps(dc.steps))
        links = list(run_in_process(plan, teacher, cut, train_link, with_baseline=False).values())
        return {"kind": kind, "seed": seed, "sparsities": [s1, s2], "metric": links[-1]["metric"],
                "link_metrics": [x["metric"] for x in links], "steps_run": sum(x["steps_run"] for x in links),
                "seconds": sum(x["seconds"] for x in links), "cpu_seconds": sum(x["cpu_seconds"] for x in links)}
    s = float(unit["sparsity"])
    t = _cpu()
    cand = score_candidate(p, s, device=device)  # the search's view of this candidate (recovery budget)
    cand_wall, cand_cpu = _since(t)
    out: dict[str, Any] = {"kind": kind, "seed": seed, "sparsity": s, "param_sparsity": cand["param_sparsity"],
                           "candidate_metric": cand["metric"], "candidate_params": cand["params"],
                           "candidate_cpu_seconds": cand_cpu, "candidate_seconds": cand_wall}
    # the candidate as the job's assistant; at the student's own sparsity "no assistant": direct KD at the
    # TA path's total steps (plan_schedule), what minidisc run then trains
    plan = plan_schedule([s] if s < p.student_sparsity else [], p.student_sparsity, dc.steps)
    results = run_in_process(plan, teacher, cut, train_link, with_baseline=False)
    student = results[plan.path[-1].stage]
    if plan.direct:
        out.update(assistant_metric=None, assistant_steps=0, assistant_cpu_seconds=0.0, assistant_seconds=0.0)
    else:
        a = results[plan.path[0].stage]
        out.update(assistant_metric=a["metric"], assistant_steps=a["steps_run"], assistant_cpu_seconds=a["cpu_seconds"],
                   assistant_seconds=a["seconds"])
    out.update(metric=student["metric"], student_steps=student["steps_run"], student_params=student["params"],
               student_cpu_seconds=student["cpu_seconds"], student_seconds=student["seconds"],
               student_curve=student["curve"])
    out["seconds"] = out["candidate_seconds"] + out["assistant_seconds"] + out["student_seconds"]
    out["cpu_seconds"] = out["candidate_cpu_seconds"] + out["assistant_cpu_seconds"] + out["student_cpu_seconds"]
    return out


def study_trial(config: dict[str, Any], payload: StudyPayload) -> None:
    """Ray Tune function trainable of one study trial (``config["unit"]``); recorded ones are reported."""
    from ray import tune

    from minidisc_ray.search.trial import _device, _threads

    _threads()
    payload = resolved(payload)
    unit = config["unit"]
    key = payload.key(unit)
    done = payload.search.finished.get(key)
    if done is not None:
        tune.report({**done, "reused": True, "eval_key": key})
        return
    result = run_unit(payload, unit, _device())
    tune.report({**result, "eval_key": key, "finished_at": time.time()})


# ----------------------------------------------------------------------------- statistics (pure)


def pick_candidates(grid: list[float], count: int | None, student_sparsity: float) -> list[float]:
    """``count`` candidates spread evenly over the sorted grid, both ends kept (all of it when None)."""
    g = sorted(float(s) for s in grid)
    if count is None or count >= len(g):
        return g
    if count < 2:
        raise UserInputError("--candidates", count, "use at least 2 (the two ends of the grid)")
    idx = sorted({round(i * (len(g) - 1) / (count - 1)) for i in range(count)})
    return [g[i] for i in idx]


def spearman(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b)[0])


def interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap replicates (NaN replicates left out); None when none is finite."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return None
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


@dataclass
class SeedRecord:
    """What one seed's trials measured, per candidate (sorted by sparsity)."""

    seed: int
    metric: list[float]  # candidate score after recovery (the search's view)
    actual: list[float]  # actual sparsity
    student: list[float]  # student metric through this candidate
    assistant: list[float | None]
    eval_cpu: list[float]  # CPU-s of the candidate's search evaluation
    chain_cpu: list[float]  # CPU-s of the chain through it (TA stage + student stage)
    direct: float | None
    direct_cpu: float
    sandwich: list[float] | None  # the sandwich trial's scores of the same candidates
    sandwich_cpu: float
    student_cpu: list[float] | None = None  # CPU-s of the student stage alone (part of chain_cpu)
    curves: list[list[list[float]]] | None = None  # the student stage's [step, dev metric] at each evaluation
    # the halving arms (``arm`` trials): the student's [student-link step, dev metric] at every rung, and the
    # CPU-s of the first link, of the whole student link (training only) and of one evaluation
    arm_curves: list[list[list[float]]] | None = None
    arm_first_cpu: list[float] | None = None
    arm_link_cpu: list[float] | None = None
    arm_eval_cpu: list[float] | None = None


def _checked_against_direct(rec: SeedRecord, auto: dict[str, Any] | None,
                            no_assistant: int | None) -> dict[str, Any] | None:
    """``auto``, then the better on dev of its chain's student and direct KD's at the same total steps: what a
    user of ``minidisc run`` gets by keeping ``student/`` or ``direct_kd_student/``, the baseline the run trains
    by default (``distill.baseline_direct_kd``); it costs the baseline's run unless auto picked no assistant."""
    if auto is None or no_assistant is None or rec.direct is None:
        return None
    base = {"pick": int(auto["pick"]), "evaluated": auto["evaluated"], "cpu": float(auto["cpu"])}
    if base["pick"] == no_assistant:
        return base
    better = no_assistant if rec.direct > rec.student[base["pick"]] else base["pick"]
    return {**base, "pick": better, "cpu": base["cpu"] + rec.direct_cpu}


def strategy_picks(rec: SeedRecord, scorer: Tradeoff, points_per_round: int, optuna_budget: int,
                   optuna_seed: int, halving: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each strategy's pick on one seed's records, the candidates it evaluated and its CPU-seconds (its
    evaluations, then the chain through its pick; exhaustive: a chain through every candidate): every
    registered strategy that can be replayed from these records (:meth:`Strategy.replay`)."""
    from minidisc_ray.search.strategies import REGISTRY, ReplaySettings

    curve = [scorer(m, a) for m, a in zip(rec.metric, rec.actual, strict=True)]
    settings = ReplaySettings(points_per_round, optuna_budget, optuna_seed, scorer, **(halving or {}))
    out: dict[str, dict[str, Any]] = {}
    for name in replayed():
        picked = REGISTRY[name].replay(rec, curve, settings)
        if picked is not None:
            out[name] = picked
    checked = _checked_against_direct(rec, out.get("auto"), (halving or {}).get("no_assistant"))
    if checked is not None:
        out[AUTO_CHECKED] = checked
    if rec.arm_curves is not None and rec.curves is not None:
        for row, name in stage_arm_rows().items():
            picked = REGISTRY[name].replay(dataclasses.replace(rec, arm_curves=None), curve, settings)
            if picked is not None:
                out[row] = picked
    return out


# (assistant-stage fraction, student-stage fraction) of the partial-stage arms the study prices
PARTIAL_STAGE_FRACTIONS = ((1 / 3, 1 / 3), (1 / 6, 1 / 6))


def partial_stage_cost(rec: SeedRecord, arms: list[int], no_assistant: int, search_cpu: float,
                       assistant_fraction: float, student_fraction: float) -> tuple[float, float] | None:
    """CPU-seconds (least and most, over which arm wins) of auto with arms that run the chain's own teacher ->
    assistant stage for ``assistant_fraction`` of it (checkpointed, so the winner's chain resumes it) and then
    a student probe for ``student_fraction`` of the student stage; "no assistant" runs as many steps of its
    direct KD (resumed if it wins). The lambda search (``search_cpu``) first; no evaluation counted. A price
    from the recorded stages (CPU proportional to steps), not a replay: nothing records such arms' students.
    None without the stages' split (``student_cpu``)."""
    if rec.student_cpu is None:
        return None
    f, r = assistant_fraction, student_fraction
    stage = [c - s for c, s in zip(rec.chain_cpu, rec.student_cpu, strict=True)]  # teacher -> assistant
    tas = [i for i in arms if i != no_assistant]
    direct_part = (f + r) / 2  # of the direct run's two stages' steps
    spent = (search_cpu + sum(f * stage[i] + r * rec.student_cpu[i] for i in tas)
             + (rec.chain_cpu[no_assistant] * direct_part if no_assistant in arms else 0.0))
    finish = [(1 - f) * stage[i] + rec.student_cpu[i] for i in tas]
    if no_assistant in arms:
        finish.append(rec.chain_cpu[no_assistant] * (1 - direct_part))
    return spent + min(finish), spent + max(finish)


def _partial_stage_arms(records: list[SeedRecord], per_seed: list[dict[str, dict[str, Any]]],
                        no_assistant: int | None) -> list[dict[str, Any]] | None:
    """:func:`partial_stage_cost` against exhaustive's CPU-seconds, least and most over seeds and winners."""
    if no_assistant is None or not all("auto" in p and "search_cpu" in p["auto"] for p in per_seed):
        return None
    out = []
    for f, r in PARTIAL_STAGE_FRACTIONS:
        ratios = []
        for rec, p in zip(records, per_seed, strict=True):
            cost = partial_stage_cost(rec, p["auto"]["arms"], no_assistant, p["auto"]["search_cpu"], f, r)
            if cost is None:
                return None
            ratios += [c / p["exhaustive"]["cpu"] for c in cost]
        out.append({"assistant_fraction": f, "student_fraction": r,
                    "cost_vs_exhaustive": [float(min(ratios)), float(max(ratios))],
                    "lambda_search_vs_exhaustive": float(np.mean([p["auto"]["search_cpu"] / p["exhaustive"]["cpu"]
                                                                  for p in per_seed]))})
    return out


def analyse(records: list[SeedRecord], grid: list[float], lam: float, teacher_metric: float, chance: float,
            points_per_round: int, optuna_budget: int, optuna_seed: int, rng_seed: int = 0,
            halving: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``study.json`` reports, from the per-seed records (pure: no training). ``halving``: the
    replay settings of ``halving`` and ``auto`` (``stage_steps``, ``reduction``, ``shortlist``,
    ``no_assistant``: the grid index of the student's own sparsity, or None)."""
    n = len(records)
    metric = np.array([r.metric for r in records])  # seeds x candidates
    student = np.array([r.student for r in records])
    actual = np.array([r.actual for r in records]).mean(axis=0)
    forms = {"paper": Tradeoff(lam, "paper", teacher_metric, chance),
             "retained": Tradeoff(lam, "retained", teacher_metric, chance)}
    tradeoff = {f: np.array([[sc(m, a) for m, a in zip(r.metric, r.actual, strict=True)] for r in records])
                for f, sc in forms.items()}
    mean_student = student.mean(axis=0)
    best = int(best_index(list(mean_student)) or 0)
    rng = np.random.default_rng(rng_seed)
    boots = [rng.integers(0, n, n) for _ in range(BOOTSTRAP)] if n > 1 else []

    def sd(a: np.ndarray) -> list[float]:
        return [float(x) for x in (a.std(axis=0, ddof=1) if n > 1 else np.zeros(a.shape[1]))]

    candidates = []
    for i, s in enumerate(grid):
        candidates.append({
            "sparsity": s, "param_sparsity": float(actual[i]),
            "candidate_metric": {"mean": float(metric[:, i].mean()), "sd": sd(metric)[i]},
            "tradeoff": {"mean": float(tradeoff["paper"][:, i].mean()), "sd": sd(tradeoff["paper"])[i]},
            "tradeoff_retained": {"mean": float(tradeoff["retained"][:, i].mean()), "sd": sd(tradeoff["retained"])[i]},
            "assistant_metric": _mean_or_none([r.assistant[i] for r in records]),
            "student_metric": {"mean": float(mean_student[i]), "sd": sd(student)[i],
                               "per_seed": [float(x) for x in student[:, i]]},
            "chain_cpu_seconds": float(np.mean([r.chain_cpu[i] for r in records])),
            "eval_cpu_seconds": float(np.mean([r.eval_cpu[i] for r in records]))})

    correlation = {}
    for f in forms:
        rho = spearman(tradeoff[f].mean(axis=0), mean_student)
        reps = [spearman(tradeoff[f][b].mean(axis=0), student[b].mean(axis=0)) for b in boots]
        correlation[f] = {"spearman": rho, "interval": interval(reps)}

    strategies: dict[str, Any] = {}
    partial = None
    for f, sc in forms.items():
        per_seed = [strategy_picks(r, sc, points_per_round, optuna_budget, optuna_seed + r.seed, halving)
                    for r in records]
        if f == "paper":
            partial = _partial_stage_arms(records, per_seed, (halving or {}).get("no_assistant"))
        rows = [s for s in (*replayed(), AUTO_CHECKED, *stage_arm_rows()) if all(s in p for p in per_seed)
                and (f == "paper" or not form_free(s))]
        for name in rows:
            picks = [p[name]["pick"] for p in per_seed]
            # regret on held-out seeds: the pick made on seed i is judged by the other seeds' students (all
            # seeds when there is one), so exhaustive's pick is not rewarded for the noise it was picked on
            regrets = []
            for i, pk in enumerate(picks):
                others = student[[j for j in range(n) if j != i]] if n > 1 else student
                m = others.mean(axis=0)
                regrets.append(float(m.max() - m[pk]))
            reps = [float(np.mean([regrets[i] for i in b])) for b in boots]
            exhaustive_cpu = float(np.mean([p["exhaustive"]["cpu"] for p in per_seed]))
            cpu = float(np.mean([p[name]["cpu"] for p in per_seed]))
            strategies.setdefault(f, {})[name] = {
                "picks": [grid[k] for k in picks], "picked_best": sum(k == best for k in picks),
                "regret": {"mean": float(np.mean(regrets)), "per_seed": regrets, "interval": interval(reps)},
                "evaluations": float(np.mean([p[name]["evaluated"] for p in per_seed])),
                "cpu_seconds": cpu, "cost_vs_exhaustive": cpu / exhaustive_cpu if exhaustive_cpu else None,
                "minus_direct": _minus_direct(student, picks, [r.direct for r in records], boots)}
            if all("crossings" in p[name] for p in per_seed):  # a halving round: did its best arm survive?
                strategies[f][name]["halving_round"] = {
                    "best_arm_to_last_rung": sum(bool(p[name]["best_to_last_rung"]) for p in per_seed),
                    "seeds": n, "pairs": sum(p[name]["crossings"]["pairs"] for p in per_seed),
                    "crossed": sum(p[name]["crossings"]["crossed"] for p in per_seed)}

    lam_ranges = {}
    for f, sc in forms.items():
        scaled = [float(np.mean([sc.scaled(m) for m in metric[:, i]])) for i in range(len(grid))]
        lam_ranges[f] = lambda_range(scaled, list(actual), best)
    direct = [r.direct for r in records if r.direct is not None]
    direct_block: dict[str, Any] | None = None
    if len(direct) == n:
        d = np.array(direct)
        gap = [float(student[:, best].mean() - d.mean())]
        reps = [float(student[b, best].mean() - d[b].mean()) for b in boots]
        pick_gap = None
        picks = strategies.get("paper", {}).get("bisection", {}).get("picks")
        if picks:
            via = [student[i, grid.index(pk)] for i, pk in enumerate(picks)]
            pick_gap = {"mean": float(np.mean(via) - d.mean()),
                        "interval": interval([float(np.mean([via[i] for i in b]) - d[b].mean()) for b in boots])}
        direct_block = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if n > 1 else 0.0,
                        "per_seed": [float(x) for x in d],
                        "cpu_seconds": float(np.mean([r.direct_cpu for r in records])),
                        "best_assistant_minus_direct": {"mean": gap[0], "interval": interval(reps)},
                        "bisection_pick_minus_direct": pick_gap}
    return {"seeds": n, "candidates": candidates, "best_student_sparsity": grid[best],
            "correlation": correlation, "strategies": strategies, "lambda_range_picking_best": lam_ranges,
            "direct_kd": direct_block, "lam": lam, "teacher_metric": teacher_metric, "chance_metric": chance,
            "bootstrap_replicates": len(boots), "partial_stage_arms": partial,
            # what halving and auto were replayed on: the recorded halving arms, or (older records) the chains'
            # student curves
            "halving_replay": "arms" if all(r.arm_curves is not None for r in records) else "stage curves"}


def _minus_direct(student: np.ndarray, picks: list[int], direct: list[float | None],
                  boots: list[np.ndarray]) -> dict[str, Any] | None:
    """The student through each seed's pick minus that seed's direct KD (same total steps), mean and bootstrap
    interval: does following the strategy beat skipping the assistant?"""
    if any(d is None for d in direct):
        return None
    diff = np.array([student[i, pk] - float(direct[i]) for i, pk in enumerate(picks)])  # type: ignore[arg-type]
    return {"mean": float(diff.mean()), "per_seed": [float(x) for x in diff],
            "interval": interval([float(diff[b].mean()) for b in boots])}


def _mean_or_none(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


# ----------------------------------------------------------------------------- the command


def run_study(cfg: Config, output_dir: str | Path, seeds: int = 3, candidates: int | None = None,
              sandwich: bool = True, command: str = "", assistants: int = 1) -> dict[str, Any]:
    """``minidisc study``: every trial on Ray Tune, then ``study.json``, ``study.md`` and ``study.png``."""
    from ray import tune

    from minidisc_ray.search.driver import resources_check, search_payload

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
                keep = {k: v for k, v in result.items() if k in _KEPT}
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
    records = _seed_records(sp, units, results, seed_list, grid)
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
        analysis["two_assistants"] = _compare_two(records, grid, [results[sp.key(u)] for u in two])
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


_KEPT = ("kind", "seed", "sparsity", "param_sparsity", "candidate_metric", "candidate_params", "candidate_cpu_seconds",
         "candidate_seconds", "assistant_metric", "assistant_steps", "assistant_cpu_seconds", "assistant_seconds",
         "metric", "student_steps",
         "student_params", "student_cpu_seconds", "student_seconds", "seconds", "cpu_seconds", "candidates",
         "steps_run", "best_step", "params", "sparsities", "link_metrics", "curve", "student_curve", "arm_curve",
         "first_link_cpu_seconds", "eval_cpu_seconds", "student_link_cpu_seconds")


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


def _compare_two(records: list[SeedRecord], grid: list[float], two: list[dict[str, Any]]) -> dict[str, Any]:
    """The two-assistant chains against one assistant (the same first TA, the same seed, the same total steps)."""
    by_seed = {r.seed: r for r in records}
    diffs = [t["metric"] - by_seed[t["seed"]].student[grid.index(t["sparsities"][0])] for t in two]
    rng = np.random.default_rng(1)
    reps = [float(np.mean([diffs[i] for i in rng.integers(0, len(diffs), len(diffs))])) for _ in range(BOOTSTRAP)]
    return {"chains": [{"seed": t["seed"], "sparsities": t["sparsities"], "student": t["metric"],
                        "links": t.get("link_metrics"), "cpu_seconds": t.get("cpu_seconds")} for t in two],
            "two_minus_one": {"mean": float(np.mean(diffs)), "per_seed": diffs,
                              "interval": interval(reps) if len(diffs) > 1 else None},
            "seeds_without_room": len(records) - len(two)}


def _seed_records(sp: StudyPayload, units: list[dict[str, Any]], results: dict[str, dict[str, Any]],
                  seeds: list[int], grid: list[float]) -> list[SeedRecord]:
    records = []
    for j in seeds:
        paths = [results[sp.key({"kind": "path", "sparsity": s, "seed": j})] for s in grid]
        direct = results.get(sp.key({"kind": "direct", "seed": j}))
        sw = results.get(sp.key({"kind": "sandwich", "seed": j}))
        sw_metric = None
        if sw is not None:
            by_s = {round(c["sparsity"], 6): c["metric"] for c in sw["candidates"]}
            sw_metric = [by_s[round(s, 6)] for s in grid]
        records.append(SeedRecord(
            seed=j, metric=[p["candidate_metric"] for p in paths], actual=[p["param_sparsity"] for p in paths],
            student=[p["metric"] for p in paths], assistant=[p.get("assistant_metric") for p in paths],
            eval_cpu=[p["candidate_cpu_seconds"] for p in paths],
            chain_cpu=[p["assistant_cpu_seconds"] + p["student_cpu_seconds"] for p in paths],
            direct=direct["metric"] if direct else None, direct_cpu=direct["cpu_seconds"] if direct else 0.0,
            sandwich=sw_metric, sandwich_cpu=sw["cpu_seconds"] if sw else 0.0,
            student_cpu=[p["student_cpu_seconds"] for p in paths],
            curves=[p["student_curve"] for p in paths] if all("student_curve" in p for p in paths) else None))
        arms = [results.get(sp.key({"kind": "arm", "sparsity": s, "seed": j})) for s in grid]
        if all(a is not None for a in arms):
            r = records[-1]
            r.arm_curves = [a["arm_curve"] for a in arms]  # type: ignore[index]
            r.arm_first_cpu = [a["first_link_cpu_seconds"] for a in arms]  # type: ignore[index]
            r.arm_link_cpu = [a["student_link_cpu_seconds"] for a in arms]  # type: ignore[index]
            r.arm_eval_cpu = [a["eval_cpu_seconds"] for a in arms]  # type: ignore[index]
    return records
