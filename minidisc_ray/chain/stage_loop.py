"""The Ray Train worker loop of one chain stage: the engine's loop under the MiniDisc loss, resumed from the stage's
checkpoint, reporting evaluations, progress and memory as events."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import datasets
import ray.train
import ray.train.torch
import torch
from datasets.table import InMemoryTable
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from minidisc_ray import memprobe
from minidisc_ray.chain.placement import ModelPlacement
from minidisc_ray.chain.progress import PROGRESS_EVERY_S
from minidisc_ray.config import DistillConfig
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import Loop, LoopSpec, LossFn, evaluate
from minidisc_ray.modelio.blobs import model_from_blob
from minidisc_ray.modelio.sharded import load_frozen_sharded, load_sharded
from minidisc_ray.offline import OfflineTargets, offline_kd_loss_fn
from minidisc_ray.pruning import PruningPlan
from minidisc_ray.ray_train import node_id
from minidisc_ray.training import kd_loss_fn, memory_savers


def _batches(train: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int,
             skip: int) -> Iterator[dict[str, torch.Tensor]]:
    """The worker's batch stream: a fixed function of the seed, ``skip`` batches already consumed."""
    stream = infinite(make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed))
    for _ in range(skip):
        next(stream)
    return stream


def _loss_fn(config: dict[str, Any], dc: DistillConfig, device: torch.device) -> LossFn:
    """The stage's KD loss: against the teacher's stored top-k (``offline``), or the frozen teacher held here
    (sharded over these workers, or whole from the object store), bf16 on a GPU."""
    if config.get("offline_targets"):  # teacher.placement: offline: no teacher here, its stored top-k logits
        return offline_kd_loss_fn(OfflineTargets.load(config["offline_targets"]), dc.hard_label_weight)
    half = torch.bfloat16 if device.type == "cuda" else None  # frozen: no gradients, no optimiser state
    if config.get("teacher_dir"):  # teacher.placement: sharded: FSDP2 over these workers, read shard by shard
        teacher = load_frozen_sharded(config["teacher_dir"], config["kind"], device, half)
    else:
        teacher = model_from_blob(ray.get(config["teacher_ref"]), trainable=False).to(device)
        if half is not None:
            teacher = teacher.to(half)
    return kd_loss_fn(teacher, dc.temperature, config["regression"], dc.hard_label_weight, dc.kl_chunk)


def _student(config: dict[str, Any], dc: DistillConfig, device: torch.device,
             world: int) -> tuple[nn.Module, bool]:
    """(the stage's starting student, whether it is already sharded over the workers): from its blob, or cut
    here from the stored model's files (``teacher.placement: sharded``)."""
    if not config.get("student_cut"):
        return model_from_blob(ray.get(config["student_ref"]), trainable=True), False
    cut = config["student_cut"]
    plan = PruningPlan.from_dict(cut["plan"])
    if dc.parallelism == "fsdp" and world > 1:
        # each rank reads its own rows of the kept units: no process holds the whole student
        return load_sharded(cut["directory"], config["kind"], device, plan=plan, trainable=True,
                            mp_policy=ModelPlacement.mixed_precision(device)), True
    # one whole student per worker, read from the kept rows and columns only
    return load_sharded(cut["directory"], config["kind"], torch.device("cpu"), plan=plan, trainable=True,
                        shard=False), False


