"""What one study trial trains, in plain torch (:func:`run_unit`): a path through one candidate (its search score,
then the chain's two links), a halving arm, direct KD, a chain through two assistants or the sandwich;
:func:`study_trial` is its Tune trainable."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, TypedDict

import ray.tune as tune
import torch
from torch import nn

from minidisc_ray.candidates import SearchPayload, prune_student, sandwich_scores, score_candidate
from minidisc_ray.config import DistillConfig
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import evaluate
from minidisc_ray.families import count_params
from minidisc_ray.keys import STUDY
from minidisc_ray.pruning import prune_model
from minidisc_ray.ray_env import resolved
from minidisc_ray.records import digest
from minidisc_ray.schedule import Link, Schedule, path_total_steps, plan_schedule, run_in_process
from minidisc_ray.search.arms import ArmRun, HalvingPayload
from minidisc_ray.search.trial import _device, _threads
from minidisc_ray.training import distill_stage


class _UnitFields(TypedDict):
    kind: str  # path, arm, direct, two or sandwich
    seed: int


class StudyUnit(_UnitFields, total=False):
    """One study trial, as Tune's grid hands it to :func:`study_trial` (``config["unit"]``). A plain dict: the
    trials' records on disk are keyed by :meth:`StudyPayload.key` of these fields, and a dict crosses Tune's
    config (its params.json) as it is."""

    sparsity: float  # path and arm: the candidate
    sparsities: list[float]  # two: TA 1 and TA 2


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

    def key(self, unit: StudyUnit) -> str:
        """Everything that determines a trial's result."""
        what = self.distill.what_it_computes()
        extra = self.grid if unit["kind"] == "sandwich" else unit.get("sparsities", unit.get("sparsity"))
        parts: list[Any] = ["study", self.search.context_key, unit["kind"], extra, unit["seed"],
                            self.search.recovery, what, self.search.student_sparsity, self.importance_samples,
                            self.importance_seed, self.search.importance_method, self.search.layout]
        if unit["kind"] == "arm" and self.halving is not None:
            h = self.halving
            parts += [h.rungs, h.lr, h.batch_size, h.importance_samples, h.importance_batch]
        parts.append(self.search.config_keys.get(STUDY, ""))
        if unit["kind"] == "path" and float(unit["sparsity"]) >= self.search.student_sparsity:
            parts.append("no-assistant=direct-kd-at-path-total")  # trained one stage's steps before this
        return digest(*parts)


def cpu_clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def cpu_since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def run_unit(sp: StudyPayload, unit: StudyUnit, device: str | torch.device = "cpu") -> dict[str, Any]:
    """One study trial in this process: a ``path`` (candidate score + trial distillation through it), an ``arm``
    (what a halving arm trains), ``direct`` (teacher -> student at the TA path's budget), ``two`` (the chain
    through two assistants) or ``sandwich`` (the one-trial schedule)."""
    p = dataclasses.replace(sp.search, seed=int(unit["seed"]))
    kind = unit["kind"]
    if kind == "sandwich":
        return _sandwich_trial(sp, p, device)
    if kind == "arm":
        return _arm_trial(sp, p, float(unit["sparsity"]))
    chain = ChainTrainer(sp, p, device)
    if kind == "direct":
        return _direct_trial(chain)
    if kind == "two":
        s1, s2 = (float(x) for x in unit["sparsities"])
        return _two_assistant_trial(chain, s1, s2)
    return _path_trial(chain, float(unit["sparsity"]))


def _sandwich_trial(sp: StudyPayload, p: SearchPayload, device: str | torch.device) -> dict[str, Any]:
    """The sandwich's one trial: every candidate of the grid scored with shared weights."""
    t = cpu_clock()
    res = sandwich_scores(p, sp.grid, device)
    wall, cpu = cpu_since(t)
    cands = [{k: c[k] for k in ("sparsity", "param_sparsity", "metric")} for c in res["candidates"]]
    return {"kind": "sandwich", "seed": p.seed, "candidates": cands, "metric": max(c["metric"] for c in cands),
            "seconds": wall, "cpu_seconds": cpu}


