"""One arm of trial distillation: the path teacher -> assistant -> student (or "no assistant": direct KD from the
teacher) trained the way the chain will, rung by rung, with the student's dev metric reported at each rung
(:class:`ArmRun`); :class:`HalvingPayload` is what every arm trial receives."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from minidisc_ray.candidates import SearchPayload, prune_student
from minidisc_ray.config import Config
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import Loop, LoopSpec, evaluate_rows
from minidisc_ray.keys import ARM
from minidisc_ray.modelio.fingerprint import load_recovered, save_recovered
from minidisc_ray.pruning import prune_model
from minidisc_ray.records import EvaluationStore, digest
from minidisc_ray.schedule import plan_schedule
from minidisc_ray.search.trial import _device
from minidisc_ray.stats import pack_rows
from minidisc_ray.training import distill, kd_loss_fn

NONE_ARM = "none"


@dataclass
class HalvingPayload:
    """What every halving trial shares: the search's payload and the trial budget."""

    search: SearchPayload
    rungs: list[int]  # student-link steps at which the student is evaluated and reported
    lr: float
    batch_size: int
    importance_samples: int
    importance_batch: int
    # arm -> (path, SHA-256) of the lambda search's recovered candidate, its first link (auto; see ArmRun)
    recovered: dict[float, tuple[str, str]] = field(default_factory=dict)

    def rung_key(self, arm: float, rung: int) -> str:
        s = self.search
        return digest("halving", s.context_key, arm, s.student_sparsity, self.rungs[rung], s.recovery, self.lr,
                      self.batch_size, self.importance_samples, self.importance_batch, s.importance_method, s.layout,
                      s.config_keys.get(ARM, ""))


def rungs_for(steps: int, min_fraction: float, reduction: int) -> list[int]:
    """Student-link steps of each rung, geometric down from ``steps`` by ``reduction`` while at least
    ``steps * min_fraction``: e.g. 120 steps, a ninth, 3 -> [13, 40, 120]."""
    out = [steps]
    r = steps / reduction
    while r >= steps * min_fraction - 1e-9 and round(r) >= 1 and round(r) < out[0]:
        out.insert(0, round(r))
        r /= reduction
    return out


