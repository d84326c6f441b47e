"""The distillation chain on Ray Train: teacher -> TA -> student, one ``TorchTrainer`` run per stage.

Each stage distils a pruned student from its teacher with the MiniDisc loss under DDP (gloo on CPU,
NCCL on GPU), AdamW with linear warm-up and decay, evaluation on dev every ``eval_every`` steps,
early stopping with ``patience``, and a checkpoint (safetensors weights + optimiser state) at every
evaluation. With ``FailureConfig(max_failures)`` a crashed worker group restarts from the last
checkpoint: the step counter continues where the checkpoint left it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minidisc_ray.config import DistillConfig
from minidisc_ray.pipeline import log
from minidisc_ray.ray_env import interruptible


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


def _save_checkpoint(directory: str, model: torch.nn.Module, best: dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer, sched: Any, state: dict[str, Any]) -> None:
    """Weights, best weights and optimiser moments as safetensors; everything else as JSON (no pickle)."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(directory, "model.safetensors"))
    save_file(best, os.path.join(directory, "best.safetensors"))
    opt_state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, os.path.join(directory, "optimizer.safetensors"))
    meta = {"param_groups": opt_state["param_groups"], "scalars": scalars, "scheduler": sched.state_dict()}
    Path(directory, "optimizer.json").write_text(json.dumps(meta))
    Path(directory, "state.json").write_text(json.dumps(state))