def _arm_trial(sp: StudyPayload, p: SearchPayload, sparsity: float) -> dict[str, Any]:
    """What a halving arm trains (:class:`ArmRun`), its student evaluated at every rung."""
    assert sp.halving is not None
    hp = dataclasses.replace(sp.halving, search=p)
    arm = ArmRun(hp, sparsity)
    curve = [[steps, float(arm.advance(i)["student_metric"])] for i, steps in enumerate(hp.rungs)]  # type: ignore[index]
    wall, cpu = time.perf_counter() - arm.t0, time.process_time() - arm.c0
    return {"kind": "arm", "seed": p.seed, "sparsity": sparsity, "metric": curve[-1][1],
            "arm_curve": curve, "student_steps": hp.rungs[-1], "first_link_cpu_seconds": arm.first_cpu_seconds,
            "eval_cpu_seconds": arm.eval_cpu_seconds / len(curve),
            "student_link_cpu_seconds": cpu - arm.first_cpu_seconds - arm.eval_cpu_seconds,
            "seconds": wall, "cpu_seconds": cpu}


class ChainTrainer:
    """The links of one trial's chain, in this process: the trial's data and teacher, how a link's model is cut
    (from the teacher by the job's importance, or from its source by the source's own) and how it is distilled
    (the chain's recipe, seeded by the trial's seed): what :func:`run_in_process` runs a schedule with."""

    def __init__(self, sp: StudyPayload, p: SearchPayload, device: str | torch.device) -> None:
        self.sp, self.p, self.device = sp, p, device
        self.seed = p.seed
        self.train, dev = p.dataset("train"), p.dataset("dev")
        self.dev_loader = make_loader(dev, p.tokenizer, 64)
        # the task's dev rows kept back from every choice: each link's final model is reported on them too
        self.held_out_loader = (make_loader(p.dataset("held_out"), p.tokenizer, 64)
                                if p.held_out_table is not None else None)
        self.teacher = p.teacher().to(device)

    def run(self, plan: Schedule, with_baseline: bool = True) -> dict[str, Any]:
        """Every link of ``plan`` (and its baseline, with ``with_baseline``), stage name -> result."""
        return run_in_process(plan, self.teacher, self.cut, self.train_link, with_baseline=with_baseline)

    def cut(self, link: Link, source: nn.Module) -> nn.Module:
        p, sp = self.p, self.sp
        if link.cut_from == "teacher":  # by the job's importance, as the search's candidates are cut
            plan = p.plan_for(link.unit_sparsity)
            # trainable throughout, as the chain's stage trains it (a cut of the frozen teacher keeps its flags)
            return prune_model(source, plan).to(self.device).requires_grad_(True)
        return prune_student(source, self.train, p.tokenizer, link.unit_sparsity, p.teacher_units,
                             sp.importance_samples, sp.importance_batch, sp.importance_seed, p.importance_method,
                             p.layout, p.shape_spec).to(self.device)

    def train_link(self, link: Link, student: nn.Module, source: nn.Module) -> dict[str, Any]:
        out = self._distill(student, source, dataclasses.replace(self.sp.distill, steps=link.steps), self.seed)
        if not math.isfinite(out["metric"]):  # a stage that never evaluated: measure what it ended with
            out["metric"] = evaluate(student, self.dev_loader, self.p.metric)["metric"]
        out["params"] = count_params(student)[1]
        if self.held_out_loader is not None:  # the best weights (chosen on the validation rows) on the held-out rows
            out["held_out_metric"] = evaluate(student, self.held_out_loader, self.p.metric)["metric"]
        return out

    def _distill(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, stage_seed: int) -> dict[str, Any]:
        p = self.p
        torch.manual_seed(stage_seed)
        data = infinite(make_loader(self.train, p.tokenizer, cfg.batch_size, shuffle=True, seed=stage_seed))
        t0 = cpu_clock()
        out = distill_stage(student, teacher, data, self.dev_loader, p.metric, p.regression, cfg)
        out["seconds"], out["cpu_seconds"] = cpu_since(t0)
        return out


