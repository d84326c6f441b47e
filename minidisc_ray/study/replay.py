"""Each strategy replayed on one seed's records with nothing trained again (the registry's ``replayable`` strategies,
their stage-arm variants, auto + direct KD), and the price of partial-stage arms."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import numpy as np

from minidisc_ray.search.replay import bisection_order, optuna_order
from minidisc_ray.strategies import REGISTRY, ReplaySettings, names
from minidisc_ray.study.records import SeedRecord
from minidisc_ray.tradeoff import Tradeoff


class HalvingReplay(TypedDict, total=False):
    """The replay settings of ``halving`` and ``auto`` (the :class:`ReplaySettings` fields of the same names)."""

    stage_steps: int  # steps of one chain stage
    reduction: int  # successive halving keeps the best 1/reduction of the arms at each rung
    shortlist: int  # auto: the lambda search's top candidates that go on to halving
    no_assistant: int | None  # the grid index of the student's own sparsity, if it is on the grid
    rungs: list[int]  # the halving round's rungs (student-link steps)


AUTO_CHECKED = "auto + direct KD"  # auto's chain or the direct-KD baseline minidisc run trains, the better on dev
# no search at all: the chain through the grid's candidate nearest above the student (a size prior) and direct KD,
# the better on the rows that select; the cheapest rule that still has "no assistant" as a choice
NEAREST_CHECKED = "nearest assistant + direct KD"


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
    if row == NEAREST_CHECKED:
        return True
    name = stage_arm_rows().get(row, row)
    return name in REGISTRY and not REGISTRY[name].needs_tradeoff


def nearest_checked(rec: SeedRecord, no_assistant: int | None) -> dict[str, Any] | None:
    """No search: the chain through the candidate nearest above the student (the grid's point just below the
    student's own sparsity), and direct KD at the same total steps; the better on the rows that select. It costs
    those two runs and evaluates no candidate."""
    if no_assistant is None or no_assistant < 1 or rec.direct is None:
        return None
    k = no_assistant - 1
    better = no_assistant if rec.direct > rec.student[k] else k
    return {"pick": better, "evaluated": 0, "cpu": float(rec.chain_cpu[k]) + rec.direct_cpu}


def checked_against_direct(rec: SeedRecord, auto: dict[str, Any] | None,
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
                   optuna_seed: int, halving: HalvingReplay | None = None) -> dict[str, dict[str, Any]]:
    """Each strategy's pick on one seed's records, the candidates it evaluated and its CPU-seconds (its
    evaluations, then the chain through its pick; exhaustive: a chain through every candidate): every
    registered strategy that can be replayed from these records (:meth:`Strategy.replay`)."""
    curve = [scorer(m, a) for m, a in zip(rec.metric, rec.actual, strict=True)]
    settings = ReplaySettings(points_per_round, optuna_budget, optuna_seed, scorer, **(halving or {}),
                              bisection_order=bisection_order, optuna_order=optuna_order)
    out: dict[str, dict[str, Any]] = {}
    for name in replayed():
        picked = REGISTRY[name].replay(rec, curve, settings)
        if picked is not None:
            out[name] = picked
    checked = checked_against_direct(rec, out.get("auto"), (halving or {}).get("no_assistant"))
    if checked is not None:
        out[AUTO_CHECKED] = checked
    nearest = nearest_checked(rec, (halving or {}).get("no_assistant"))
    if nearest is not None:
        out[NEAREST_CHECKED] = nearest
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


def partial_stage_arms(records: list[SeedRecord], per_seed: list[dict[str, dict[str, Any]]],
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
