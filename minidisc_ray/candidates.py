"""Slice, recover and score teacher-assistant candidates: plain torch, no Ray.

:class:`SearchPayload` is everything a candidate evaluation needs (teacher, importance, data, budget).
:func:`score_candidate` evaluates one candidate (and, for trial distillation, the student distilled
through it); :func:`sandwich_scores` is the reference code's one-trial schedule that trains every
width on shared weights. The Ray Tune trainables in ``search/trial.py`` wrap these in a few lines;
unit tests call them directly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from torch import nn
from transformers import PreTrainedTokenizerBase

from minidisc_ray.budget import CostModel, Limits, ShapeSpec, budget_plans, cost_in
from minidisc_ray.config import RecoveryConfig
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import Loop, LoopSpec, evaluate
from minidisc_ray.families import count_params, unit_counts
from minidisc_ray.keys import CANDIDATE, KEY_VERSION, KINDS, config_key
from minidisc_ray.logs import log
from minidisc_ray.losses import minidisc_loss
from minidisc_ray.metrics import chance_metric
from minidisc_ray.modelio.blobs import model_blob, model_from_blob, share_key
from minidisc_ray.modelio.fingerprint import save_recovered
from minidisc_ray.modelio.load import load_model_dir
from minidisc_ray.modelio.sharded import check_shardable
from minidisc_ray.offline import OfflineTargets, offline_kd_loss_fn
from minidisc_ray.pipeline import Prepared, importance_of, importance_sample
from minidisc_ray.pruning import (
    Importance,
    PruningPlan,
    compute_importance,
    param_sparsity,
    plan_for_sparsity,
    prune_model,
    sliced,
)
from minidisc_ray.records import digest, tensor_fingerprint
from minidisc_ray.schedule import plan_schedule
from minidisc_ray.student_score import student_signal
from minidisc_ray.tradeoff import Tradeoff
from minidisc_ray.training import distill


@dataclass
class SearchPayload:
    """What every candidate evaluation of one job shares.

    ``teacher_blob``, ``train_table`` and ``dev_table`` may be Ray ``ObjectRef``\\ s (put once per job,
    read without copying by every trial on a node); a trial replaces them by the objects first
    (``ray_env.resolved``), so this module never talks to Ray.
    """

    teacher_blob: Any
    tokenizer: PreTrainedTokenizerBase
    importance: Importance
    train_table: Any
    dev_table: Any
    metric: str
    regression: bool
    teacher_prunable: int
    teacher_units: tuple[int, int]
    lam: float
    recovery: RecoveryConfig
    student_sparsity: float
    seed: int
    events_path: str | None = None
    context_key: str = ""  # identity of the teacher (weights and config) and the data, and the key version
    # record kind -> digest of the config fields that decide it (minidisc_ray.keys.config_key)
    config_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    teacher_fp: str = ""  # fingerprint of the teacher's weights (names its object-store copy)
    finished: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # evaluation key -> result
    importance_method: str = "gradient"  # how a candidate is pruned into the student (exhaustive)
    layout: str = "global"  # pruning.layout
    base_units: tuple[int, int] | None = None  # the original teacher's units when searching below an assistant
    tradeoff_form: str = "paper"  # pruning.tradeoff
    teacher_metric: float = 1.0  # the teacher's dev metric and that of the majority class: the "retained" form's scale
    chance_metric: float = 0.0
    trial_workers: int = 1  # search.trial_workers: > 1 recovers a candidate on a Ray Train worker group (FSDP)
    trial_cpus: float = 1.0  # search.trial_cpus and search.trial_gpus: what one trial holds in all
    trial_gpus: float = 0.0
    # auto: a directory (OUTPUT/recovered) where candidate trials keep their recovered weights for the halving
    # round; a trial that cannot see it (another node without shared storage) keeps nothing
    recovered_dir: str | None = None
    offline_targets: str | None = None  # teacher.placement: offline: the teacher's top-k targets (train rows keyed)
    # teacher.placement: sharded: the teacher's directory, which every worker of a multi-worker trial reads its
    # shard of (teacher and candidate) and a one-process trial loads whole; teacher_blob is then None (never in
    # the object store)
    teacher_dir: str | None = None
    kind: str = "classification"  # the teacher's head: classification (also regression) or lm
    # pruning.axes with hidden or depth: the cut of each grid point (and of the student's budget), a shape chosen
    # per budget on the driver (minidisc_ray.budget); empty: the unit-sparsity cuts of heads and FFN neurons
    plans: dict[float, PruningPlan] = dataclasses.field(default_factory=dict)
    shape_spec: ShapeSpec | None = None
    # the task's dev rows kept back from every choice (task.validation_fraction > 0; dev_table is then the
    # validation split): what a study reports its students on
    held_out_table: Any = None

    def plan_for(self, sparsity: float) -> PruningPlan:
        """The cut of the teacher at grid point ``sparsity``: its budget's shape, or the unit-sparsity plan."""
        if self.plans:
            if sparsity not in self.plans:
                raise ValueError(f"no shape was chosen for budget {sparsity} (chosen: {sorted(self.plans)})")
            return self.plans[sparsity]
        return plan_for_sparsity(self.importance, sparsity, base_units=self.base_units, layout=self.layout)

    @classmethod
    def from_prepared(cls, prep: Prepared, events_path: str | None = None,
                      share: Callable[[str, str, Callable[[], Any]], Any] | None = None,
                      with_shapes: bool = True) -> SearchPayload:
        """The payload of a prepared job (:func:`minidisc_ray.pipeline.prepare`): the teacher's importance,
        the tokenised splits, the search's budget and the keys that identify them.

        ``share(kind, key, build)`` puts the teacher and the splits where every trial reads them (the Ray
        modules pass :func:`minidisc_ray.ray_env.shared_ref`: the object store, once per job); without it
        they are the objects themselves (tests, no Ray). ``with_shapes=False`` leaves out the shapes chosen per
        budget (``pruning.axes`` with hidden or depth), which no key depends on.
        """
        def plain(kind: str, key: str, build: Callable[[], Any]) -> Any:
            return build()

        put = share or plain
        cfg = prep.cfg
        sharded = cfg.teacher.placement == "sharded"  # trials read the teacher from its files, never the store
        teacher_fp = prep.teacher_fp if prep.teacher_on_meta else tensor_fingerprint(prep.teacher.state_dict())
        # the teacher is its weights and its config (the same weights with another dropout train differently)
        context = digest(KEY_VERSION, share_key(prep.teacher, teacher_fp), prep.data_key)
        imp = importance_of(prep)
        chance = 0.0 if prep.task.is_lm else chance_metric(  # majority class; 0 for correlations and LM
            np.asarray(prep.train["labels"]), np.asarray(prep.dev["labels"]), prep.task.metric, prep.task.num_labels)
        return cls(
            teacher_blob=None if sharded else put("teacher", share_key(prep.teacher, teacher_fp),
                                                  lambda: model_blob(prep.teacher)),
            teacher_dir=str(check_shardable(Path(prep.teacher_dir).resolve())) if sharded else None,
            kind="lm" if prep.task.is_lm else "classification", tokenizer=prep.tokenizer,
            importance=imp,
            train_table=put("train", prep.data_key, lambda: prep.train.with_format(None).data.table),
            dev_table=put("dev", prep.data_key, lambda: prep.dev.with_format(None).data.table),
            held_out_table=None if prep.held_out is None else put(
                "held_out", prep.data_key, lambda: prep.held_out.with_format(None).data.table),  # type: ignore[union-attr]
            metric=prep.task.metric, regression=prep.task.is_regression, teacher_prunable=prep.prunable,
            teacher_units=unit_counts(prep.teacher), lam=cfg.pruning.lam, recovery=cfg.recovery,
            student_sparsity=cfg.pruning.student_sparsity, seed=cfg.seed, events_path=events_path,
            context_key=context, config_keys={kind: config_key(cfg, kind) for kind in KINDS},
            teacher_fp=teacher_fp, importance_method=cfg.pruning.importance,
            layout=cfg.pruning.layout, tradeoff_form=cfg.pruning.tradeoff,
            teacher_metric=prep.teacher_metrics["metric"], chance_metric=chance,
            trial_workers=cfg.search.trial_workers, trial_cpus=cfg.search.trial_cpus, trial_gpus=cfg.search.trial_gpus,
            **(shapes_by_budget(prep, imp) if with_shapes else {}))

    @property
    def tradeoff(self) -> Tradeoff:
        """How candidates are scored: ``pruning.tradeoff`` with ``pruning.lam``."""
        return Tradeoff(self.lam, self.tradeoff_form, self.teacher_metric, self.chance_metric)

    def score(self, metric: float, sparsity: float) -> float:
        """The candidate's tradeoff."""
        return self.tradeoff(metric, sparsity)

    def evaluation_key(self, kind: str, sparsity: float | list[float]) -> str:
        """Key of one evaluation: everything that determines its result (lambda is applied afterwards): the teacher
        and data (``context_key``), the config fields the key table names for candidates, and the candidate."""
        config = self.config_keys.get(CANDIDATE, "")
        if kind == "exhaustive":  # the schedule's links (schedule.py): no assistant = direct KD at the path's total
            return digest(self.context_key, kind, sparsity, self.recovery, self.student_sparsity, "schedule-1", config)
        return digest(self.context_key, kind, sparsity, self.recovery, None, config)

    def keep_recovered_in(self, output_dir: Path) -> None:
        """Candidate trials (and halving arms) keep recovered weights in ``OUTPUT/recovered`` from now on."""
        where = Path(output_dir) / "recovered"
        where.mkdir(exist_ok=True)
        self.recovered_dir = str(where.resolve())

    def recovered_path(self, sparsity: float) -> str | None:
        """Where the candidate at ``sparsity`` keeps its recovered weights, when this search keeps them and this
        process can see the directory (None otherwise)."""
        if not self.recovered_dir or not Path(self.recovered_dir).is_dir():
            return None
        return str(Path(self.recovered_dir) / f"{self.evaluation_key('candidate', sparsity)}.safetensors")

    def offline_loss(self) -> Any:
        """The recovery loss on the stored top-k targets when the teacher is offline (else None)."""
        if not self.offline_targets:
            return None

        return offline_kd_loss_fn(OfflineTargets.load(self.offline_targets), self.recovery.hard_label_weight)

    def teacher(self) -> nn.Module:
        """The frozen teacher over the shared weights (no copy: trials only read it); a sharded teacher's
        one-process trials (``search.trial_workers: 1``) load it whole from its directory."""
        if self.teacher_blob is None and self.teacher_dir:
            model = load_model_dir(self.teacher_dir, kind=self.kind)[0]
            return model.requires_grad_(False).eval()
        return model_from_blob(_plain(self.teacher_blob, "teacher_blob"), trainable=False)

    def dataset(self, which: str) -> datasets.Dataset:
        """The ``train``, ``dev`` (the rows that select) or ``held_out`` rows (:attr:`held_out_table`)."""
        source = {"train": self.train_table, "dev": self.dev_table, "held_out": self.held_out_table}[which]
        table: pa.Table = _plain(source, f"{which}_table")
        return datasets.Dataset(InMemoryTable(table)).with_format("torch")


