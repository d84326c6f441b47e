"""``minidisc plan``: sizes, FLOPs and GPU memory of a job, from the architecture alone (no weights).

The teacher is instantiated on the meta device (shapes only, no memory, no download of weights) and
every candidate of the grid is cut from it with the same pruning code the job runs, using uniform
per-layer widths (:mod:`minidisc_ray.plan_shapes`). From those shapes the plan derives:

* parameters (prunable and total) and forward FLOPs per token of every candidate, and the measured
  CPU latency of a forward pass where the model is small enough to build here;
* the memory per GPU of one search trial and of each chain stage (teacher -> TA, TA -> student, the
  direct-KD baseline) under DDP and under FSDP for ``N`` GPUs of a given memory, itemised into weights,
  gradients, optimiser state, the frozen teacher and activations at the configured batch and length
  (the memory model: :mod:`minidisc_ray.plan_memory`);
* the smallest Ray Train ``ScalingConfig`` under which each stage fits (:mod:`minidisc_ray.plan_layout`).

:func:`make_plan` returns the plan as plain data; :func:`minidisc_ray.plan_render.render` writes it as text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from minidisc_ray.errors import UserInputError
from minidisc_ray.plan_host import host_memory
from minidisc_ray.plan_layout import PLACEMENTS, RUNNABLE_PLACEMENTS, offline_pass, smallest_fit
from minidisc_ray.plan_memory import GIB, HEADROOM, Setting, Shape, flops_per_token, stage_memory
from minidisc_ray.plan_shapes import candidate_models, cpu_latency_ms, model_shape


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is asked about: the job's grid, sequence length and batches, and the cluster's GPUs."""

    kind: str  # classification | lm
    grid: list[float]
    student_sparsity: float
    length: int
    trial_batch: int
    distill_batch: int
    gpus: int  # per node
    gpu_gib: float
    nodes: int = 1
    placement: str = "auto"  # auto, or the teacher placement asked for
    top_k: int = 64
    latency_max_params: int = 200_000_000  # models up to this size are built on the CPU and timed

    @property
    def lm(self) -> bool:
        return self.kind == "lm"

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_gib * GIB


@dataclass(frozen=True)
class Link:
    """One chain stage the plan sizes: ``trained`` distilled from the frozen ``frozen``."""

    name: str
    trained: Shape
    frozen: Shape


@dataclass(frozen=True)
class Candidates:
    """The teacher and every model of the grid on the meta device, their shapes, and the chain's links."""

    sparsities: list[float]  # the teacher (0.0), the grid and the student, ascending
    models: dict[float, nn.Module]
    shapes: dict[float, Shape]
    assistants: list[float]  # the grid's TA candidates (the search trials)
    teacher: Shape
    assistant: Shape  # the largest TA the search could choose (the teacher when the grid has none)
    links: tuple[Link, ...]


