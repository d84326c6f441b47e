"""One chain stage launched as a Ray Train ``TorchTrainer`` (:func:`run_stage`) and the chain of stages with what
they reuse, export and hand on (:class:`ChainRunner`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from minidisc_ray.chain.progress import StageProgress
from minidisc_ray.chain.stage_loop import stage_event, stage_loop
from minidisc_ray.config import DistillConfig
from minidisc_ray.interrupts import interruptible
from minidisc_ray.keys import STAGE, config_key
from minidisc_ray.logs import log
from minidisc_ray.modelio.blobs import model_blob, model_from_blob, share_key
from minidisc_ray.offline import ensure_targets, with_row_ids
from minidisc_ray.pipeline import Prepared
from minidisc_ray.pruning import PruningPlan
from minidisc_ray.ray_env import shared_ref
from minidisc_ray.records import digest, read_jsonl, tensor_fingerprint
from minidisc_ray.schedule import Link
from minidisc_ray.stages import export_stage, finished_stage


@dataclass
class StageResult:
    """What one stage hands back to the driver."""

    name: str
    best_state: dict[str, torch.Tensor]
    best_metric: float
    best_step: int
    steps_run: int
    seconds: float
    history: list[dict[str, Any]]
    attempts: int
    final_state: dict[str, torch.Tensor] | None = None
    steps_redone: int = 0


@dataclass
class StageSpec:
    """What one stage distils: the model ``name`` learns from a teacher for ``dc.steps`` on the task's data.

    ``teacher_ref``, ``train_ref`` and ``dev_ref`` are object references (put once per job) or the objects
    themselves (the teacher's :func:`~minidisc_ray.modelio.blobs.model_blob`, the splits' Arrow tables).
    ``offline_targets`` (a directory of :mod:`minidisc_ray.offline`) replaces the teacher: ``teacher_ref`` may
    then be None, and the training rows must carry their ``row_id``. ``teacher_dir`` (a model directory on
    storage every worker reads; ``kind`` its head) replaces ``teacher_ref`` with the teacher sharded over the
    workers (:func:`minidisc_ray.modelio.sharded.load_frozen_sharded`). ``student_cut`` (``{"directory", "plan"}``)
    replaces ``student_blob``: the workers cut the student from that directory's files (:class:`ShardCut`).
    """

    name: str
    teacher_ref: Any  # a Ray ObjectRef, a model blob, or None (offline targets, sharded teacher)
    student_blob: dict[str, Any] | None
    tokenizer: PreTrainedTokenizerBase
    train_ref: Any  # a Ray ObjectRef or the training rows' Arrow table
    dev_ref: Any  # a Ray ObjectRef or the dev rows' Arrow table
    metric: str
    regression: bool
    dc: DistillConfig
    seed: int
    kind: str = "classification"
    offline_targets: str | None = None
    teacher_dir: str | None = None
    student_cut: dict[str, Any] | None = None

    def describe(self) -> str:
        """The stage's opening line."""
        dc, teacher_dir = self.dc, self.teacher_dir
        return (f"[distill {self.name}] Ray Train: {dc.num_workers} worker(s), {dc.parallelism}, "
                f"{'GPU' if dc.use_gpu else 'CPU'}, {dc.steps} steps, batch {dc.batch_size} x {dc.grad_accum}, "
                f"eval every {dc.eval_every}"
                + (f"; teacher sharded over the workers from {teacher_dir}" if teacher_dir
                   else "; teacher from its stored top-k" if self.offline_targets else ""))

    def loop_config(self, crash_at_step: int | None, events_path: str | None,
                    run_id: str | None) -> dict[str, Any]:
        """:func:`stage_loop`'s ``config``: the spec with its large parts in the object store."""
        return {"name": self.name, "distill": self.dc, "seed": self.seed, "metric": self.metric,
                "regression": self.regression,
                "teacher_ref": None if self.teacher_ref is None else _object_ref(self.teacher_ref),
                "student_ref": None if self.student_blob is None else ray.put(self.student_blob),
                "student_cut": self.student_cut, "offline_targets": self.offline_targets,
                "teacher_dir": self.teacher_dir, "kind": self.kind,
                "train_ref": _object_ref(self.train_ref), "dev_ref": _object_ref(self.dev_ref),
                "tokenizer": self.tokenizer, "crash_at_step": crash_at_step, "events_path": events_path,
                "run_id": run_id}


def _object_ref(x: Any) -> ray.ObjectRef:
    """``x`` itself when it is already an object reference, else ``x`` put into the object store."""
    return x if type(x).__name__ == "ObjectRef" else ray.put(x)