def _plain(value: Any, name: str) -> Any:
    if type(value).__name__ == "ObjectRef":
        raise TypeError(f"SearchPayload.{name} is still an object-store reference; resolve the payload first "
                        "(minidisc_ray.ray_env.resolved) where Ray runs")
    return value


EXHAUSTIVE_IMPORTANCE_SAMPLES = 256  # rows of the student's importance pass in an exhaustive trial


def shape_spec_of(prep: Prepared) -> ShapeSpec | None:
    """The job's :class:`~minidisc_ray.budget.ShapeSpec` (None: heads and FFN by unit sparsity)."""
    p = prep.cfg.pruning
    if not p.by_budget:
        return None
    cost = CostModel(prep.teacher, prep.cfg.task.max_length)
    measure = "flops" if p.budget == "latency" else p.budget
    return ShapeSpec(p.axes, p.budget, Limits(p.min_layers, p.min_hidden), prep.cfg.task.max_length,
                     cost_in(cost, measure))


def shape_rows(prep: Prepared) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The batches a shape is cut from (the importance sample) and scored on (64 training rows outside it)."""
    cfg = prep.cfg
    sample = importance_sample(prep.train, cfg)
    rest = prep.train.shuffle(seed=cfg.seed)
    held = rest.select(range(len(sample), min(len(sample) + 64, len(rest)))) if len(rest) > len(sample) else sample
    return list(make_loader(sample, prep.tokenizer, cfg.pruning.batch_size)), list(make_loader(held, prep.tokenizer,
                                                                                                32))


def shapes_by_budget(prep: Prepared, importance: Importance) -> dict[str, Any]:
    """With ``pruning.axes`` beyond heads and FFN: the shape of every grid point and of the student, each the one
    of least distillation loss on 64 held training rows (outside the importance sample) among those within its
    budget; logged, and handed to :class:`SearchPayload` (``plans``, ``shape_spec``)."""
    spec = shape_spec_of(prep)
    if spec is None:
        return {}
    cfg = prep.cfg
    t0 = time.perf_counter()
    batches, held_batches = shape_rows(prep)
    chosen = budget_plans(prep.teacher, importance, batches, held_batches, sorted(cfg.pruning.grid), spec)
    s_student = cfg.pruning.student_sparsity
    if s_student not in chosen:
        chosen.update(budget_plans(prep.teacher, importance, batches, held_batches, [s_student], spec,
                                   "pruning.student_sparsity"))
    budgets = sorted(chosen)
    for b, (_, ranked) in chosen.items():
        best, loss = ranked[0]
        log(f"[shapes] {b:.2f} of the teacher's {spec.measure} removed: {best.text()} ({best.params:,} parameters; "
            f"distillation loss {loss:.4f}, best of {len(ranked)} shapes)")
    log(f"[shapes] axes {','.join(spec.axes)}: {len(budgets)} budgets in {time.perf_counter() - t0:.1f}s")
    return {"plans": {b: plan for b, (plan, _) in chosen.items()}, "shape_spec": spec}


def score_candidate(payload: SearchPayload, sparsity: float, exhaustive: bool = False,
                    device: str | torch.device = "cpu", keep: str | None = None,
                    student_score: bool = False) -> dict[str, Any]:
    """Prune, recover and score one candidate on ``device``; with ``keep`` (a file path) its recovered weights
    are written there (safetensors) and their SHA-256 is returned as ``recovered_sha256``. With
    ``student_score`` the student-side score of the recovered candidate is added (``student_alignment``,
    ``student_stability``, ``student_kd_loss``; :mod:`minidisc_ray.student_score`), its CPU-seconds apart
    (``student_score_cpu_seconds``, not in ``cpu_seconds``).

    With ``exhaustive`` the candidate is used as a TA: a student at ``payload.student_sparsity`` is
    pruned from it and distilled through it with the same budget, and ``student_metric`` is added.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(payload.seed)
    rec = payload.recovery
    offline = payload.offline_loss() if not exhaustive else None
    teacher = payload.teacher()
    if offline is None:
        teacher = teacher.to(device)  # offline, the teacher is only cut from: it never goes to the device
    train, dev = payload.dataset("train"), payload.dataset("dev")
    data = infinite(make_loader(train, payload.tokenizer, rec.batch_size, shuffle=True, seed=payload.seed))
    candidate, loss = recover_candidate(payload, sparsity, teacher, device, data, offline)
    dev_loader = make_loader(dev, payload.tokenizer, 64)
    metrics = evaluate(candidate, dev_loader, payload.metric)
    prunable, total = count_params(candidate)
    ps = param_sparsity(prunable, payload.teacher_prunable)
    out: dict[str, Any] = {"sparsity": float(sparsity), "param_sparsity": ps, "metric": metrics["metric"],
           "tradeoff": payload.score(metrics["metric"], ps), "prunable": prunable,
           "params": total, "recovery_loss": loss}
    if keep is not None:
        out["recovered_sha256"] = save_recovered(candidate, keep)
    score_cpu = 0.0
    if student_score:
        c1 = time.process_time()
        side = student_side_score(payload, sparsity, candidate, device, teacher=teacher if offline is None else None)
        out.update({f"student_{k}": side[k] for k in ("alignment", "stability", "kd_loss")})
        score_cpu = out["student_score_cpu_seconds"] = time.process_time() - c1
    if exhaustive:
        # the candidate as the assistant of the schedule every chain follows (schedule.py), at the recovery
        # budget per link: its recovery was the teacher -> assistant link; at the student's own sparsity
        # "no assistant" is direct KD at the path's total steps, so the candidate keeps learning from the teacher
        plan = plan_schedule([sparsity] if sparsity < payload.student_sparsity else [], payload.student_sparsity,
                             rec.steps)
        last = plan.path[-1]
        if plan.direct:
            student, source = candidate, teacher
            steps = last.steps - rec.steps
        else:
            del teacher  # the student learns from the candidate only
            source = candidate
            student = prune_student(candidate, train, payload.tokenizer, last.unit_sparsity, payload.teacher_units,
                                    EXHAUSTIVE_IMPORTANCE_SAMPLES, 32, payload.seed, payload.importance_method,
                                    payload.layout, payload.shape_spec)
            steps = last.steps
        distill(student, source, data, steps, rec.lr, rec.temperature, payload.regression, rec.hard_label_weight)
        out["assistant_steps"] = 0 if plan.direct else plan.path[0].steps
        out["student_steps"] = last.steps
        out["student_metric"] = evaluate(student, dev_loader, payload.metric)["metric"]
        out["student_params"] = count_params(student)[1]
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0 - score_cpu
    return out


