"""The study's trial records gathered per seed (:class:`SeedRecord`: each candidate's search score, its path's
student, its arm's curve, the CPU each took) and the candidates a study evaluates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minidisc_ray.errors import UserInputError
from minidisc_ray.study.trials import StudyPayload


def pick_candidates(grid: list[float], count: int | None, student_sparsity: float) -> list[float]:
    """``count`` candidates spread evenly over the sorted grid, both ends kept (all of it when None)."""
    g = sorted(float(s) for s in grid)
    if count is None or count >= len(g):
        return g
    if count < 2:
        raise UserInputError("--candidates", count, "use at least 2 (the two ends of the grid)")
    idx = sorted({round(i * (len(g) - 1) / (count - 1)) for i in range(count)})
    return [g[i] for i in idx]


STUDENT_SCORES = ("alignment", "stability")  # the student-side statistics a path trial records


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
    # per candidate, the student-side score of its recovered candidate (minidisc_ray.student_score): statistic ->
    # values; None for studies recorded before it
    student_scores: dict[str, list[float]] | None = None
    # the students (through each candidate, and direct KD) on the task's dev rows that no choice saw
    # (task.validation_fraction > 0): what the study judges picks by; None for studies that selected on dev
    student_held: list[float] | None = None
    direct_held: float | None = None

    @property
    def judged(self) -> tuple[list[float], float | None]:
        """(students through each candidate, direct KD): the held-out figures where recorded, else the figures
        of the rows that selected (whose own noise then flatters the pick made on them)."""
        if self.student_held is not None:
            return self.student_held, self.direct_held
        return self.student, self.direct


def seed_records(sp: StudyPayload, results: dict[str, dict[str, Any]], seeds: list[int],
                 grid: list[float], student_sparsity: float | None = None) -> list[SeedRecord]:
    """Each seed's trial records (``results``: record key -> the trial's record) gathered into a
    :class:`SeedRecord`: its paths, direct KD, sandwich and (when all were recorded) halving arms. Direct KD is
    the ``direct`` trial where one was recorded (studies before direct KD was trained once per seed), else the
    path at the student's own sparsity ("no assistant"), the same run."""
    records = []
    for j in seeds:
        paths = [results[sp.key({"kind": "path", "sparsity": s, "seed": j})] for s in grid]
        direct = results.get(sp.key({"kind": "direct", "seed": j}))
        if direct is None and student_sparsity in grid:
            no_ta = paths[grid.index(student_sparsity)]
            direct = {"metric": no_ta["metric"], "cpu_seconds": no_ta["student_cpu_seconds"],
                      **({"held_out_metric": no_ta["student_held_out_metric"]}
                         if "student_held_out_metric" in no_ta else {})}
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
            curves=[p["student_curve"] for p in paths] if all("student_curve" in p for p in paths) else None,
            student_scores={k: [p[f"student_{k}"] for p in paths] for k in STUDENT_SCORES}
            if all(f"student_{k}" in p for p in paths for k in STUDENT_SCORES) else None,
            student_held=[p["student_held_out_metric"] for p in paths]
            if all("student_held_out_metric" in p for p in paths) else None,
            direct_held=direct.get("held_out_metric") if direct else None))
        arms = [a for s in grid if (a := results.get(sp.key({"kind": "arm", "sparsity": s, "seed": j}))) is not None]
        if len(arms) == len(grid):  # every candidate's arm recorded
            r = records[-1]
            r.arm_curves = [a["arm_curve"] for a in arms]
            r.arm_first_cpu = [a["first_link_cpu_seconds"] for a in arms]
            r.arm_link_cpu = [a["student_link_cpu_seconds"] for a in arms]
            r.arm_eval_cpu = [a["eval_cpu_seconds"] for a in arms]
    return records
