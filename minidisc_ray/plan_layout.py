"""The plan's layouts: the smallest layout (teacher placement, workers, memory savers) under which a trial or stage
fits a GPU, and the offline teacher's batch-inference pass.

A layout is a :class:`~minidisc_ray.plan_memory.Setting`; what it costs comes from
:func:`~minidisc_ray.plan_memory.stage_memory`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from minidisc_ray.plan_memory import GIB, HEADROOM, Setting, Shape, stage_memory

PLACEMENTS = ("replicated", "sharded", "offline")
# what ``minidisc run`` runs for trials and stages alike, in the order the plan recommends them: the teacher whole
# where it fits, else sharded (the exact loss, hidden-state term included, no stored targets), else offline
RUNNABLE_PLACEMENTS = ("replicated", "sharded", "offline")


def _worker_counts(limit: int) -> list[int]:
    counts, n = [], 1
    while n < limit:
        counts.append(n)
        n *= 2
    return [*counts, limit]


def _savers(batch: int, length: int) -> list[tuple[int, int, bool, int]]:
    """(micro-batch, accumulation, checkpointing, KL chunk) from none to all of the memory savers, in the
    order they cost compute: none; chunked KL (free); checkpointing (one more forward); smaller micro-batches."""
    chunk = max(1, min(length, 256))
    out = [(batch, 1, False, 0), (batch, 1, False, chunk), (batch, 1, True, chunk)]
    micro = batch
    while micro > 1:
        micro = max(1, micro // 2)
        out.append((micro, -(-batch // micro), True, chunk))
    return out


def smallest_fit(student: Shape, teacher: Shape, length: int, lm: bool, batch: int, *, max_workers: int,
                 gpu_bytes: float, placements: tuple[str, ...] = ("replicated",), top_k: int = 64) -> dict[str, Any]:
    """The first layout under which training ``student`` fits ``gpu_bytes`` per GPU: placements in the order
    given, then fewest workers (DDP on one, FSDP beyond: fewer GPUs per trial leave more trials running side by
    side), then fewest memory savers (each costs compute)."""
    last: tuple[Setting, dict[str, float]] | None = None
    for placement in placements:
        for n in _worker_counts(max_workers):
            for micro, accum, ckpt, chunk in _savers(batch, length):
                setting = Setting(placement, "ddp" if n == 1 else "fsdp", n, micro, accum, ckpt, chunk if lm else 0,
                                  top_k)
                mem = stage_memory(student, teacher, length, lm, setting)
                last = (setting, mem)
                if mem["total"] <= HEADROOM * gpu_bytes:
                    return _fit_row(True, setting, mem)
    assert last is not None
    return _fit_row(False, *last)


def _fit_row(fits: bool, setting: Setting, mem: dict[str, float]) -> dict[str, Any]:
    return {"fits": fits, **dataclasses.asdict(setting), "num_workers": setting.workers,
            "gib_per_gpu": round(mem["total"] / GIB, 2), "memory_gib": {k: round(v / GIB, 3) for k, v in mem.items()},
            "layout": setting.describe(),
            "scaling_config": f"ScalingConfig(num_workers={setting.workers}, use_gpu=True)" if fits else None}


def offline_pass(teacher: Shape, length: int, gpus: int, gpu_bytes: float, top_k: int,
                 batch: int = 8) -> dict[str, Any]:
    """The offline teacher's one batch-inference pass: GPUs per replica (the bf16 teacher split by layers
    over them, plus one batch's activations and logits), replicas over the cluster, and what is stored."""
    need = 2.0 * teacher.params + batch * length * (2 * teacher.hidden * 4 + teacher.vocab * 6)
    per_replica = max(1, math.ceil(need / (HEADROOM * gpu_bytes)))
    return {"gpus_per_replica": per_replica, "replicas": max(0, gpus // per_replica), "fits": per_replica <= gpus,
            "gib_per_replica": round(need / GIB, 2), "top_k": top_k,
            "stored_bytes_per_token": top_k * 8 + 4,
            "stored_gib_per_million_tokens": round(1e6 * (top_k * 8 + 4) / GIB, 3)}
