"""The study's analysis: regret on held-out seeds, cost against exhaustive, the pick against direct KD, Spearman
correlation of tradeoff and student, the lambda range that picks the best assistant, with bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minidisc_ray.stats import BOOTSTRAP, interval, spearman
from minidisc_ray.study.records import STUDENT_SCORES, SeedRecord
from minidisc_ray.study.replay import (
    AUTO_CHECKED,
    NEAREST_CHECKED,
    HalvingReplay,
    form_free,
    partial_stage_arms,
    replayed,
    stage_arm_rows,
    strategy_picks,
)
from minidisc_ray.tradeoff import Tradeoff, best_index, lambda_range


@dataclass(frozen=True)
class Measured:
    """The seeds' records as arrays (seeds x candidates), the best candidate by mean student and the bootstrap
    resamples of the seeds: what every part of the analysis reads."""

    n: int  # seeds
    metric: np.ndarray  # candidate score after recovery
    student: np.ndarray  # student through the candidate, as judged (:func:`judged`)
    actual: np.ndarray  # parameter sparsity per candidate, mean over seeds
    tradeoff: dict[str, np.ndarray]  # per tradeoff form
    mean_student: np.ndarray
    best: int  # index of the best candidate by mean student
    boots: list[np.ndarray]  # bootstrap resamples of the seeds (none with one seed)
    direct: list[float | None]  # each seed's direct KD, as judged
    judged_on: str  # "held-out dev" (rows no choice saw) or "selection" (the rows the picks were made on)

    def sd(self, a: np.ndarray) -> list[float]:
        """Per candidate, the standard deviation over seeds (0 with one seed)."""
        return [float(x) for x in (a.std(axis=0, ddof=1) if self.n > 1 else np.zeros(a.shape[1]))]


def analyse(records: list[SeedRecord], grid: list[float], lam: float, teacher_metric: float, chance: float,
            points_per_round: int, optuna_budget: int, optuna_seed: int, rng_seed: int = 0,
            halving: HalvingReplay | None = None) -> dict[str, Any]:
    """Everything ``study.json`` reports, from the per-seed records (pure: no training). ``halving``: the
    replay settings of ``halving`` and ``auto`` (``stage_steps``, ``reduction``, ``shortlist``,
    ``no_assistant``: the grid index of the student's own sparsity, or None)."""
    forms = {"paper": Tradeoff(lam, "paper", teacher_metric, chance),
             "retained": Tradeoff(lam, "retained", teacher_metric, chance)}
    m = measure(records, forms, rng_seed)
    candidates = candidate_rows(records, grid, m)
    correlation = correlations(m)
    strategies, partial = strategy_rows(records, grid, forms, m, points_per_round=points_per_round,
                                        optuna_budget=optuna_budget, optuna_seed=optuna_seed, halving=halving)
    lam_ranges = lambda_ranges(grid, forms, m)
    bisection_picks = strategies.get("paper", {}).get("bisection", {}).get("picks")
    return {"seeds": m.n, "judged_on": m.judged_on, "candidates": candidates, "best_student_sparsity": grid[m.best],
            "correlation": correlation, "strategies": strategies, "lambda_range_picking_best": lam_ranges,
            "direct_kd": direct_kd_block(records, grid, m, bisection_picks), "lam": lam,
            "teacher_metric": teacher_metric, "chance_metric": chance,
            "bootstrap_replicates": len(m.boots), "partial_stage_arms": partial,
            # what halving and auto were replayed on: the recorded halving arms, or (older records) the chains'
            # student curves
            "halving_replay": "arms" if all(r.arm_curves is not None for r in records) else "stage curves",
            "student_side": student_side_block(records, grid, m)}


def _mean_rank(*arrays: np.ndarray) -> np.ndarray:
    """Per row (seed), the mean over ``arrays`` of each candidate's rank (0 = lowest): a combination of scores
    on different scales."""
    return np.mean([np.argsort(np.argsort(a, axis=1), axis=1) for a in arrays], axis=0)


def predictor_rows(student: np.ndarray, scores: dict[str, np.ndarray], boots: list[np.ndarray]
                   ) -> dict[str, dict[str, Any]]:
    """For each predictor (seeds x candidates, higher = predicted better): Spearman of its mean with the mean
    student over candidates (with its bootstrap interval), and the held-out regret of each seed's argmax."""
    out = {}
    for name, sc in scores.items():
        picks = [int(np.argmax(row)) for row in sc]
        regrets = held_out_regrets(student, picks)
        out[name] = {"spearman": spearman(sc.mean(axis=0), student.mean(axis=0)),
                     "interval": interval([spearman(sc[b].mean(axis=0), student[b].mean(axis=0)) for b in boots]),
                     "picks": picks, "regret": {"mean": float(np.mean(regrets)), "per_seed": regrets,
                                                "interval": interval([float(np.mean([regrets[i] for i in b]))
                                                                      for b in boots])}}
    return out


def student_side_block(records: list[SeedRecord], grid: list[float], m: Measured) -> dict[str, Any] | None:
    """The student-side score against the lambda-tradeoff (paper form) as predictors of the student: each one's
    Spearman and argmax regret, and their combination by mean rank; None for studies recorded before it."""
    recorded = [r.student_scores for r in records]
    if not recorded or any(x is None for x in recorded):
        return None
    side = {k: np.array([x[k] for x in recorded if x is not None]) for k in STUDENT_SCORES}
    scores = {"lambda-tradeoff": m.tradeoff["paper"], **{f"student {k}": v for k, v in side.items()}}
    scores.update({f"lambda-tradeoff + student {k} (mean rank)": _mean_rank(m.tradeoff["paper"], v)
                   for k, v in side.items()})
    return {"grid": grid, "predictors": predictor_rows(m.student, scores, m.boots),
            "values": {k: [float(x) for x in v.mean(axis=0)] for k, v in side.items()}}


def measure(records: list[SeedRecord], forms: dict[str, Tradeoff], rng_seed: int) -> Measured:
    """The records as arrays, each form's tradeoff of every candidate, the best candidate and the resamples.

    Picks are made on the rows that select (the records' ``student``, replayed); they are judged on the held-out
    dev rows where every seed recorded them (:attr:`SeedRecord.judged`), else on the selection's own rows."""
    n = len(records)
    held = all(r.student_held is not None for r in records)
    student = np.array([r.judged[0] if held else r.student for r in records])
    direct = [r.judged[1] if held else r.direct for r in records]
    tradeoff = {f: np.array([[sc(m, a) for m, a in zip(r.metric, r.actual, strict=True)] for r in records])
                for f, sc in forms.items()}
    mean_student = student.mean(axis=0)
    rng = np.random.default_rng(rng_seed)
    return Measured(n=n, metric=np.array([r.metric for r in records]), student=student,
                    actual=np.array([r.actual for r in records]).mean(axis=0), tradeoff=tradeoff,
                    mean_student=mean_student, best=int(best_index(list(mean_student)) or 0),
                    boots=[rng.integers(0, n, n) for _ in range(BOOTSTRAP)] if n > 1 else [], direct=direct,
                    judged_on="held-out dev" if held else "selection")


def candidate_rows(records: list[SeedRecord], grid: list[float], m: Measured) -> list[dict[str, Any]]:
    """Per candidate: its search score, both tradeoffs, its assistant, the student through it (mean and sd over
    seeds) and the CPU of its chain and of its search evaluation."""
    rows = []
    for i, s in enumerate(grid):
        rows.append({
            "sparsity": s, "param_sparsity": float(m.actual[i]),
            "candidate_metric": {"mean": float(m.metric[:, i].mean()), "sd": m.sd(m.metric)[i]},
            "tradeoff": {"mean": float(m.tradeoff["paper"][:, i].mean()), "sd": m.sd(m.tradeoff["paper"])[i]},
            "tradeoff_retained": {"mean": float(m.tradeoff["retained"][:, i].mean()),
                                  "sd": m.sd(m.tradeoff["retained"])[i]},
            "assistant_metric": mean_or_none([r.assistant[i] for r in records]),
            "student_metric": {"mean": float(m.mean_student[i]), "sd": m.sd(m.student)[i],
                               "per_seed": [float(x) for x in m.student[:, i]]},
            "chain_cpu_seconds": float(np.mean([r.chain_cpu[i] for r in records])),
            "eval_cpu_seconds": float(np.mean([r.eval_cpu[i] for r in records]))})
    return rows


def correlations(m: Measured) -> dict[str, dict[str, Any]]:
    """Per tradeoff form, Spearman's correlation of the mean tradeoff and the mean student, with its interval."""
    out = {}
    for f in m.tradeoff:
        rho = spearman(m.tradeoff[f].mean(axis=0), m.mean_student)
        reps = [spearman(m.tradeoff[f][b].mean(axis=0), m.student[b].mean(axis=0)) for b in m.boots]
        out[f] = {"spearman": rho, "interval": interval(reps)}
    return out


def strategy_rows(records: list[SeedRecord], grid: list[float], forms: dict[str, Tradeoff], m: Measured, *,
                  points_per_round: int, optuna_budget: int, optuna_seed: int,
                  halving: HalvingReplay | None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]] | None]:
    """Per tradeoff form, each replayed strategy's row (a form without any is left out); and the price of
    partial-stage arms (from the paper form's replays)."""
    strategies: dict[str, dict[str, Any]] = {}
    partial = None
    for f, sc in forms.items():
        per_seed = [strategy_picks(r, sc, points_per_round, optuna_budget, optuna_seed + r.seed, halving)
                    for r in records]
        if f == "paper":
            partial = partial_stage_arms(records, per_seed, (halving or {}).get("no_assistant"))
        for name in rows_replayed(f, per_seed):
            strategies.setdefault(f, {})[name] = strategy_row(name, per_seed, records, grid, m)
    return strategies, partial