def _direct_trial(chain: ChainTrainer) -> dict[str, Any]:
    """The baseline of the one-assistant path: teacher -> student at its total steps."""
    link = plan_schedule([], chain.p.student_sparsity, chain.sp.distill.steps).path[0]
    (st,) = chain.run(Schedule((dataclasses.replace(link, name="direct_kd"),), None)).values()
    return {"kind": "direct", "seed": chain.seed, "metric": st["metric"], "steps_run": st["steps_run"],
            **({"held_out_metric": st["held_out_metric"]} if "held_out_metric" in st else {}),
            "best_step": st["best_step"], "params": st["params"], "seconds": st["seconds"],
            "cpu_seconds": st["cpu_seconds"], "curve": st["curve"]}


def _two_assistant_trial(chain: ChainTrainer, s1: float, s2: float) -> dict[str, Any]:
    """Teacher -> TA 1 -> TA 2 -> student, the three links sharing the TA path's total steps."""
    steps = chain.sp.distill.steps
    plan = plan_schedule([s1, s2], chain.p.student_sparsity, steps, total=path_total_steps(steps))
    links = list(chain.run(plan, with_baseline=False).values())
    return {"kind": "two", "seed": chain.seed, "sparsities": [s1, s2], "metric": links[-1]["metric"],
            "link_metrics": [x["metric"] for x in links], "steps_run": sum(x["steps_run"] for x in links),
            "seconds": sum(x["seconds"] for x in links), "cpu_seconds": sum(x["cpu_seconds"] for x in links)}


def _path_trial(chain: ChainTrainer, s: float) -> dict[str, Any]:
    """A path through candidate ``s``: its search score (recovery budget), then the chain through it."""
    p = chain.p
    t = cpu_clock()
    # the search's view of this candidate (recovery budget), and the student-side score of the recovered candidate
    # (its time apart: the study measures the score, no strategy replayed here pays for it)
    cand = score_candidate(p, s, device=chain.device, student_score=True)
    cand_wall, cand_cpu = cpu_since(t)
    score_cpu = cand["student_score_cpu_seconds"]
    out: dict[str, Any] = {"kind": "path", "seed": chain.seed, "sparsity": s, "param_sparsity": cand["param_sparsity"],
                           "candidate_metric": cand["metric"], "candidate_params": cand["params"],
                           "candidate_cpu_seconds": cand_cpu - score_cpu, "candidate_seconds": cand_wall,
                           "student_score_cpu_seconds": score_cpu,
                           **{k: cand[k] for k in ("student_alignment", "student_stability", "student_kd_loss")}}
    # the candidate as the job's assistant; at the student's own sparsity "no assistant": direct KD at the
    # TA path's total steps (plan_schedule), what minidisc run then trains
    plan = plan_schedule([s] if s < p.student_sparsity else [], p.student_sparsity, chain.sp.distill.steps)
    results = chain.run(plan, with_baseline=False)
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
    if "held_out_metric" in student:
        out["student_held_out_metric"] = student["held_out_metric"]
    out["seconds"] = out["candidate_seconds"] + out["assistant_seconds"] + out["student_seconds"]
    out["cpu_seconds"] = out["candidate_cpu_seconds"] + out["assistant_cpu_seconds"] + out["student_cpu_seconds"]
    return out


def study_trial(config: dict[str, Any], payload: StudyPayload) -> None:
    """Ray Tune function trainable of one study trial (``config["unit"]``); recorded ones are reported."""

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


# the fields of a trial's result its record keeps
KEPT_FIELDS = (
    "kind", "seed", "sparsity", "param_sparsity", "candidate_metric", "candidate_params", "candidate_cpu_seconds",
    "candidate_seconds", "assistant_metric", "assistant_steps", "assistant_cpu_seconds", "assistant_seconds",
    "metric", "student_steps", "student_params", "student_cpu_seconds", "student_seconds", "seconds", "cpu_seconds",
    "candidates", "steps_run", "best_step", "params", "sparsities", "link_metrics", "curve", "student_curve",
    "arm_curve", "first_link_cpu_seconds", "eval_cpu_seconds", "student_link_cpu_seconds",
    "student_alignment", "student_stability", "student_kd_loss", "student_score_cpu_seconds",
    "held_out_metric", "student_held_out_metric")
