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

from minidisc_ray.chain.progress import StageProgress
from minidisc_ray.chain.stage_loop import stage_event, stage_loop
from minidisc_ray.config import DistillConfig
from minidisc_ray.interrupts import interruptible
from minidisc_ray.logs import log
from minidisc_ray.modelio.blobs import model_blob, model_from_blob, share_key
from minidisc_ray.offline import ensure_targets, with_row_ids
from minidisc_ray.ray_env import shared_ref
from minidisc_ray.records import digest, read_jsonl, tensor_fingerprint
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


# ----------------------------------------------------------------------------- checkpoint files


# ----------------------------------------------------------------------------- sharded (FSDP) checkpoints
#
# ``torch.distributed.checkpoint`` reads a pickled ``.metadata`` (and its default planner calls
# ``torch.load``) on resume, so whoever can write the output directory could run code in every worker.
# The shards are written instead as one safetensors file of local tensors per rank with a JSON manifest:
# nothing on the resume path is unpickled. A checkpoint is resumed by the same number of workers that
# wrote it (what Ray Train's ``FailureConfig`` restarts do); anything else starts the stage afresh.


def run_stage(name: str, teacher_ref: Any, student_blob: dict[str, Any] | None, tokenizer: Any,
              train_ref: Any, dev_ref: Any, metric: str, regression: bool, dc: DistillConfig, seed: int,
              storage_path: str, crash_at_step: int | None = None, events_path: str | None = None,
              run_name: str | None = None, run_id: str | None = None,
              offline_targets: str | None = None, teacher_dir: str | None = None,
              kind: str = "classification", student_cut: dict[str, Any] | None = None) -> StageResult:
    """Run one stage as a ``TorchTrainer``; returns the best weights and what happened.

    ``teacher_ref``, ``train_ref`` and ``dev_ref`` are object references (put once per job) or the
    objects themselves. ``run_name`` names the Ray Train run under ``storage_path``: running a stage
    again under the same name resumes it from its last checkpoint (how ``minidisc run`` continues after
    a kill), so the name must identify everything that determines the stage. ``run_id`` tags this
    job's events, so ``attempts`` counts the attempts of this run only. ``offline_targets`` (a directory of
    :mod:`minidisc_ray.offline`) replaces the teacher: ``teacher_ref`` may then be None, and the training
    rows must carry their ``row_id``. ``teacher_dir`` (a model directory on storage every worker reads;
    ``kind`` its head) replaces ``teacher_ref`` with the teacher sharded over the workers
    (:func:`minidisc_ray.modelio.load_frozen_sharded`). ``student_cut`` (``{"directory", "plan"}``) replaces
    ``student_blob``: the workers cut the student from that directory's files (:class:`ShardCut`).
    """
    def ref(x: Any) -> Any:
        return x if type(x).__name__ == "ObjectRef" else ray.put(x)

    t0 = time.perf_counter()
    log(f"[distill {name}] Ray Train: {dc.num_workers} worker(s), {dc.parallelism}, "
        f"{'GPU' if dc.use_gpu else 'CPU'}, {dc.steps} steps, batch {dc.batch_size} x {dc.grad_accum}, "
        f"eval every {dc.eval_every}" + (f"; teacher sharded over the workers from {teacher_dir}" if teacher_dir
                                        else "; teacher from its stored top-k" if offline_targets else ""))
    loop_config = {"name": name, "distill": dc, "seed": seed, "metric": metric, "regression": regression,
                   "teacher_ref": None if teacher_ref is None else ref(teacher_ref),
                   "student_ref": None if student_blob is None else ray.put(student_blob),
                   "student_cut": student_cut, "offline_targets": offline_targets,
                   "teacher_dir": teacher_dir, "kind": kind,
                   "train_ref": ref(train_ref), "dev_ref": ref(dev_ref), "tokenizer": tokenizer,
                   "crash_at_step": crash_at_step, "events_path": events_path, "run_id": run_id}
    resources = {"CPU": dc.cpus_per_worker}
    if dc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        stage_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo", timeout_s=1800),
        run_config=RunConfig(name=run_name or f"distill-{name}-{int(time.time())}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with StageProgress(events_path, name, run_id, dc.steps, metric):
        result = interruptible(trainer.fit)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_file(os.path.join(d, "best.safetensors"))
        state = json.loads(Path(d, "state.json").read_text())
        final_path = os.path.join(d, "final.safetensors")
        final = load_file(final_path) if os.path.isfile(final_path) else None
    attempts = 1
    if events_path and Path(events_path).is_file():
        attempts = max(1, sum(1 for e in read_jsonl(events_path) if e.get("stage") == name
                              and e.get("event") == "start" and (run_id is None or e.get("run_id") == run_id)))
    return StageResult(name, best, float(state["best_metric"]), int(state["best_step"]), int(state["step"]),
                       time.perf_counter() - t0, list(state["history"]), attempts, final)


# ----------------------------------------------------------------------------- the stages of one job


@dataclass
class ShardCut:
    """A link's starting model as the units ``plan`` keeps of the model stored in ``directory``: what
    ``teacher.placement: sharded`` gives a link that starts from the teacher (teacher -> assistant, and the
    student of direct KD). The driver holds its shapes only (``model``, on the meta device); the stage's
    workers cut it from the files (:func:`minidisc_ray.modelio.load_sharded`)."""

    directory: str
    plan: Any  # PruningPlan
    model: Any  # the cut on the meta device
    source_fp: str  # the stored model's files (:func:`minidisc_ray.modelio.fingerprint.files_fingerprint`)

    def fingerprint(self) -> str:
        return digest("cut", self.source_fp, self.plan.to_dict())

    def job(self) -> dict[str, Any]:
        return {"directory": self.directory, "plan": self.plan.to_dict()}


class ChainRunner:
    """Runs the links of one ``minidisc run`` on Ray Train: each reused when finished (its signed model
    directory, :mod:`minidisc_ray.stages`), resumed when interrupted, exported when done. Teachers and
    data go into the object store once per job (:func:`ray_env.shared_ref`)."""

    def __init__(self, prep: Any, out: Path, command: str, run_id: str, storage: str,
                 crash_at: int | None = None) -> None:
        self.prep, self.out, self.command, self.run_id, self.storage = prep, out, command, run_id, storage
        self.crash_at = crash_at
        self.events = str((out / "train_events.jsonl").resolve())

    def key(self, name: str, teacher_key: str, student: Any, dc: DistillConfig) -> str:
        """Everything that determines a link's result."""
        tc = self.prep.cfg.teacher  # an offline teacher is a different loss (top-k, no hidden states)
        placement = ("offline", tc.top_k) if tc.placement == "offline" else ()
        start = student.fingerprint() if isinstance(student, ShardCut) else tensor_fingerprint(student.state_dict())
        return digest(name, teacher_key, start, self.prep.data_key, dc.what_it_computes(), self.prep.cfg.seed,
                      *placement)

    def offline_targets(self, teacher_ref: Any, teacher_fp: str, dc: DistillConfig) -> str:
        """The teacher's top-k targets over the training rows (:mod:`minidisc_ray.offline`): one Ray Data pass
        the first time this teacher teaches, the same files for every later link, baseline and rerun."""
        prep = self.prep
        where, written = ensure_targets(self.out, teacher_ref, teacher_fp, prep.train.with_format(None).data.table,
                                        prep.data_key, prep.tokenizer, prep.cfg.teacher.top_k, dc.temperature,
                                        use_gpu=dc.use_gpu, replicas=max(1, dc.num_workers), who="chain")
        stage_event({"events_path": self.events, "name": "offline_targets", "run_id": self.run_id},
               "offline_targets", written=written, directory=str(where), teacher=teacher_fp[:16])
        return str(where)

    def stage(self, link: Any, teacher: Any, teacher_key: str, init: Any, role: str, assistant: str | None,
              teacher_fp: str | None = None) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
        """Distil ``init`` from ``teacher`` along ``link`` (a :class:`schedule.Link`: name, steps, directory),
        or reuse a finished export; returns (model, summary, stage info, key).

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
            return (*done, key)
        placement = prep.cfg.teacher.placement
        dev_ref = shared_ref("dev", prep.data_key, lambda: prep.dev.with_format(None).data.table)
        offline = teacher_dir = None
        if placement == "sharded":  # the workers read it shard by shard: it never goes to the object store
            teacher_ref = None
            teacher_dir = str(Path(assistant).resolve() if assistant else Path(prep.teacher_dir).resolve())
        else:
            teacher_fp = teacher_fp or tensor_fingerprint(teacher.state_dict())
            teacher_ref = shared_ref("teacher", share_key(teacher, teacher_fp), lambda: model_blob(teacher))
        if placement == "offline":
            assert teacher_fp is not None
            offline = self.offline_targets(teacher_ref, teacher_fp, dc)
            train_ref = shared_ref("train_rows", prep.data_key,
                                   lambda: with_row_ids(prep.train.with_format(None).data.table))
            teacher_ref = None  # the stage never loads the teacher
        else:
            train_ref = shared_ref("train", prep.data_key, lambda: prep.train.with_format(None).data.table)
        cut = init if isinstance(init, ShardCut) else None
        res = run_stage(link.name, teacher_ref, None if cut else model_blob(init),
                        prep.tokenizer, train_ref, dev_ref, prep.task.metric, prep.task.is_regression, dc,
                        prep.cfg.seed, self.storage, crash_at_step=self.crash_at, events_path=self.events,
                        run_name=f"distill-{link.name}-{key[:16]}", run_id=self.run_id, offline_targets=offline,
                        teacher_dir=teacher_dir, kind="lm" if prep.task.is_lm else "classification",
                        student_cut=cut.job() if cut else None)
        self.crash_at = None
        blob = model_blob(cut.model if cut else init, state=res.best_state)
        trained = model_from_blob(blob)
        info = {"seconds": round(res.seconds, 1), "steps_run": res.steps_run, "best_step": res.best_step,
                "best_metric": res.best_metric, "attempts": res.attempts, "history": res.history,
                "teacher_placement": placement}
        summary = export_stage(prep, trained, target, role, link.unit_sparsity, self.command, assistant,
                               {**info, "key": key})
        return trained, summary, info, key