class ArmRun:
    """One arm's trial distillation in this process (plain torch): built on the first :meth:`advance`,
    then trained rung by rung. Used by the Tune trainables (``halving``, ``auto``), the Optuna actor
    (``optuna-kd``) and ``minidisc study``'s arm trials.

    The first link is the search's own view of the candidate (pruned from the teacher, recovered for
    ``recovery.steps``): when the lambda search kept that candidate's recovered weights
    (``HalvingPayload.recovered``, checked against the SHA-256 in its signed evaluation record) they are
    loaded instead of trained again. The student link draws its randomness from a seed of its own, so it
    trains the same whether the first link was trained here or loaded."""

    def __init__(self, hp: HalvingPayload, arm: float) -> None:
        self.hp, self.arm = hp, float(arm)
        self.loop: Loop | None = None  # built on the first advance, with the student, its data and the dev loader
        self.student: nn.Module | None = None
        self.data: Iterator[dict[str, torch.Tensor]] = iter(())
        self.dev_loader: DataLoader | None = None
        self.first_link = "trained"
        self.first_cpu_seconds = 0.0
        self.eval_cpu_seconds = 0.0  # spent evaluating the student (minidisc study separates it from training)
        self.kept: tuple[str, str] | None = None  # (file, SHA-256) of the first link this arm trained and kept
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _build(self) -> tuple[Loop, nn.Module, DataLoader]:
        hp, p = self.hp, self.hp.search
        device = _device()
        torch.manual_seed(p.seed)
        rec_cfg = p.recovery
        plan = plan_schedule([self.arm] if self.arm < p.student_sparsity else [], p.student_sparsity, hp.rungs[-1])
        teacher = p.teacher().to(device)
        train, dev = p.dataset("train"), p.dataset("dev")
        self.dev_loader = make_loader(dev, p.tokenizer, 64)
        first = prune_model(teacher, p.plan_for(plan.path[0].unit_sparsity))
        # the first link for the recovery budget: the assistant (as the search scores it), or, with no
        # assistant, the student's first steps from the teacher, so that every arm trains the same total steps
        if load_recovered(first, hp.recovered.get(self.arm)):
            self.first_link = "reused"
        else:
            data = infinite(make_loader(train, p.tokenizer, rec_cfg.batch_size, shuffle=True, seed=p.seed))
            distill(first, teacher, data, rec_cfg.steps, rec_cfg.lr, rec_cfg.temperature, p.regression,
                    rec_cfg.hard_label_weight)
            path = p.recovered_path(self.arm)
            if path is not None:  # kept: the arm's later rungs load it
                self.kept = (path, save_recovered(first, path))
        self.first_cpu_seconds = time.process_time() - self.c0
        torch.manual_seed(p.seed + 1)  # the student link: the same draws after a trained or a loaded first link
        if plan.direct:
            student, source = first, teacher
        else:
            del teacher
            source = first.eval()
            student = prune_student(first, train, p.tokenizer, p.student_sparsity, p.teacher_units,
                                    hp.importance_samples, hp.importance_batch, p.seed, p.importance_method, p.layout,
                                    p.shape_spec)
        student.requires_grad_(True)  # every weight trains, as in the chain's student stage (a cut keeps its flags)
        self.student = student
        self.data = infinite(make_loader(train, p.tokenizer, hp.batch_size, shuffle=True, seed=p.seed + 1))
        self.loop = Loop(student, LoopSpec(steps=hp.rungs[-1], lr=hp.lr, warmup_ratio=0.1),
                         kd_loss_fn(source, rec_cfg.temperature, p.regression, rec_cfg.hard_label_weight))
        student.train()
        return self.loop, student, self.dev_loader

    def advance(self, rung: int, evaluate_it: bool = True) -> dict[str, Any] | None:
        """Train the student up to rung ``rung`` (0-based) and return its result (None without evaluation)."""
        if self.loop is None or self.student is None or self.dev_loader is None:
            loop, student, dev_loader = self._build()
        else:
            loop, student, dev_loader = self.loop, self.student, self.dev_loader
        steps = self.hp.rungs[rung]
        while loop.state.step < steps:
            loop.step(self.data)
        if not evaluate_it:
            return None
        c0 = time.process_time()
        scores, correct = evaluate_rows(student, dev_loader, self.hp.search.metric)
        metric = float(scores["metric"])
        self.eval_cpu_seconds += time.process_time() - c0
        student.train()
        return {"student_metric": metric, **({"dev_correct": pack_rows(correct)} if correct is not None else {}),
                "steps": self.hp.search.recovery.steps + steps, "student_steps": steps,
                "seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0,
                "first_link_cpu_seconds": self.first_cpu_seconds, "first_link": self.first_link,
                **({"recovered_sha256": self.kept[1]} if self.kept else {})}

    def recorded_rung(self, rung: int) -> dict[str, Any] | None:
        """Rung ``rung`` (0-based) as an earlier run recorded it, or None."""
        rec = self.hp.search.finished.get(self.hp.rung_key(self.arm, rung))
        if rec is None:
            return None
        kept: dict[str, Any] = {k: rec[k] for k in ("steps", "student_steps", "seconds", "cpu_seconds", "dev_correct")
                                if k in rec}
        return {"student_metric": rec["metric"], **kept}

    def recorded(self) -> list[dict[str, Any]]:
        """The arm's first rungs as recorded by an earlier run (in order, up to the first missing one)."""
        out = []
        for i in range(len(self.hp.rungs)):
            rec = self.recorded_rung(i)
            if rec is None:
                break
            out.append(rec)
        return out


def arm_name(arm: float, student_sparsity: float) -> str:
    return "no assistant" if arm >= student_sparsity else f"assistant {arm:g}"


def make_payload(search: SearchPayload, cfg: Config) -> HalvingPayload:
    se = cfg.search
    steps = se.halving_steps or cfg.distill.steps
    return HalvingPayload(replace(search), rungs_for(steps, se.halving_min_fraction, se.halving_reduction),
                          lr=cfg.distill.lr, batch_size=cfg.distill.batch_size,
                          importance_samples=min(cfg.pruning.importance_samples, 256),
                          importance_batch=cfg.pruning.batch_size)


def with_records(payload: SearchPayload, cfg: Config, output_dir: Path,
                 arms: list[float]) -> tuple[HalvingPayload, EvaluationStore]:
    """The trial payload for ``arms`` with every rung ``OUTPUT/evaluations`` already holds, and that store."""

    hp = make_payload(payload, cfg)
    store = EvaluationStore(output_dir / "evaluations")
    hp.search.finished = {k: r for a in arms for i in range(len(hp.rungs))
                          if (r := store.get(k := hp.rung_key(a, i))) is not None}
    return hp, store


def record_rung(store: EvaluationStore, key: str, arm: float, result: dict[str, Any]) -> None:
    """Record one finished rung (the fields :meth:`ArmRun.recorded` reads back)."""
    fields = ("steps", "student_steps", "seconds", "cpu_seconds", "dev_correct")
    kept: dict[str, Any] = {k: result[k] for k in fields if k in result}
    store.put(key, {"metric": result["student_metric"], "sparsity": arm, **kept})
