"""Ray Train plumbing shared by the ``TorchTrainer`` runs minidisc-ray launches (a multi-worker search trial, the
sharded teacher pass, a chain stage): how a worker group hands its result back to the driver."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray.train


def report_from_rank_zero(metrics: dict[str, Any], rank: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches a checkpoint (its metrics file), which is what makes
    Train V2 hand its metrics back to the caller as the result's."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
