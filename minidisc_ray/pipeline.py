"""The job's front half as plain functions: config -> task data -> teacher (fine-tuned) -> importance.

Every command of the CLI and both Ray drivers start from :func:`prepare`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from minidisc_ray.config import Config, TaskConfig
from minidisc_ray.data import TaskData, _tokenizer_id, infinite, load_task, make_loader, tokenize_task
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import count_params, get_adaptor
from minidisc_ray.logs import log
from minidisc_ray.modelio.fingerprint import files_fingerprint
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.modelio.locate import check_max_length, read_record, resolve_model
from minidisc_ray.modelio.sharded import load_model_meta
from minidisc_ray.outputs import check_run_output, claim_run_dir, refuse_overlap
from minidisc_ray.pruning import Importance, compute_importance
from minidisc_ray.teacher_pass import sharded_teacher_pass
from minidisc_ray.training import evaluate, finetune


@dataclass
class Prepared:
    """Everything the search and the chain need, loaded once."""

    cfg: Config
    task: TaskData
    tokenizer: PreTrainedTokenizerBase
    teacher: nn.Module
    train: datasets.Dataset
    dev: datasets.Dataset
    teacher_dir: str
    teacher_metrics: dict[str, float]
    prunable: int
    total: int
    data_key: str = ""  # identity of the tokenised splits (task data, tokenizer, max_length)
    # teacher.placement: sharded: ``teacher`` is on the meta device (shapes only); its importance was measured on
    # a worker group and its fingerprint taken from its files (:mod:`minidisc_ray.teacher_pass`)
    importance: Importance | None = None
    teacher_fp: str = ""

    @property
    def teacher_on_meta(self) -> bool:
        """Whether the driver holds only the teacher's shapes (``teacher.placement: sharded``)."""
        return any(p.is_meta for p in self.teacher.parameters())

    def dev_loader(self, batch_size: int = 64) -> torch.utils.data.DataLoader:
        return make_loader(self.dev, self.tokenizer, batch_size)

    def train_iter(self, batch_size: int, seed: int) -> Any:
        return infinite(make_loader(self.train, self.tokenizer, batch_size, shuffle=True, seed=seed))


def task_record(task: TaskData, task_cfg: TaskConfig) -> dict[str, Any]:
    """What a model directory records of the task it was trained on (enough to rebuild the data)."""
    return {**task.describe(), "config": dataclasses.asdict(task_cfg)}