def recover_candidate(payload: SearchPayload, sparsity: float, teacher: nn.Module, device: str | torch.device,
                      data: Iterator[dict[str, torch.Tensor]] | None = None,
                      loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
                      ) -> tuple[nn.Module, float]:
    """The candidate at ``sparsity`` cut from ``teacher`` and recovered for ``recovery.steps`` (on ``data``, by
    default the seeded training stream the search uses); the model and its last recovery loss."""
    rec = payload.recovery
    candidate = prune_model(teacher, payload.plan_for(sparsity)).to(device)
    if data is None:
        torch.manual_seed(payload.seed)
        data = infinite(make_loader(payload.dataset("train"), payload.tokenizer, rec.batch_size, shuffle=True,
                                    seed=payload.seed))
    loss = distill(candidate, teacher, data, rec.steps, rec.lr, rec.temperature, payload.regression,
                   rec.hard_label_weight, loss_fn=loss_fn)
    return candidate, loss


def prune_student(source: nn.Module, train: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, sparsity: float,
                  base_units: tuple[int, int], samples: int, batch_size: int, seed: int, method: str = "gradient",
                  layout: str = "global", shape: ShapeSpec | None = None) -> nn.Module:
    """The student's initialisation as ``minidisc run`` cuts it: ``source`` (the TA, or the teacher when no
    TA is used) pruned by its own importance over a seeded sample of ``samples`` training rows, at
    ``sparsity`` relative to the teacher's units ``base_units``; with ``shape`` (``pruning.axes`` beyond heads and
    FFN) to the shape of least distillation loss within the budget ``sparsity`` of the teacher's cost, scored on
    64 training rows outside the sample."""
    shuffled = train.shuffle(seed=seed)
    sample = shuffled.select(range(min(samples, len(train))))
    batches = list(make_loader(sample, tokenizer, batch_size))
    imp = compute_importance(source, batches, method=method)
    if shape is None:
        return prune_model(source, plan_for_sparsity(imp, sparsity, base_units=base_units, layout=layout))
    held = shuffled.select(range(len(sample), min(len(sample) + 64, len(shuffled)))) if len(shuffled) > len(
        sample) else sample
    ((plan, _),) = budget_plans(source, imp, batches, list(make_loader(held, tokenizer, 32)), [sparsity],
                                shape).values()
    return prune_model(source, plan)


