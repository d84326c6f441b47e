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

from minidisc_ray import memprobe
from minidisc_ray.chain.placement import ModelPlacement
from minidisc_ray.chain.progress import PROGRESS_EVERY_S
from minidisc_ray.config import DistillConfig
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import Loop, LoopSpec, evaluate
from minidisc_ray.modelio.blobs import model_from_blob
from minidisc_ray.modelio.sharded import load_frozen_sharded, load_sharded
from minidisc_ray.offline import OfflineTargets, offline_kd_loss_fn
from minidisc_ray.pruning import PruningPlan
from minidisc_ray.training import kd_loss_fn, memory_savers


def _batches(train: Any, tokenizer: Any, batch_size: int, seed: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
    """The worker's batch stream: a fixed function of the seed, ``skip`` batches already consumed."""
    stream = infinite(make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed))
    for _ in range(skip):
        next(stream)
    return stream


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
    if config.get("offline_targets"):  # teacher.placement: offline: no teacher here, its stored top-k logits

        loss_fn = offline_kd_loss_fn(OfflineTargets.load(config["offline_targets"]), dc.hard_label_weight)
    else:
        half = torch.bfloat16 if device.type == "cuda" else None  # frozen: no gradients, no optimiser state
        if config.get("teacher_dir"):  # teacher.placement: sharded: FSDP2 over these workers, read shard by shard

            teacher = load_frozen_sharded(config["teacher_dir"], config["kind"], device, half)
        else:
            teacher = model_from_blob(ray.get(config["teacher_ref"]), trainable=False).to(device)
            if half is not None:
                teacher = teacher.to(half)
        loss_fn = kd_loss_fn(teacher, dc.temperature, config["regression"], dc.hard_label_weight, dc.kl_chunk)
    presharded = False
    if config.get("student_cut"):  # teacher.placement: sharded: the student is cut from the files here

        cut = config["student_cut"]
        plan = PruningPlan.from_dict(cut["plan"])
        presharded = dc.parallelism == "fsdp" and world > 1
        if presharded:  # each rank reads its own rows of the kept units: no process holds the whole student
            student = load_sharded(cut["directory"], config["kind"], device, plan=plan, trainable=True,
                                   mp_policy=ModelPlacement.mixed_precision(device))
        else:  # one whole student per worker, read from the kept rows and columns only
            student = load_sharded(cut["directory"], config["kind"], torch.device("cpu"), plan=plan,
                                   trainable=True, shard=False)
    else:
        student = model_from_blob(ray.get(config["student_ref"]), trainable=True)
    tokenizer = config["tokenizer"]
    train = datasets.Dataset(InMemoryTable(ray.get(config["train_ref"])))
    dev = datasets.Dataset(InMemoryTable(ray.get(config["dev_ref"])))
    if world > 1:
        train = train.shard(num_shards=world, index=rank, contiguous=True)
    memory_savers(student, dc)
    placement = ModelPlacement(dc.parallelism, world)
    model, core = (student, student) if presharded else placement.wrap(student, device)
    dev_loader = make_loader(dev, tokenizer, 64)
    spec = LoopSpec(steps=dc.steps, lr=dc.lr, weight_decay=dc.weight_decay, warmup_ratio=dc.warmup_ratio,
                    grad_accum=dc.grad_accum, eval_every=dc.eval_every, patience=dc.patience)
    loop = Loop(model, spec, loss_fn,
                evaluate_fn=lambda m: evaluate(m, dev_loader, config["metric"]), core=core)
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            problem = placement.check(d, loop, rank)
            if world > 1:  # every rank resumes, or none does
                flag = torch.tensor([0.0 if problem else 1.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                problem = problem or (None if flag.item() == 1.0 else "another worker's shard is unusable")
            if problem is None:
                placement.load(d, loop, rank)
            else:
                if rank == 0:
                    print(f"minidisc: warning: not resuming stage {config.get('name')} from its checkpoint "
                          f"({problem}); starting the stage afresh", flush=True)
                resumed = False
    if not resumed:
        loop.best_state = placement.full_state(core)
    if rank == 0:
        stage_event(config, "start", start_step=loop.state.step, resumed=resumed)
    data = _batches(train, tokenizer, dc.batch_size, config["seed"] + 1000 * rank, loop.state.step * dc.grad_accum)
    crash_at = config.get("crash_at_step")

    def report(lp: Loop, entry: dict[str, Any] | None) -> None:
        if entry is not None and lp.state.best_step == lp.state.step:
            lp.best_state = placement.full_state(core)  # a collective under FSDP: every rank gathers
        final = placement.full_state(core) if lp.state.stopped else None  # the last weights, for the record
        if entry is not None and rank == 0:
            st = lp.state
            stage_event(config, "eval", step=st.step, loss=entry["loss"], metric=entry["metric"],
                   best_metric=st.best_metric, best_step=st.best_step,
                   early_stop=bool(st.stopped and st.step < dc.steps))
        with tempfile.TemporaryDirectory() as tmp:
            placement.save(tmp, lp, rank)
            if final is not None and rank == 0:
                save_file(final, os.path.join(tmp, "final.safetensors"))
            ckpt = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or placement.kind == "fsdp") else None
            ray.train.report({"step": lp.state.step, "best_metric": lp.state.best_metric,
                              "best_step": lp.state.best_step, **({"loss": entry["loss"], "metric": entry["metric"]}
                                                                  if entry else {})}, checkpoint=ckpt)

    last_progress = [time.time()]

    def maybe_crash(lp: Loop, loss: float) -> None:
        if rank == 0 and time.time() - last_progress[0] >= PROGRESS_EVERY_S:
            last_progress[0] = time.time()
            stage_event(config, "progress", step=lp.state.step, loss=loss)
        if crash_at is not None and lp.state.step == crash_at and not resumed and rank == 0:
            os._exit(1)  # test hook: a worker dies mid-stage

    if loop.state.stopped:
        report(loop, None)  # a finished run resumed (the driver died before taking the result): hand it back
        return
    loop.run(data, on_eval=report, on_step=maybe_crash)
    if probe is not None and rank == 0:
        probe.__exit__(None, None, None)
        stage_event(config, "memory", rss_start=probe.start, rss_peak=probe.peak)


def stage_event(config: dict[str, Any], event: str, **fields: Any) -> None:
    """One line in the stage's events file (rank 0): how the driver follows a stage it does not run."""
    if config.get("events_path"):
        with open(config["events_path"], "a") as fh:
            fh.write(json.dumps({"event": event, "stage": config["name"], "run_id": config.get("run_id"),
                                 "time": time.time(), **fields}) + "\n")