def set_label_names(model: nn.Module, task: TaskData) -> None:
    """``id2label``/``label2id`` in the model's config, so saved models (and pipelines) name the classes.

    Names come from the data (string labels, GLUE's own names) or are the class ids as text; a
    teacher that already names its classes keeps its names.
    """
    if task.is_lm or task.is_regression:
        return
    config: Any = model.config
    current = dict(getattr(config, "id2label", None) or {})
    defaults = {i: f"LABEL_{i}" for i in range(task.num_labels)}
    if current and {int(k): v for k, v in current.items()} != defaults and len(current) == task.num_labels:
        return
    names = task.label_names or [str(i) for i in range(task.num_labels)]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def _finetune_key(cfg: Config, task: TaskData) -> str:
    blob = json.dumps([task.fingerprint, cfg.teacher.model, dataclasses.asdict(cfg.finetune), cfg.seed,
                       cfg.task.max_length])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: Config, output_dir: str | Path, finetune_mode: str | None = None,
            on_inputs_checked: Callable[[], None] | None = None) -> Prepared:
    """Load the task and the teacher; fine-tune the teacher first when it is only pretrained.

    ``on_inputs_checked`` runs once data and teacher have loaded and tokenised without a problem and
    before any training or writing (the drivers start Ray and check resources there), so bad input
    costs seconds and leaves nothing on disk. The output directory is claimed right after it.

    A fine-tuned teacher is saved to ``OUTPUT/teacher`` and reused by later commands with the same
    data, teacher and fine-tuning settings.
    """
    mode = finetune_mode or cfg.teacher.finetune
    out = check_run_output(output_dir)
    teacher_path = Path(os.path.expanduser(cfg.teacher.model))
    own_teacher = teacher_path.exists() and teacher_path.resolve() == (out / "teacher").resolve()
    refuse_overlap(out, {"task.data": cfg.task.data if not cfg.task.data.startswith("package://") else None,
                         "teacher.model": None if own_teacher else cfg.teacher.model})
    t0 = time.perf_counter()
    task = load_task(cfg.task, cfg.seed)
    what = "language modelling" if task.is_lm else f"{task.num_labels} labels"
    log(f"[data] {task.source}: {len(task.train)} train / {len(task.dev)} dev rows, {what}, "
        f"metric {task.metric} ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(cfg.seed)
    teacher_dir = out / "teacher"
    key = _finetune_key(cfg, task)
    previous_key = read_record(teacher_dir, "--output").get("finetune_key") if teacher_dir.is_dir() else None
    sharded = cfg.teacher.placement == "sharded"  # the driver holds the teacher's shapes only

    def load(spec: str) -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any], bool]:
        if sharded:
            return load_model_meta(spec, task.num_labels, kind=task.kind)
        return load_model_dir(spec, task.num_labels, cfg.teacher.trust_remote_code, kind=task.kind)

    if mode != "never" and previous_key == key:
        log(f"[teacher] reusing the fine-tuned teacher in {teacher_dir}")
        model, tokenizer, _, head_missing = load(str(teacher_dir))
        mode = "never"
    else:
        model, tokenizer, _, head_missing = load(cfg.teacher.model)
        teacher_dir = Path(resolve_model(cfg.teacher.model))  # aliases (minilm, smollm2): where the files are
    fine_tune = mode == "always" or (mode == "auto" and head_missing)
    if sharded and fine_tune:
        raise UserInputError("teacher.finetune", mode, "a teacher.placement: sharded teacher is not fine-tuned by "
                             "minidisc-ray (that would load it whole); fine-tune it first (e.g. minidisc finetune "
                             "with teacher.placement: replicated) and pass it with teacher.finetune: never")
    get_adaptor(model)
    if not task.is_lm and int(model.config.num_labels) != task.num_labels:
        raise UserInputError("teacher.model", cfg.teacher.model,
                             f"the teacher has {model.config.num_labels} labels but the data has "
                             f"{task.num_labels}; use a teacher for this task or teacher.finetune=always")
    check_max_length(model, cfg.task.max_length)
    set_label_names(model, task)
    train, dev, cached = tokenize_task(task, tokenizer, cfg.task.max_length)
    log(f"[data] tokenised (max_length {cfg.task.max_length}){' from the Arrow cache' if cached else ''}")
    if mode == "never" and head_missing:
        raise UserInputError("teacher.finetune", "never", "the teacher has no trained classification head; "
                             "use teacher.finetune=auto")
    if on_inputs_checked is not None:
        on_inputs_checked()
    claim_run_dir(out)
    dev_loader = make_loader(dev, tokenizer, 64)
    if fine_tune:
        f = cfg.finetune
        if previous_key is not None and previous_key != key:
            log(f"[teacher] {out / 'teacher'} was fine-tuned with other data or settings; it is replaced when this "
                "fine-tune finishes (to keep it: --set teacher.model=DIR --set teacher.finetune=never)")
        log(f"[finetune] {cfg.teacher.model} on {task.source}: {f.max_steps} steps, batch {f.batch_size}, lr {f.lr}")
        train_iter = infinite(make_loader(train, tokenizer, f.batch_size, shuffle=True, seed=cfg.seed))
        result = finetune(model, train_iter, dev_loader, task.metric, f.max_steps, f.lr, f.warmup_ratio,
                          f.weight_decay, f.eval_every, log)
        prunable, total = count_params(model)
        teacher_dir = out / "teacher"
        save_model_dir(model, tokenizer, teacher_dir, record={
            "role": "teacher", "source": cfg.teacher.model, "finetune_key": key, "task": task_record(task, cfg.task),
            "sparsity": 0.0, "params": {"prunable": prunable, "total": total}, "metrics": result["best"],
            "finetune": {"steps": f.max_steps, "seconds": round(result["seconds"], 1)}})
        metrics = {k: v for k, v in result["best"].items() if k != "step"}
        log(f"[finetune] best dev {task.metric} {metrics['metric']:.4f}; saved {teacher_dir}")
    data_id = f"{task.fingerprint}|{_tokenizer_id(tokenizer)}|{cfg.task.max_length}"
    data_key = hashlib.sha256(data_id.encode()).hexdigest()[:24]
    importance, teacher_fp = None, ""
    if sharded:  # dev metric and importance on a worker group that reads the teacher shard by shard

        t0 = time.perf_counter()
        teacher_fp = files_fingerprint(teacher_dir, cache=out / "teacher_files.json")
        log(f"[teacher] fingerprint of the files of {teacher_dir} ({time.perf_counter() - t0:.1f}s)")
        metrics, importance = sharded_teacher_pass(cfg, str(Path(teacher_dir).resolve()), task.kind, teacher_fp,
                                                   data_key, tokenizer, dev, importance_sample(train, cfg),
                                                   task.metric, out, log)
    elif not fine_tune:
        metrics = evaluate(model, dev_loader, task.metric)
        log(f"[teacher] dev {task.metric} {metrics['metric']:.4f}")
    prunable, total = count_params(model)
    return Prepared(cfg, task, tokenizer, model.eval(), train, dev, str(teacher_dir), metrics, prunable, total,
                    data_key, importance, teacher_fp)


def importance_sample(train: datasets.Dataset, cfg: Config, samples: int | None = None) -> datasets.Dataset:
    """The seeded sample of the training split the teacher's importance is measured on."""
    n = samples or cfg.pruning.importance_samples
    return train.shuffle(seed=cfg.seed).select(range(min(n, len(train))))


def importance_of(prep: Prepared, samples: int | None = None) -> Importance:
    """Head and neuron importance of the teacher over a seeded sample of the training split."""
    if prep.importance is not None and samples in (None, prep.cfg.pruning.importance_samples):
        return prep.importance  # measured on the workers (a sharded teacher)
    if prep.teacher_on_meta:
        raise ValueError("importance_of: the teacher is on the meta device; pass its measured importance")
    n = samples or prep.cfg.pruning.importance_samples
    sample = importance_sample(prep.train, prep.cfg, n)
    loader = make_loader(sample, prep.tokenizer, prep.cfg.pruning.batch_size)
    t0 = time.perf_counter()
    method = prep.cfg.pruning.importance
    imp = compute_importance(prep.teacher, loader, n, method=method)
    log(f"[importance] {method}: {imp.samples} samples ({time.perf_counter() - t0:.1f}s)")
    return imp