def _load_optimizer(directory: str, opt: torch.optim.Optimizer, sched: Any) -> None:
    meta = json.loads(Path(directory, "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(os.path.join(directory, "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop of one distillation stage (runs on every worker)."""
    import ray
    import ray.train
    import ray.train.torch

    from minidisc_ray.data import infinite, make_loader
    from minidisc_ray.modelio import model_from_blob
    from minidisc_ray.training import distill_loss_on_batch, evaluate, make_optimizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dc: DistillConfig = config["distill"]
    torch.manual_seed(config["seed"] + rank)
    cpus = int(dc.cpus_per_worker) if not dc.use_gpu else 1
    torch.set_num_threads(max(1, cpus))
    device = ray.train.torch.get_device()
    teacher = model_from_blob(ray.get(config["teacher_ref"])).to(device).eval()
    student = model_from_blob(ray.get(config["student_ref"]))
    tokenizer = config["tokenizer"]
    import datasets
    from datasets.table import InMemoryTable

    train = datasets.Dataset(InMemoryTable(ray.get(config["train_ref"])))
    dev = datasets.Dataset(InMemoryTable(ray.get(config["dev_ref"])))
    if world > 1:
        train = train.shard(num_shards=world, index=rank, contiguous=True)
    steps = dc.steps
    opt, sched = make_optimizer(student, dc.lr, dc.weight_decay, int(dc.warmup_ratio * steps), steps)
    state: dict[str, Any] = {"step": 0, "best_metric": -math.inf, "best_step": 0, "bad_evals": 0, "history": []}
    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            student.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            best_state = load_file(os.path.join(d, "best.safetensors"))
            _load_optimizer(d, opt, sched)
            state = json.loads(Path(d, "state.json").read_text())
    if config.get("events_path") and rank == 0:
        with open(config["events_path"], "a") as fh:
            fh.write(json.dumps({"event": "start", "stage": config["name"], "start_step": state["step"],
                                 "resumed": resumed, "run_id": config.get("run_id"), "time": time.time()}) + "\n")
    model = ray.train.torch.prepare_model(student)
    core = getattr(model, "module", model)
    data = infinite(make_loader(train, tokenizer, dc.batch_size, shuffle=True, seed=config["seed"] + 1000 * rank
                                + state["step"]))
    dev_loader = make_loader(dev, tokenizer, 64)
    crash_at = config.get("crash_at_step")
    model.train()
    running, seen = 0.0, 0
    t0 = time.perf_counter()
    if state.get("stopped") or state["step"] >= steps:
        # a finished run resumed (the driver died before it took the result): hand the result back again
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(tmp, core, best_state, opt, sched, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": state["step"], "best_metric": state["best_metric"],
                              "best_step": state["best_step"]}, checkpoint=ckpt)
        return
    while state["step"] < steps:
        batch = {k: v.to(device) for k, v in next(data).items()}
        loss = distill_loss_on_batch(model, teacher, batch, dc.temperature, config["regression"], dc.hard_label_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        running += float(loss.detach())
        seen += 1
        if crash_at is not None and state["step"] == crash_at and not resumed and rank == 0:
            os._exit(1)  # test hook: a worker dies mid-stage
        last = state["step"] == steps
        if state["step"] % dc.eval_every == 0 or last:
            m = evaluate(core, dev_loader, config["metric"])
            improved = m["metric"] > state["best_metric"]
            if improved:
                state.update(best_metric=m["metric"], best_step=state["step"], bad_evals=0)
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            else:
                state["bad_evals"] += 1
            stop = state["bad_evals"] >= dc.patience
            entry = {"step": state["step"], "loss": running / max(1, seen), "metric": m["metric"],
                     "best_metric": state["best_metric"], "seconds": time.perf_counter() - t0}
            state["history"].append(entry)
            if rank == 0:
                print(f"[distill {config['name']}] step {state['step']}/{steps} loss {entry['loss']:.4f} "
                      f"dev {config['metric']} {m['metric']:.4f} (best {state['best_metric']:.4f} at "
                      f"{state['best_step']}){' early stop' if stop else ''}", flush=True)
            running, seen = 0.0, 0
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _save_checkpoint(tmp, core, best_state, opt, sched, {**state, "stopped": stop})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"step": state["step"], "loss": entry["loss"], "metric": m["metric"],
                                  "best_metric": state["best_metric"], "best_step": state["best_step"]},
                                 checkpoint=ckpt)
            if stop:
                break


def run_stage(name: str, teacher_blob: dict[str, Any], student_blob: dict[str, Any], tokenizer: Any,
              train_table: Any, dev_table: Any, metric: str, regression: bool, dc: DistillConfig, seed: int,
              storage_path: str, crash_at_step: int | None = None, events_path: str | None = None,
              run_name: str | None = None, run_id: str | None = None) -> StageResult:
    """Run one stage as a ``TorchTrainer``; returns the best weights and what happened.

    ``run_name`` names the Ray Train run under ``storage_path``: running a stage again under the same
    name resumes it from its last checkpoint (how ``minidisc run`` continues after a kill), so the
    name must identify everything that determines the stage. ``run_id`` tags this job's events, so
    ``attempts`` counts the attempts of this run only.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    log(f"[distill {name}] Ray Train: {dc.num_workers} worker(s), {'GPU' if dc.use_gpu else 'CPU'}, "
        f"{dc.steps} steps, batch {dc.batch_size}, eval every {dc.eval_every}")
    loop_config = {"name": name, "distill": dc, "seed": seed, "metric": metric, "regression": regression,
                   "teacher_ref": ray.put(teacher_blob), "student_ref": ray.put(student_blob),
                   "train_ref": ray.put(train_table), "dev_ref": ray.put(dev_table), "tokenizer": tokenizer,
                   "crash_at_step": crash_at_step, "events_path": events_path, "run_id": run_id}
    resources = {"CPU": dc.cpus_per_worker}
    if dc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        stage_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name or f"distill-{name}-{int(time.time())}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = interruptible(trainer.fit)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_file(os.path.join(d, "best.safetensors"))
        state = json.loads(Path(d, "state.json").read_text())
    attempts = 1
    if events_path and Path(events_path).is_file():
        attempts = sum(1 for line in Path(events_path).read_text().splitlines()
                       if line.strip() and (e := json.loads(line)).get("stage") == name
                       and (run_id is None or e.get("run_id") == run_id))
    return StageResult(name, best, float(state["best_metric"]), int(state["best_step"]), int(state["step"]),
                       time.perf_counter() - t0, list(state["history"]), attempts)