def make_plan(config: PretrainedConfig, kind: str, grid: list[float], student_sparsity: float, length: int,
              trial_batch: int, distill_batch: int, gpus: int, gpu_gib: float, *,
              latency_max_params: int = 200_000_000, source: str = "", nodes: int = 1, placement: str = "auto",
              top_k: int = 64, head_gib: float | None = None, worker_gib: float | None = None) -> dict[str, Any]:
    """The whole plan as plain data (see the module docstring).

    ``gpus`` per node, ``nodes`` nodes. Every candidate's search trial and every chain stage is laid out
    under each teacher placement (:class:`~minidisc_ray.plan_memory.Setting`); the recommended placement is the
    first of ``replicated, sharded, offline`` (or the one asked for) under which all of them fit. ``head_gib`` and
    ``worker_gib``: host RAM of the driver's node and of a worker node, which the host block is checked against
    (:mod:`minidisc_ray.plan_host`).
    """
    t0 = time.perf_counter()
    req = PlanRequest(kind=kind, grid=grid, student_sparsity=student_sparsity, length=length, trial_batch=trial_batch,
                      distill_batch=distill_batch, gpus=gpus, gpu_gib=gpu_gib, nodes=nodes, placement=placement,
                      top_k=top_k, latency_max_params=latency_max_params)
    cands = cut_candidates(config, req)
    layouts = {p: placement_layout(p, cands, req) for p in PLACEMENTS}
    order = RUNNABLE_PLACEMENTS if placement == "auto" else (placement,)
    recommended = next((p for p in order if layouts[p]["fits_all"]), None)
    chosen = layouts[recommended or order[0]]
    rows = [candidate_row(s, cands, req, chosen) for s in cands.sparsities]
    worst_trial = max((r for r in rows if r["role"] == "candidate"), key=lambda r: r["trial_gib"], default=None)
    teacher = cands.teacher
    return {
        "source": source, "model_type": getattr(config, "model_type", None), "kind": kind,
        "teacher_params": teacher.params, "teacher_params_billions": round(teacher.params / 1e9, 3),
        "sequence_length": length, "trial_batch": trial_batch, "distill_batch_per_worker": distill_batch,
        "tokens_per_step": distill_batch * length, "nodes": nodes, "gpus_per_node": gpus, "gpus": req.total_gpus,
        "gpu_gib": gpu_gib, "candidates": rows, "placement": recommended, "placements": layouts,
        "search_trial": {"largest_candidate_gib": worst_trial["trial_gib"] if worst_trial else None,
                         "all_fit_one_gpu": all(r.get("trial_fits_one_gpu", True) for r in rows),
                         "trial_gpus": chosen["trial_gpus"],
                         "note": "trial_gib: one candidate on one GPU beside the whole bf16 teacher; 'trial': the "
                                 "smallest layout under the recommended placement (search.trial_gpus workers)"},
        "chain": chain_memory(cands, req, chosen), "driver": driver_memory(cands),
        "host": host_memory([(link.name, link.trained.params, link.frozen.params) for link in cands.links],
                            teacher.params, cands.assistant.params, cands.shapes[req.student_sparsity].params,
                            {p: {n: int(st["workers"]) for n, st in entry["stages"].items()}
                             for p, entry in layouts.items()},
                            largest_tensor=teacher.vocab * teacher.hidden, head_gib=head_gib, worker_gib=worker_gib),
        "assumptions": "bf16 teacher, fp32 AdamW student (16 bytes per parameter, FSDP divides "
        "them), bf16 activations with memory-efficient attention, 16 bytes per position of vocabulary-sized "
        f"logits, {int(HEADROOM * 100)}% of GPU memory usable; TA sized as the grid's least sparse candidate",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def cut_candidates(config: PretrainedConfig, req: PlanRequest) -> Candidates:
    """The teacher and the grid's models cut from it (uniform widths, meta device) and the links between them."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    sparsities = sorted({0.0, *req.grid, req.student_sparsity})
    teacher_model, models = candidate_models(config, req.kind, [s for s in sparsities if s > 0])
    models[0.0] = teacher_model
    shapes = {s: model_shape(m, vocab) for s, m in models.items()}
    teacher = shapes[0.0]
    assistants = [s for s in req.grid if s != req.student_sparsity and s > 0]
    ta = shapes[min(assistants)] if assistants else teacher
    student = shapes[req.student_sparsity]
    links = (Link("teacher_to_assistant", ta, teacher), Link("assistant_to_student", student, ta),
             Link("direct_kd", student, teacher))
    return Candidates(sparsities=sparsities, models=models, shapes=shapes, assistants=assistants, teacher=teacher,
                      assistant=ta, links=links)


def placement_layout(placement: str, cands: Candidates, req: PlanRequest) -> dict[str, Any]:
    """The smallest layout of every search trial and chain stage with the teacher placed as ``placement``, and
    whether all of them fit (offline: the teacher's and the assistant's inference passes too)."""
    def fit(trained: Shape, frozen: Shape, batch: int) -> dict[str, Any]:
        return smallest_fit(trained, frozen, req.length, req.lm, batch, max_workers=req.total_gpus,
                            gpu_bytes=req.gpu_bytes, placements=(placement,), top_k=req.top_k)

    trials = {s: fit(cands.shapes[s], cands.teacher, req.trial_batch) for s in cands.assistants}
    stages = {link.name: fit(link.trained, link.frozen, req.distill_batch) for link in cands.links}
    entry: dict[str, Any] = {"trials": {str(s): t for s, t in trials.items()}, "stages": stages,
                             "trial_gpus": max((t["workers"] for t in trials.values()), default=1)}
    if placement == "offline":  # the teacher's pass feeds trials, the first link, direct KD; the assistant's the next
        entry["teacher_pass"] = offline_pass(cands.teacher, req.length, req.total_gpus, req.gpu_bytes, req.top_k)
        entry["assistant_pass"] = offline_pass(cands.assistant, req.length, req.total_gpus, req.gpu_bytes, req.top_k)
    entry["fits_all"] = (all(t["fits"] for t in trials.values()) and all(x["fits"] for x in stages.values())
                         and all(entry.get(k, {}).get("fits", True) for k in ("teacher_pass", "assistant_pass")))
    return entry


def candidate_row(sparsity: float, cands: Candidates, req: PlanRequest, chosen: dict[str, Any]) -> dict[str, Any]:
    """One row of the candidates table: size, FLOPs, CPU latency (small models), and for a TA candidate its
    search trial's memory on one GPU, on a CPU worker and under the recommended placement (``chosen``)."""
    sh = cands.shapes[sparsity]
    role = "teacher" if sparsity == 0.0 else ("student" if sparsity == req.student_sparsity else "candidate")
    row: dict[str, Any] = {"sparsity": sparsity, "role": role, "params": sh.params, "prunable": sh.prunable,
                           "gflops_per_token": round(flops_per_token(sh, req.length) / 1e9, 4)}
    if sh.params <= req.latency_max_params:
        row["cpu_latency_ms"] = round(cpu_latency_ms(cands.models[sparsity], req.length), 2)
    if role == "candidate":
        one_gpu = Setting(micro_batch=req.trial_batch)
        one = stage_memory(sh, cands.teacher, req.length, req.lm, one_gpu)
        row["trial_gib"] = round(one["total"] / GIB, 2)
        # the same trial in fp32 on a CPU worker (the column benchmarks/memory.py checks)
        cpu = stage_memory(sh, cands.teacher, req.length, req.lm, one_gpu, cpu=True)
        row["trial_cpu_gib"] = round(cpu["total"] / GIB, 2)
        row["trial_fits_one_gpu"] = one["total"] <= HEADROOM * req.gpu_bytes
        row["trial"] = chosen["trials"][str(sparsity)]
    return row


def chain_memory(cands: Candidates, req: PlanRequest, chosen: dict[str, Any]) -> dict[str, Any]:
    """Each chain stage's memory per GPU on all the cluster's GPUs under DDP and FSDP, its smallest layout under
    the recommended placement (``chosen``) and its host memory on a CPU worker."""
    stages = {}
    for link in cands.links:
        per = {p: {k: round(v / GIB, 3) for k, v in stage_memory(
                   link.trained, link.frozen, req.length, req.lm,
                   Setting(parallelism=p, workers=req.total_gpus, micro_batch=req.distill_batch)).items()}
               for p in ("ddp", "fsdp")}
        cpu = stage_memory(link.trained, link.frozen, req.length, req.lm, Setting(micro_batch=req.distill_batch),
                           cpu=True, keep_best=True)
        stages[link.name] = {"trained_params": link.trained.params, "frozen_params": link.frozen.params,
                             f"gib_per_gpu_on_{req.total_gpus}": per, "smallest": chosen["stages"][link.name],
                             "cpu_gib": round(cpu["total"] / GIB, 3)}
    return stages


def driver_memory(cands: Candidates) -> dict[str, Any]:
    """Host memory of the driver process and disk of ``OUTPUT/recovered``, per teacher placement.

    Replicated and offline, the driver loads the teacher whole in fp32 (its dev metric, the importance pass) and
    puts it in the object store once (fp32, the driver's node); sharded, it holds the shapes only (a worker group
    measures metric and importance, the workers cut every candidate). ``minidisc run`` keeps each evaluated
    candidate's recovered fp32 weights in ``OUTPUT/recovered`` when trials hold the teacher whole (auto's halving
    round and the chain's links from the teacher start from them); under sharded or offline trials it keeps none.
    """
    kept = [4.0 * cands.shapes[s].params for s in cands.assistants]
    whole = round(4.0 * cands.teacher.params / GIB, 2)
    return {"teacher_gib": {"replicated": whole, "sharded": 0.0, "offline": whole},
            "object_store_gib": {"replicated": whole, "sharded": 0.0, "offline": whole},
            "recovered_gib": {"replicated": round(sum(kept) / GIB, 2), "sharded": 0.0, "offline": 0.0},
            "note": "host memory of the driver process and disk of OUTPUT/recovered (minidisc run with trials "
                    "holding the teacher whole, every grid point evaluated: the most it keeps)"}


def check_gpus(gpus: int, gpu_gib: float, nodes: int = 1) -> None:
    if gpus < 1:
        raise UserInputError("--gpus", gpus, "use 1 or more GPUs")
    if nodes < 1:
        raise UserInputError("--nodes", nodes, "use 1 or more nodes")
    if not (math.isfinite(gpu_gib) and gpu_gib > 0):
        raise UserInputError("--gpu-memory", gpu_gib, "give the memory of one GPU in GiB, e.g. 80")