def _splits(config: dict[str, Any], rank: int, world: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(this worker's contiguous share of the training rows, the whole dev set)."""
    train = datasets.Dataset(InMemoryTable(ray.get(config["train_ref"])))
    dev = datasets.Dataset(InMemoryTable(ray.get(config["dev_ref"])))
    if world > 1:
        train = train.shard(num_shards=world, index=rank, contiguous=True)
    return train, dev


def _resume(config: dict[str, Any], loop: Loop, placement: ModelPlacement, device: torch.device, rank: int,
            world: int) -> bool:
    """Load the stage's last checkpoint into ``loop`` when every rank can; whether it resumed."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as d:
        problem = placement.check(d, loop, rank)
        if world > 1:  # every rank resumes, or none does
            flag = torch.tensor([0.0 if problem else 1.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            problem = problem or (None if flag.item() == 1.0 else "another worker's shard is unusable")
        if problem is None:
            placement.load(d, loop, rank)
            return True
        if rank == 0:
            print(f"minidisc: warning: not resuming stage {config.get('name')} from its checkpoint "
                  f"({problem}); starting the stage afresh", flush=True)
        return False


class _StageReports:
    """The loop's hooks on one worker: :meth:`on_eval` checkpoints and reports to Ray Train after every
    evaluation (and at the end), :meth:`on_step` writes a progress event now and then (rank 0) and is where the
    ``crash_at_step`` test hook kills a worker."""

    def __init__(self, config: dict[str, Any], placement: ModelPlacement, core: nn.Module, rank: int,
                 resumed: bool) -> None:
        self.config, self.placement, self.core, self.rank, self.resumed = config, placement, core, rank, resumed
        self.steps = config["distill"].steps
        self.crash_at = config.get("crash_at_step")
        self.last_progress = time.time()

    def on_eval(self, lp: Loop, entry: dict[str, Any] | None) -> None:
        placement, rank = self.placement, self.rank
        if entry is not None and lp.state.best_step == lp.state.step:
            lp.best_state = placement.full_state(self.core)  # a collective under FSDP: every rank gathers
        final = placement.full_state(self.core) if lp.state.stopped else None  # the last weights, for the record
        if entry is not None and rank == 0:
            st = lp.state
            stage_event(self.config, "eval", step=st.step, loss=entry["loss"], metric=entry["metric"],
                        best_metric=st.best_metric, best_step=st.best_step,
                        early_stop=bool(st.stopped and st.step < self.steps))
        with tempfile.TemporaryDirectory() as tmp:
            placement.save(tmp, lp, rank)
            if final is not None and rank == 0:
                save_file(final, os.path.join(tmp, "final.safetensors"))
            ckpt = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or placement.kind == "fsdp") else None
            ray.train.report({"step": lp.state.step, "best_metric": lp.state.best_metric,
                              "best_step": lp.state.best_step, **({"loss": entry["loss"], "metric": entry["metric"]}
                                                                  if entry else {})}, checkpoint=ckpt)

    def on_step(self, lp: Loop, loss: float) -> None:
        if self.rank == 0 and time.time() - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = time.time()
            stage_event(self.config, "progress", step=lp.state.step, loss=loss)
        if self.crash_at is not None and lp.state.step == self.crash_at and not self.resumed and self.rank == 0:
            os._exit(1)  # test hook: a worker dies mid-stage


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop of one distillation stage (runs on every worker)."""

    probe = None
    if memprobe.enabled():  # benchmarks/memory.py: the stage's own memory, after torch's one-time set-up
        memprobe.warm_up_torch()
        probe = memprobe.PeakRSS().__enter__()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dc: DistillConfig = config["distill"]
    torch.manual_seed(config["seed"] + rank)
    torch.set_num_threads(max(1, int(dc.cpus_per_worker) if not dc.use_gpu else 1))
    device = ray.train.torch.get_device()
    loss_fn = _loss_fn(config, dc, device)
    student, presharded = _student(config, dc, device, world)
    tokenizer = config["tokenizer"]
    train, dev = _splits(config, rank, world)
    memory_savers(student, dc)
    placement = ModelPlacement(dc.parallelism, world)
    model, core = (student, student) if presharded else placement.wrap(student, device)
    dev_loader = make_loader(dev, tokenizer, 64)
    spec = LoopSpec(steps=dc.steps, lr=dc.lr, weight_decay=dc.weight_decay, warmup_ratio=dc.warmup_ratio,
                    grad_accum=dc.grad_accum, eval_every=dc.eval_every, patience=dc.patience)
    loop = Loop(model, spec, loss_fn,
                evaluate_fn=lambda m: evaluate(m, dev_loader, config["metric"]), core=core)
    resumed = _resume(config, loop, placement, device, rank, world)
    if not resumed:
        loop.best_state = placement.full_state(core)
    if rank == 0:
        stage_event(config, "start", start_step=loop.state.step, resumed=resumed, node=node_id())
    data = _batches(train, tokenizer, dc.batch_size, config["seed"] + 1000 * rank, loop.state.step * dc.grad_accum)
    hooks = _StageReports(config, placement, core, rank, resumed)
    if loop.state.stopped:
        hooks.on_eval(loop, None)  # a finished run resumed (the driver died before taking the result): hand it back
        return
    loop.run(data, on_eval=hooks.on_eval, on_step=hooks.on_step)
    if probe is not None and rank == 0:
        probe.__exit__(None, None, None)
        stage_event(config, "memory", rss_start=probe.start, rss_peak=probe.peak)


def stage_event(config: dict[str, Any], event: str, **fields: Any) -> None:
    """One line in the stage's events file (rank 0): how the driver follows a stage it does not run."""
    if config.get("events_path"):
        with open(config["events_path"], "a") as fh:
            fh.write(json.dumps({"event": event, "stage": config["name"], "run_id": config.get("run_id"),
                                 "time": time.time(), **fields}) + "\n")