def rows_replayed(form: str, per_seed: list[dict[str, dict[str, Any]]]) -> list[str]:
    """The rows of a form's table: the strategies replayed on every seed (under the retained form, only those
    whose pick depends on the tradeoff)."""
    return [s for s in (*replayed(), AUTO_CHECKED, NEAREST_CHECKED, *stage_arm_rows()) if all(s in p for p in per_seed)
            and (form == "paper" or not form_free(s))]


def strategy_row(name: str, per_seed: list[dict[str, dict[str, Any]]], records: list[SeedRecord], grid: list[float],
                 m: Measured) -> dict[str, Any]:
    """One strategy's picks, held-out regret, evaluations, CPU against exhaustive's and pick minus direct KD;
    for a halving round, whether its best arm survived."""
    picks = [p[name]["pick"] for p in per_seed]
    regrets = held_out_regrets(m.student, picks)
    reps = [float(np.mean([regrets[i] for i in b])) for b in m.boots]
    exhaustive_cpu = float(np.mean([p["exhaustive"]["cpu"] for p in per_seed]))
    cpu = float(np.mean([p[name]["cpu"] for p in per_seed]))
    row = {"picks": [grid[k] for k in picks], "picked_best": sum(k == m.best for k in picks),
           "regret": {"mean": float(np.mean(regrets)), "per_seed": regrets, "interval": interval(reps)},
           "evaluations": float(np.mean([p[name]["evaluated"] for p in per_seed])),
           "cpu_seconds": cpu, "cost_vs_exhaustive": cpu / exhaustive_cpu if exhaustive_cpu else None,
           "minus_direct": minus_direct(m.student, picks, m.direct, m.boots)}
    if all("crossings" in p[name] for p in per_seed):  # a halving round: did its best arm survive?
        row["halving_round"] = {
            "best_arm_to_last_rung": sum(bool(p[name]["best_to_last_rung"]) for p in per_seed),
            "seeds": m.n, "pairs": sum(p[name]["crossings"]["pairs"] for p in per_seed),
            "crossed": sum(p[name]["crossings"]["crossed"] for p in per_seed)}
    return row