def _attempts(events_path: str | None, name: str, run_id: str | None) -> tuple[int, int]:
    """How many times this run started the stage (its ``start`` events; 1 without an events file), and how many
    steps it trained twice: at each restart (a lost worker or node, a killed job), the steps between the
    checkpoint it resumed from and the last step an earlier attempt reported (a lower bound: rank 0 reports its
    step every ``PROGRESS_EVERY_S`` seconds and at every evaluation)."""
    if not (events_path and Path(events_path).is_file()):
        return 1, 0
    starts, redone, reached = 0, 0, 0
    for e in read_jsonl(events_path):
        if e.get("stage") != name or (run_id is not None and e.get("run_id") != run_id):
            continue
        if e.get("event") == "start":
            starts += 1
            redone += max(0, reached - int(e.get("start_step") or 0))
            reached = int(e.get("start_step") or 0)
        elif e.get("event") in ("progress", "eval") and e.get("step") is not None:
            reached = max(reached, int(e["step"]))
    return max(1, starts), redone


def run_stage(spec: StageSpec, *, storage_path: str, crash_at_step: int | None = None,
              events_path: str | None = None, run_name: str | None = None,
              run_id: str | None = None, with_final: bool = True) -> StageResult:
    """Run one stage as a ``TorchTrainer``; returns the best weights and what happened.

    ``run_name`` names the Ray Train run under ``storage_path``: running a stage again under the same name
    resumes it from its last checkpoint (how ``minidisc run`` continues after a kill), so the name must
    identify everything that determines the stage. ``run_id`` tags this job's events, so ``attempts`` counts
    the attempts of this run only. ``crash_at_step`` is a test hook: a worker dies there once.
    """
    t0 = time.perf_counter()
    dc, name = spec.dc, spec.name
    log(spec.describe())
    resources = {"CPU": dc.cpus_per_worker}
    if dc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        stage_loop, train_loop_config=spec.loop_config(crash_at_step, events_path, run_id),
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo", timeout_s=1800),
        run_config=RunConfig(name=run_name or f"distill-{name}-{int(time.time())}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with StageProgress(events_path, name, run_id, dc.steps, spec.metric):
        result = interruptible(trainer.fit)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_file(os.path.join(d, "best.safetensors"))
        state = json.loads(Path(d, "state.json").read_text())
        final_path = os.path.join(d, "final.safetensors")
        # the last weights (a record for tests and benchmarks): not read where only the best are used (the chain)
        final = load_file(final_path) if with_final and os.path.isfile(final_path) else None
    attempts, redone = _attempts(events_path, name, run_id)
    return StageResult(name, best, float(state["best_metric"]), int(state["best_step"]), int(state["step"]),
                       time.perf_counter() - t0, list(state["history"]), attempts, final, redone)


# ----------------------------------------------------------------------------- the stages of one job


@dataclass
class ShardCut:
    """A link's starting model as the units ``plan`` keeps of the model stored in ``directory``: what
    ``teacher.placement: sharded`` gives a link that starts from the teacher (teacher -> assistant, and the
    student of direct KD). The driver holds its shapes only (``model``, on the meta device); the stage's
    workers cut it from the files (:func:`minidisc_ray.modelio.sharded.load_sharded`)."""

    directory: str
    plan: PruningPlan
    model: nn.Module  # the cut on the meta device
    source_fp: str  # the stored model's files (:func:`minidisc_ray.modelio.fingerprint.files_fingerprint`)

    def fingerprint(self) -> str:
        return digest("cut", self.source_fp, self.plan.to_dict())

    def job(self) -> dict[str, Any]:
        return {"directory": self.directory, "plan": self.plan.to_dict()}


@dataclass
class StageOutcome:
    """What :meth:`ChainRunner.stage` hands back: the distilled (or reused) model, its line in ``report.json``,
    what the stage did (``stage info``: seconds, steps, attempts, history; ``reused`` when an earlier run's)
    and the key that identifies it (what the next link records as its teacher's)."""

    model: nn.Module
    summary: dict[str, Any]
    info: dict[str, Any]
    key: str


@dataclass
class _TeacherInputs:
    """How a stage's workers get the teacher and the training rows (see :class:`StageSpec`)."""

    teacher_ref: ray.ObjectRef | None  # None: sharded, offline
    teacher_dir: str | None
    offline_targets: str | None
    train_ref: ray.ObjectRef


class ChainRunner:
    """Runs the links of one ``minidisc run`` on Ray Train: each reused when finished (its signed model
    directory, :mod:`minidisc_ray.stages`), resumed when interrupted, exported when done. Teachers and
    data go into the object store once per job (:func:`ray_env.shared_ref`)."""

    def __init__(self, prep: Prepared, out: Path, command: str, run_id: str, storage: str,
                 crash_at: int | None = None) -> None:
        self.prep, self.out, self.command, self.run_id, self.storage = prep, out, command, run_id, storage
        self.crash_at = crash_at
        self.events = str((out / "train_events.jsonl").resolve())

    def key(self, name: str, teacher_key: str, student: nn.Module | ShardCut, dc: DistillConfig) -> str:
        """Everything that determines a link's result: the teacher, the starting weights, the data, and the config
        fields the key table (:mod:`minidisc_ray.keys`) names for stages, with this link's own ``dc``."""
        start = student.fingerprint() if isinstance(student, ShardCut) else tensor_fingerprint(student.state_dict())
        return digest(name, teacher_key, start, self.prep.data_key,
                      config_key(dataclasses.replace(self.prep.cfg, distill=dc), STAGE))

    def offline_targets(self, teacher_ref: ray.ObjectRef, teacher_fp: str, dc: DistillConfig) -> str:
        """The teacher's top-k targets over the training rows (:mod:`minidisc_ray.offline`): one Ray Data pass
        the first time this teacher teaches, the same files for every later link, baseline and rerun."""
        prep = self.prep
        where, written = ensure_targets(self.out, teacher_ref, teacher_fp, prep.train.with_format(None).data.table,
                                        prep.data_key, prep.tokenizer, prep.cfg.teacher.top_k, dc.temperature,
                                        use_gpu=dc.use_gpu, replicas=max(1, dc.num_workers), who="chain")
        stage_event({"events_path": self.events, "name": "offline_targets", "run_id": self.run_id},
                    "offline_targets", written=written, directory=str(where), teacher=teacher_fp[:16])
        return str(where)

    def _teacher_inputs(self, teacher: nn.Module, assistant: str | None, teacher_fp: str | None,
                       dc: DistillConfig) -> _TeacherInputs:
        """The teacher as ``teacher.placement`` hands it to the workers: in the object store (``replicated``),
        read shard by shard from its directory (``sharded``: never in the object store), or as its stored
        top-k targets over the training rows (``offline``: the stage never loads the teacher)."""
        prep = self.prep
        placement = prep.cfg.teacher.placement
        if placement == "sharded":  # the workers read it shard by shard: it never goes to the object store
            teacher_dir = str(Path(assistant).resolve() if assistant else Path(prep.teacher_dir).resolve())
            return _TeacherInputs(None, teacher_dir, None, self._train_ref())
        teacher_fp = teacher_fp or tensor_fingerprint(teacher.state_dict())
        teacher_ref = shared_ref("teacher", share_key(teacher, teacher_fp), lambda: model_blob(teacher))
        if placement == "offline":  # the stage never loads the teacher
            offline = self.offline_targets(teacher_ref, teacher_fp, dc)
            train_ref = shared_ref("train_rows", prep.data_key,
                                   lambda: with_row_ids(prep.train.with_format(None).data.table))
            return _TeacherInputs(None, None, offline, train_ref)
        return _TeacherInputs(teacher_ref, None, None, self._train_ref())

    def _train_ref(self) -> ray.ObjectRef:
        """The training rows in the object store (once per job)."""
        prep = self.prep
        return shared_ref("train", prep.data_key, lambda: prep.train.with_format(None).data.table)

    def stage(self, link: Link, teacher: nn.Module, teacher_key: str, init: nn.Module | ShardCut, role: str,
              assistant: str | None, teacher_fp: str | None = None) -> StageOutcome:
        """Distil ``init`` from ``teacher`` along ``link`` (a :class:`schedule.Link`: name, steps, directory),
        or reuse a finished export.

        ``teacher_fp`` (the weights' fingerprint, when the caller has it) names the teacher's object-store
        copy, so a teacher the search already put there is not put again.
        """
        prep = self.prep
        dc = dataclasses.replace(prep.cfg.distill, steps=link.steps)
        key = self.key(link.name, teacher_key, init, dc)
        target = self.out / link.directory
        done = finished_stage(target, key)
        if done is not None:
            log(f"[chain] {link.name}: finished by an earlier run with the same inputs; reusing {target}")
            return StageOutcome(*done, key)
        dev_ref = shared_ref("dev", prep.data_key, lambda: prep.dev.with_format(None).data.table)
        inputs = self._teacher_inputs(teacher, assistant, teacher_fp, dc)
        cut = init if isinstance(init, ShardCut) else None
        start = init.model if isinstance(init, ShardCut) else init  # its shapes (a cut: on the meta device)
        spec = StageSpec(link.name, inputs.teacher_ref, None if cut else model_blob(start), prep.tokenizer,
                         inputs.train_ref, dev_ref, prep.task.metric, prep.task.is_regression, dc, prep.cfg.seed,
                         kind="lm" if prep.task.is_lm else "classification", offline_targets=inputs.offline_targets,
                         teacher_dir=inputs.teacher_dir, student_cut=cut.job() if cut else None)
        res = run_stage(spec, storage_path=self.storage, crash_at_step=self.crash_at, events_path=self.events,
                        run_name=f"distill-{link.name}-{key[:16]}", run_id=self.run_id, with_final=False)
        self.crash_at = None
        trained = model_from_blob(model_blob(start, state=res.best_state))
        info = {"seconds": round(res.seconds, 1), "steps_run": res.steps_run, "best_step": res.best_step,
                "best_metric": res.best_metric, "attempts": res.attempts, "steps_redone": res.steps_redone,
                "history": res.history,
                "teacher_placement": prep.cfg.teacher.placement}
        del res  # its copy of the best weights: the driver holds the stage's model once while exporting it
        summary = export_stage(prep, trained, target, role, link.unit_sparsity, self.command, assistant,
                               {**info, "key": key})
        return StageOutcome(trained, summary, info, key)
