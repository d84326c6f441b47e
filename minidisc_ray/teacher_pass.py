"""A sharded teacher's dev metric and importance, measured on a Ray Train worker group
(``teacher.placement: sharded``): the driver never loads the teacher.

Every worker reads its shard of the teacher from the directory's safetensors
(:func:`minidisc_ray.modelio.sharded.load_sharded`, FSDP2, resharded after each forward), and all of them run
the whole dev set (the metric needs every prediction in one place); the importance sample
(``pruning.importance_samples`` rows, drawn and batched as :func:`minidisc_ray.pipeline.importance_of` does)
is dealt out batch by batch over the ranks and each unit's summed score all-reduced before it is normalised.
FSDP gathers each layer's whole weights for its forward (and backward), so a rank's mask gradients are the
whole teacher's on its batch: the scores are those of the teacher in one process, up to the order of the
sums. A rank with one batch fewer runs a batch again with weight 0, so every rank joins every collective.
The result is kept in
``OUTPUT/teacher_pass.json`` (signed like the evaluation records) under a key of teacher files, data and
importance settings, so a rerun reuses it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import ray
import ray.train
import ray.train.torch
import torch
from datasets.table import InMemoryTable
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import PreTrainedTokenizerBase

from minidisc_ray.config import Config
from minidisc_ray.data import make_loader
from minidisc_ray.interrupts import interruptible
from minidisc_ray.modelio.sharded import load_sharded
from minidisc_ray.outputs import write_json
from minidisc_ray.pruning import Importance, compute_importance
from minidisc_ray.ray_env import ensure_ray
from minidisc_ray.ray_train import report_from_rank_zero
from minidisc_ray.records import digest, sign, verify, warn_record
from minidisc_ray.training import evaluate

FILE = "teacher_pass.json"


def _rows(ref: ray.ObjectRef) -> datasets.Dataset:
    """The rows :func:`_put` put into the object store, as a torch-formatted dataset."""
    return datasets.Dataset(InMemoryTable(ray.get(ref))).with_format("torch")


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: the teacher read shard by shard, its dev metrics, and its importance over this
    rank's share of the sample batches (the sums all-reduced)."""

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    half = torch.bfloat16 if device.type == "cuda" else None
    teacher = load_sharded(config["teacher_dir"], config["kind"], device, half, shard=world > 1)
    tokenizer = config["tokenizer"]
    t0 = time.perf_counter()
    metrics = evaluate(teacher, make_loader(_rows(config["dev_ref"]), tokenizer, 64), config["metric"])
    t1 = time.perf_counter()
    sample = _rows(config["sample_ref"])
    batches = list(make_loader(sample, tokenizer, config["batch_size"]))
    mine = batches[rank::world]  # the importance batches dealt out over the ranks, their sums all-reduced
    rounds = -(-len(batches) // world)
    weights = [1.0] * len(mine) + [0.0] * (rounds - len(mine))  # a short rank repeats a batch and keeps nothing
    mine += batches[:1] * (rounds - len(mine))

    def reduce(sums: list[torch.Tensor]) -> None:
        if world > 1:
            for t in sums:
                if t.numel():
                    torch.distributed.all_reduce(t)

    imp = compute_importance(teacher, mine, method=config["method"], weights=weights, reduce=reduce)
    imp = Importance(imp.heads, imp.neurons, len(sample))
    out = {"metrics": json.dumps(metrics), "importance": json.dumps(imp.to_dict()), "workers": world,
           "eval_seconds": round(t1 - t0, 2), "importance_seconds": round(time.perf_counter() - t1, 2)}
    report_from_rank_zero(out, rank)


def sharded_teacher_pass(cfg: Config, *, teacher_dir: str, kind: str, teacher_fp: str, data_key: str,
                         tokenizer: PreTrainedTokenizerBase, dev: datasets.Dataset, sample: datasets.Dataset,
                         metric: str, output_dir: Path,
                         log: Callable[[str], None] = print) -> tuple[dict[str, float], Importance]:
    """(the teacher's dev metrics, its importance over ``sample``), from ``OUTPUT/teacher_pass.json`` when an
    earlier run measured the same teacher files on the same data with the same settings, else from a Ray
    Train run of ``max(distill.num_workers, search.trial_workers)`` workers."""
    p = cfg.pruning
    key = digest(teacher_fp, data_key, p.importance_samples, p.batch_size, cfg.seed, p.importance, metric)
    path = output_dir / FILE
    if path.is_file():  # signed like the evaluation records: a planted or edited file is measured again
        try:
            done = json.loads(path.read_text())
            mac = done.pop("mac", None)
            if not verify(done, mac):
                warn_record(path, "its signature does not match its content")
            elif done.get("key") == key:
                log(f"[teacher] sharded: dev metric and importance from {path} (same teacher files and data)")
                return {k: float(v) for k, v in done["metrics"].items()}, Importance.from_dict(done["importance"])
        except (ValueError, KeyError, TypeError, AttributeError):
            warn_record(path, "it is not a teacher-pass record")
    ensure_ray(cfg.ray)
    dc = cfg.distill
    workers = max(dc.num_workers, cfg.search.trial_workers)
    log(f"[teacher] sharded over {workers} Ray Train worker(s): dev metric and {p.importance} importance over "
        f"{len(sample)} rows (the driver does not load it)")
    t0 = time.perf_counter()
    resources = {"CPU": dc.cpus_per_worker, **({"GPU": 1} if dc.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"teacher_dir": teacher_dir, "kind": kind, "tokenizer": tokenizer, "metric": metric,
                           "dev_ref": _put(dev), "sample_ref": _put(sample), "batch_size": p.batch_size,
                           "method": p.importance, "cpus_per_worker": dc.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=dc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo", timeout_s=1800),
        run_config=RunConfig(name=f"teacher-pass-{key[:12]}", storage_path=tempfile.mkdtemp(prefix="minidisc-tp-")))
    result = interruptible(trainer.fit)
    got = dict(result.metrics or {})
    metrics = {k: float(v) for k, v in json.loads(got["metrics"]).items()}
    imp = Importance.from_dict(json.loads(got["importance"]))
    body = {"key": key, "metrics": metrics, "importance": imp.to_dict(), "workers": got.get("workers"),
            "seconds": round(time.perf_counter() - t0, 1)}
    write_json(path, {**body, "mac": sign(body)})
    log(f"[teacher] dev {metric} {metrics['metric']:.4f} (sharded pass: {time.perf_counter() - t0:.1f}s)")
    return metrics, imp


def _put(dataset: datasets.Dataset) -> ray.ObjectRef:
    """The dataset's rows as one Arrow table in the object store: a selection (a shuffled sample) is
    materialised first, since ``.data.table`` alone is the table beneath it in its original order."""
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    return ray.put(dataset.with_format(None).data.table)