class _Cached(nn.Module):
    """A stand-in teacher that returns an output computed once for the batch."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


def sandwich_scores(payload: SearchPayload, grid: list[float], device: str | torch.device = "cpu") -> dict[str, Any]:
    """The reference code's one-trial schedule: train every candidate width with shared weights.

    The teacher is reordered by importance (so every candidate is a prefix), copied into one shared
    student; every batch runs the teacher once and the student at each candidate width (a slimmable
    forward on slices of the shared weights, so a width costs what its candidate costs), the losses
    are averaged and one optimiser step is taken. Every candidate is then cut out and scored.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(payload.seed)
    grid = sorted(float(s) for s in grid)
    rec = payload.recovery
    teacher = payload.teacher().to(device)
    shared = prune_model(teacher, plan_for_sparsity(payload.importance, 0.0))  # everything, reordered
    plans = {s: plan_for_sparsity(payload.importance, s, base_units=payload.base_units, layout=payload.layout)
             for s in grid}
    prefixes = {s: PruningPlan.prefix(p.heads_per_layer, p.neurons_per_layer, s) for s, p in plans.items()}
    train, dev = payload.dataset("train"), payload.dataset("dev")
    data = infinite(make_loader(train, payload.tokenizer, rec.batch_size, shuffle=True, seed=payload.seed))

    def loss_over_widths(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        total = torch.zeros((), device=batch["input_ids"].device)
        for s in grid:
            with sliced(model, prefixes[s].heads_per_layer, prefixes[s].neurons_per_layer):
                s_out = model(**inputs, output_hidden_states=True)
                total = total + minidisc_loss(s_out.logits, t_out.logits, s_out.hidden_states, t_out.hidden_states,
                                              batch["attention_mask"], rec.temperature, payload.regression,
                                              batch.get("labels"), rec.hard_label_weight)
        return total / len(grid)

    # every step trains all K widths: the candidate-steps of K separate trials
    Loop(shared, LoopSpec(steps=rec.steps, lr=rec.lr), loss_over_widths).run(data)
    dev_loader = make_loader(dev, payload.tokenizer, 64)
    candidates = []
    for s in grid:
        cand = prune_model(shared, prefixes[s])
        m = evaluate(cand, dev_loader, payload.metric)["metric"]
        prunable, total_params = count_params(cand)
        ps = param_sparsity(prunable, payload.teacher_prunable)
        candidates.append({"sparsity": s, "param_sparsity": ps, "metric": m, "prunable": prunable,
                           "params": total_params, "tradeoff": payload.score(m, ps)})
    best = max(candidates, key=lambda c: (c["tradeoff"], c["sparsity"]))
    return {"candidates": candidates, "best": best, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


SCORE_BATCHES = 8  # batches of 32 training rows the score reads
SCORE_IMPORTANCE_SAMPLES = 256  # rows of the importance pass that cuts the student from a candidate


def student_side_score(payload: SearchPayload, sparsity: float, candidate: nn.Module | None = None,
                       device: str | torch.device = "cpu", batches: int = SCORE_BATCHES,
                       teacher: nn.Module | None = None) -> dict[str, Any]:
    """The student-side score of the candidate at ``sparsity`` (:mod:`minidisc_ray.student_score`): the student
    the chain would cut from it (by the candidate's own importance over a seeded sample; for "no assistant", at
    the student's own sparsity, the student cut from the teacher and taught by it) under the candidate's
    distillation signal. ``candidate`` is the recovered candidate where the caller has it (the search's trial);
    otherwise it is cut and recovered here, as the search would. ``teacher``: the payload's teacher where the
    caller has it on ``device`` (loaded here only when needed)."""
    def the_teacher() -> nn.Module:
        return teacher if teacher is not None else payload.teacher().to(device)

    train = payload.dataset("train")
    if sparsity >= payload.student_sparsity:  # no assistant: the student learns from the teacher
        source = the_teacher()
        student = prune_model(source, payload.plan_for(payload.student_sparsity)).to(device)
    else:
        if candidate is None:
            candidate = recover_candidate(payload, sparsity, the_teacher(), device)[0]
        source = candidate.eval()
        student = prune_student(source, train, payload.tokenizer, payload.student_sparsity, payload.teacher_units,
                                SCORE_IMPORTANCE_SAMPLES, 32, payload.seed, payload.importance_method, payload.layout,
                                payload.shape_spec).to(device)
    rows = train.shuffle(seed=payload.seed + 17).select(range(min(len(train), batches * 32)))
    torch.manual_seed(payload.seed)
    out = student_signal(source, student, list(make_loader(rows, payload.tokenizer, 32)),
                         payload.recovery.temperature, payload.regression)
    return {"sparsity": float(sparsity), **out}
