"""Ray plumbing shared by the ``TorchTrainer`` runs minidisc-ray launches (a multi-worker search trial, the
sharded teacher pass, a chain stage): how a worker group hands its result back to the driver."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train


def node_id() -> str:
    """The Ray node this process runs on (the first 12 hex digits of its id; ``local`` outside Ray): how
    records and events say where a trial or a stage ran, and what a node failure took down."""
    try:
        return str(ray.get_runtime_context().get_node_id())[:12]
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def report_from_rank_zero(metrics: dict[str, Any], rank: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches a checkpoint (its metrics file), which is what makes
    Train V2 hand its metrics back to the caller as the result's."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