def held_out_regrets(student: np.ndarray, picks: list[int]) -> list[float]:
    """Regret on held-out seeds: the pick made on seed i is judged by the other seeds' students (all seeds when
    there is one), so exhaustive's pick is not rewarded for the noise it was picked on."""
    n = len(student)
    regrets = []
    for i, pk in enumerate(picks):
        others = student[[j for j in range(n) if j != i]] if n > 1 else student
        mean = others.mean(axis=0)
        regrets.append(float(mean.max() - mean[pk]))
    return regrets


def lambda_ranges(grid: list[float], forms: dict[str, Tradeoff], m: Measured) -> dict[str, Any]:
    """Per tradeoff form, the range of lambda whose argmax over the mean candidate scores is the best student's
    candidate (None when no lambda picks it)."""
    out = {}
    for f, sc in forms.items():
        scaled = [float(np.mean([sc.scaled(x) for x in m.metric[:, i]])) for i in range(len(grid))]
        out[f] = lambda_range(scaled, list(m.actual), m.best)
    return out


def direct_kd_block(records: list[SeedRecord], grid: list[float], m: Measured,
                    bisection_picks: list[float] | None) -> dict[str, Any] | None:
    """Direct KD at the TA path's total steps (when every seed has it), and the best TA path and the bisection's
    pick against it, with their intervals."""
    direct = [d for d in m.direct if d is not None]
    if len(direct) != m.n:
        return None
    d, student, boots = np.array(direct), m.student, m.boots
    gap = float(student[:, m.best].mean() - d.mean())
    reps = [float(student[b, m.best].mean() - d[b].mean()) for b in boots]
    pick_gap = None
    if bisection_picks:
        via = [student[i, grid.index(pk)] for i, pk in enumerate(bisection_picks)]
        pick_gap = {"mean": float(np.mean(via) - d.mean()),
                    "interval": interval([float(np.mean([via[i] for i in b]) - d[b].mean()) for b in boots])}
    return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if m.n > 1 else 0.0,
            "per_seed": [float(x) for x in d],
            "cpu_seconds": float(np.mean([r.direct_cpu for r in records])),
            "best_assistant_minus_direct": {"mean": gap, "interval": interval(reps)},
            "bisection_pick_minus_direct": pick_gap}


def minus_direct(student: np.ndarray, picks: list[int], direct: list[float | None],
                  boots: list[np.ndarray]) -> dict[str, Any] | None:
    """The student through each seed's pick minus that seed's direct KD (same total steps), mean and bootstrap
    interval: does following the strategy beat skipping the assistant?"""
    if any(d is None for d in direct):
        return None
    diff = np.array([student[i, pk] - float(direct[i]) for i, pk in enumerate(picks)])  # type: ignore[arg-type]
    return {"mean": float(diff.mean()), "per_seed": [float(x) for x in diff],
            "interval": interval([float(diff[b].mean()) for b in boots])}


def mean_or_none(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def compare_two(records: list[SeedRecord], grid: list[float], two: list[dict[str, Any]]) -> dict[str, Any]:
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
