"""The study's analysis: regret on held-out seeds, cost against exhaustive, the pick against direct KD, Spearman
correlation of tradeoff and student, the lambda range that picks the best assistant, with bootstrap intervals."""

from __future__ import annotations

from typing import Any

import numpy as np

from minidisc_ray.stats import BOOTSTRAP, interval, spearman
from minidisc_ray.study.records import SeedRecord
from minidisc_ray.study.replay import (
    AUTO_CHECKED,
    form_free,
    partial_stage_arms,
    replayed,
    stage_arm_rows,
    strategy_picks,
)
from minidisc_ray.tradeoff import Tradeoff, best_index, lambda_range


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
            "assistant_metric": mean_or_none([r.assistant[i] for r in records]),
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
            partial = partial_stage_arms(records, per_seed, (halving or {}).get("no_assistant"))
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
                "minus_direct": minus_direct(student, picks, [r.direct for r in records], boots)}
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
