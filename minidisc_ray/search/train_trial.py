"""A search trial larger than one device: the candidate's recovery runs as a Ray Train ``TorchTrainer``
inside the Tune trial (``search.trial_workers`` > 1), its weights sharded with FSDP2 over the workers.

This is how Ray documents Tune over Train with Train V2: the Tune function trainable launches the
``TorchTrainer`` and reports what it returns; the trial itself holds almost no resources (the workers hold
``search.trial_cpus`` and ``search.trial_gpus`` between them). The searcher sees an ordinary trial.

Every worker draws the same batch of ``recovery.batch_size`` rows (the same seeded stream a one-worker
trial draws) and trains on its own contiguous share; FSDP averages the gradients over the workers, so
the optimiser steps on the mean over the whole batch, as the one-worker trial does (exactly so when every
share carries the same number of tokens). Rank 0 gathers the recovered candidate and scores it on the dev
set, like :func:`minidisc_ray.candidates.score_candidate`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from minidisc_ray.candidates import SearchPayload
from minidisc_ray.chain.placement import ModelPlacement
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import Loop, LoopSpec, evaluate
from minidisc_ray.families import count_params
from minidisc_ray.modelio.sharded import load_sharded
from minidisc_ray.pruning import PruningPlan, param_sparsity, prune_model
from minidisc_ray.ray_env import resolved
from minidisc_ray.ray_train import report_from_rank_zero
from minidisc_ray.training import kd_loss_fn

TRIAL_CPU = 0.01  # what a multi-worker Tune trial holds itself (it only waits for its worker group)


def _share(batches: Iterator[dict[str, torch.Tensor]], rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        n = next(iter(batch.values())).shape[0]
        size = n // world
        yield {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}


def _models(payload: SearchPayload, plan: PruningPlan, placement: ModelPlacement, device: torch.device,
            offline: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the teacher, the candidate the loop trains, its unwrapped module): both read shard by shard from the
    teacher's files (``teacher.placement: sharded``), or the teacher whole and the candidate cut from it and
    sharded over the workers (the teacher left on the CPU when its stored targets teach instead)."""
    if payload.teacher_dir:  # teacher.placement: sharded: teacher and candidate read shard by shard, never whole
        teacher = load_sharded(payload.teacher_dir, payload.kind, device,
                               torch.bfloat16 if device.type == "cuda" else None)
        model = core = load_sharded(payload.teacher_dir, payload.kind, device, plan=plan, trainable=True,
                                    mp_policy=placement.mixed_precision(device), freeze_unpruned=True)
        return teacher, model, core
    teacher = payload.teacher()
    candidate = prune_model(teacher, plan)
    if not offline:
        teacher = teacher.to(device, torch.bfloat16 if device.type == "cuda" else None)
    model, core = placement.wrap(candidate, device)
    return teacher, model, core


def _score(payload: SearchPayload, plan: PruningPlan, placement: ModelPlacement, core: nn.Module,
           rank: int) -> tuple[float, int, int] | None:
    """(dev metric, prunable and total parameters) of the recovered candidate on rank 0 (None elsewhere): every
    rank evaluates a sharded candidate (collective forwards); otherwise every rank gathers its weights and rank 0
    evaluates the whole candidate."""
    dev = make_loader(payload.dataset("dev"), payload.tokenizer, 64)
    if payload.teacher_dir:  # every rank evaluates the sharded candidate on the whole dev set (collective forwards)
        metric = evaluate(core, dev, payload.metric)["metric"]
        prunable, total = count_params(core)  # a sharded weight counts its whole shape (DTensor.numel)
        return (metric, prunable, total) if rank == 0 else None
    state = placement.full_state(core)  # a collective: every rank gathers
    if rank != 0:
        return None
    whole = prune_model(payload.teacher(), plan)
    whole.load_state_dict(state)
    metric = evaluate(whole, dev, payload.metric)["metric"]
    prunable, total = count_params(whole)
    return metric, prunable, total


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: recover one candidate on this worker's share of every batch."""

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    payload: SearchPayload = resolved(config["payload"])
    sparsity = float(config["sparsity"])
    torch.manual_seed(payload.seed)
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    rec = payload.recovery
    offline = payload.offline_loss()
    plan = payload.plan_for(sparsity)
    placement = ModelPlacement("fsdp", world)
    teacher, model, core = _models(payload, plan, placement, device, offline is not None)
    data = infinite(make_loader(payload.dataset("train"), payload.tokenizer, rec.batch_size, shuffle=True,
                                seed=payload.seed))
    loss_fn = offline or kd_loss_fn(teacher, rec.temperature, payload.regression, rec.hard_label_weight)
    loop = Loop(model, LoopSpec(steps=rec.steps, lr=rec.lr), loss_fn, core=core)
    loop.run(_share(data, rank, world))
    losses = torch.tensor([loop.mean_loss], device=device)
    torch.distributed.all_reduce(losses)
    metrics: dict[str, Any] = {"recovery_loss": float(losses.item()) / world, "workers": world}
    scored = _score(payload, plan, placement, core, rank)
    if scored is not None:
        metric, prunable, total = scored
        ps = param_sparsity(prunable, payload.teacher_prunable)
        metrics.update(sparsity=sparsity, param_sparsity=ps, metric=metric, tradeoff=payload.score(metric, ps),
                       prunable=prunable, params=total)
    report_from_rank_zero(metrics, rank)


def score_on_workers(payload: SearchPayload, sparsity: float, workers: int, cpus: float, gpus: float
                     ) -> dict[str, Any]:
    """Recover and score one candidate on ``workers`` Ray Train workers (FSDP); the result has the keys
    :func:`~minidisc_ray.candidates.score_candidate` returns."""
    t0 = time.perf_counter()
    use_gpu = gpus > 0
    per_worker = (cpus - TRIAL_CPU) / workers  # the Tune trial itself holds TRIAL_CPU of the trial's CPUs
    resources = {"CPU": per_worker, **({"GPU": gpus / workers} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config={"payload": payload, "sparsity": sparsity, "cpus_per_worker": per_worker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=1800),
        run_config=RunConfig(name=f"trial-{sparsity}-{int(time.time() * 1000)}",
                             storage_path=tempfile.mkdtemp(prefix="minidisc-trial-")))
    result = trainer.fit()
    out = dict(result.metrics or {})
    wall = time.perf_counter() - t0
    out["seconds"] = wall
    out["cpu_seconds"] = wall * cpus  # the workers' CPUs for the trial's wall time (their processes are not ours)
    return out
