"""The job's front half as plain functions: config -> task data -> teacher (fine-tuned) -> importance.

Every command of the CLI and both Ray drivers start from :func:`prepare`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from minidisc_ray.config import Config, TaskConfig
from minidisc_ray.data import TaskData, carve_validation, infinite, load_task, make_loader, tokenize_task
from minidisc_ray.data_cache import TokenizedSplits, tokenizer_id
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import count_params, get_adaptor
from minidisc_ray.logs import log
from minidisc_ray.modelio.fingerprint import files_fingerprint
from minidisc_ray.modelio.load import LoadedModel, load_model_dir, save_model_dir
from minidisc_ray.modelio.locate import check_max_length, config_of, read_record, resolve_model
from minidisc_ray.modelio.sharded import load_model_meta
from minidisc_ray.outputs import check_run_output, claim_run_dir, refuse_overlap
from minidisc_ray.pruning import Importance, compute_importance
from minidisc_ray.teacher_pass import sharded_teacher_pass
from minidisc_ray.training import evaluate, finetune

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel


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
    # the task's dev rows, kept back from every choice and read only to report the chosen models (None when
    # task.validation_fraction is 0: ``dev`` then both selects and reports); ``dev`` is then the validation split
    # carved from the training rows (:func:`minidisc_ray.data.carve_validation`)
    held_out: datasets.Dataset | None = None
    teacher_held_out: dict[str, float] | None = None  # the teacher's metrics on ``held_out`` (None: not measured)

    @property
    def teacher_on_meta(self) -> bool:
        """Whether the driver holds only the teacher's shapes (``teacher.placement: sharded``)."""
        return any(p.is_meta for p in self.teacher.parameters())

    def dev_loader(self, batch_size: int = 64) -> DataLoader:
        return make_loader(self.dev, self.tokenizer, batch_size)

    def held_out_metrics(self, model: nn.Module) -> dict[str, float] | None:
        """``model``'s metrics on the held-out dev rows (None when the dev rows select too)."""
        if self.held_out is None:
            return None
        return evaluate(model, make_loader(self.held_out, self.tokenizer, 64), self.task.metric)

    def train_iter(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
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
    config = config_of(model)
    current = dict(getattr(config, "id2label", None) or {})
    defaults = {i: f"LABEL_{i}" for i in range(task.num_labels)}
    if current and {int(k): v for k, v in current.items()} != defaults and len(current) == task.num_labels:
        return
    names = task.label_names or [str(i) for i in range(task.num_labels)]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def _finetune_key(cfg: Config, task: TaskData) -> str:
    carve = [cfg.task.validation_fraction] if cfg.task.validation_fraction > 0 else []  # early stopping's rows
    blob = json.dumps([task.fingerprint, cfg.teacher.model, dataclasses.asdict(cfg.finetune), cfg.seed,
                       cfg.task.max_length, *carve])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedTeacher:
    """The teacher as the job first loads it (on the meta device under ``teacher.placement: sharded``), where its
    files are, and whether it is to be fine-tuned."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    head_missing: bool  # the checkpoint has no trained classification head
    directory: Path
    mode: str  # teacher.finetune as it applies: never once an earlier fine-tune in OUTPUT/teacher is reused
    finetune_key: str
    previous_key: str | None  # the key OUTPUT/teacher was fine-tuned under, if it holds a teacher

    @property
    def fine_tune(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and self.head_missing)


@dataclass(frozen=True)
class FineTuned:
    """The fine-tuned teacher's directory (``OUTPUT/teacher``) and its best dev metrics."""

    directory: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class TeacherMeasure:
    """The teacher's dev metrics, and for a sharded teacher its importance and files' fingerprint."""

    metrics: dict[str, float]
    importance: Importance | None = None
    fingerprint: str = ""


def prepare(cfg: Config, output_dir: str | Path, finetune_mode: str | None = None,
            on_inputs_checked: Callable[[], None] | None = None) -> Prepared:
    """Load the task and the teacher; fine-tune the teacher first when it is only pretrained.

    ``on_inputs_checked`` runs once data and teacher have loaded and tokenised without a problem and
    before any training or writing (the drivers start Ray and check resources there), so bad input
    costs seconds and leaves nothing on disk. The output directory is claimed right after it.

    A fine-tuned teacher is saved to ``OUTPUT/teacher`` and reused by later commands with the same
    data, teacher and fine-tuning settings.
    """
    out = _checked_output(cfg, output_dir)
    t0 = time.perf_counter()
    task = load_task(cfg.task, cfg.seed)
    what = "language modelling" if task.is_lm else f"{task.num_labels} labels"
    log(f"[data] {task.source}: {len(task.train)} train / {len(task.dev)} dev rows, {what}, "
        f"metric {task.metric} ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(cfg.seed)
    teacher = _load_teacher(cfg, task, out, finetune_mode or cfg.teacher.finetune)
    _check_teacher(cfg, task, teacher)
    splits = _tokenise(cfg, task, teacher)
    carved = carve_validation(splits.train, splits.dev, cfg.task.validation_fraction, cfg.seed)
    if carved.held_out is not None:
        log(f"[data] {len(carved.valid)} of the training rows (seed {cfg.seed}) select and stop early; the "
            f"{len(carved.held_out)} dev rows only report the chosen models")
        if not teacher.fine_tune:
            log("[data] the teacher was fine-tuned elsewhere: if it trained on these validation rows, its validation "
                "metric (the tradeoff's scale) is optimistic; its held-out dev metric is not")
    splits = TokenizedSplits(carved.train, carved.valid, splits.from_cache)
    if on_inputs_checked is not None:
        on_inputs_checked()
    claim_run_dir(out)
    dev_loader = make_loader(splits.dev, teacher.tokenizer, 64)
    finetuned = _finetune_teacher(cfg, task, teacher, out, splits.train, dev_loader) if teacher.fine_tune else None
    teacher_dir = finetuned.directory if finetuned is not None else teacher.directory
    data_id = f"{task.fingerprint}|{tokenizer_id(teacher.tokenizer)}|{cfg.task.max_length}"
    data_id += f"|{carved.ident}" if carved.ident else ""
    data_key = hashlib.sha256(data_id.encode()).hexdigest()[:24]
    if cfg.teacher.placement == "sharded":  # dev metric and importance on a worker group that reads it by shards
        measured = _sharded_teacher_pass(cfg, task, teacher, teacher_dir, out, data_key, splits)
    elif finetuned is not None:
        measured = TeacherMeasure(finetuned.metrics)
    else:
        measured = TeacherMeasure(evaluate(teacher.model, dev_loader, task.metric))
        log(f"[teacher] {'validation' if carved.held_out is not None else 'dev'} {task.metric} "
            f"{measured.metrics['metric']:.4f}")
    prunable, total = count_params(teacher.model)
    prep = Prepared(cfg, task, teacher.tokenizer, teacher.model.eval(), splits.train, splits.dev, str(teacher_dir),
                    measured.metrics, prunable, total, data_key, measured.importance, measured.fingerprint,
                    carved.held_out)
    held = None if prep.teacher_on_meta else prep.held_out_metrics(prep.teacher)  # a sharded teacher's: not measured
    if held is not None:
        prep.teacher_held_out = held
        log(f"[teacher] held-out dev {task.metric} {held['metric']:.4f}")
    return prep


def _checked_output(cfg: Config, output_dir: str | Path) -> Path:
    """The run directory, checked (nothing claimed yet) and refused when it overlaps the task data or the
    teacher (the run's own ``OUTPUT/teacher`` excepted)."""
    out = check_run_output(output_dir)
    teacher_path = Path(os.path.expanduser(cfg.teacher.model))
    own_teacher = teacher_path.exists() and teacher_path.resolve() == (out / "teacher").resolve()
    refuse_overlap(out, {"task.data": cfg.task.data if not cfg.task.data.startswith("package://") else None,
                         "teacher.model": None if own_teacher else cfg.teacher.model})
    return out


def _load_teacher(cfg: Config, task: TaskData, out: Path, mode: str) -> LoadedTeacher:
    """The teacher fine-tuned earlier into ``OUTPUT/teacher`` with the same data and settings, else
    ``teacher.model``; only its shapes under ``teacher.placement: sharded``."""
    teacher_dir = out / "teacher"
    key = _finetune_key(cfg, task)
    previous_key = read_record(teacher_dir, "--output").get("finetune_key") if teacher_dir.is_dir() else None
    sharded = cfg.teacher.placement == "sharded"  # the driver holds the teacher's shapes only

    def load(spec: str) -> LoadedModel:
        if sharded:
            return load_model_meta(spec, task.num_labels, kind=task.kind)
        return load_model_dir(spec, task.num_labels, cfg.teacher.trust_remote_code, kind=task.kind)

    if mode != "never" and previous_key == key:
        log(f"[teacher] reusing the fine-tuned teacher in {teacher_dir}")
        loaded = load(str(teacher_dir))
        mode = "never"
    else:
        loaded = load(cfg.teacher.model)
        teacher_dir = Path(resolve_model(cfg.teacher.model))  # aliases (minilm, smollm2): where the files are
    return LoadedTeacher(loaded.model, loaded.tokenizer, loaded.head_missing, teacher_dir, mode, key, previous_key)


def _check_teacher(cfg: Config, task: TaskData, teacher: LoadedTeacher) -> None:
    """Refuse a teacher the job cannot use (a sharded one to fine-tune, another label count, positions fewer than
    ``task.max_length``) and name its classes after the data's."""
    if cfg.teacher.placement == "sharded" and teacher.fine_tune:
        raise UserInputError("teacher.finetune", teacher.mode, "a teacher.placement: sharded teacher is not "
                             "fine-tuned by minidisc-ray (that would load it whole); fine-tune it first (e.g. minidisc "
                             "finetune with teacher.placement: replicated) and pass it with teacher.finetune: never")
    model = teacher.model
    get_adaptor(model)
    if not task.is_lm and model.config.num_labels != task.num_labels:
        raise UserInputError("teacher.model", cfg.teacher.model,
                             f"the teacher has {model.config.num_labels} labels but the data has "
                             f"{task.num_labels}; use a teacher for this task or teacher.finetune=always")
    check_max_length(model, cfg.task.max_length)
    set_label_names(model, task)


def _tokenise(cfg: Config, task: TaskData, teacher: LoadedTeacher) -> TokenizedSplits:
    """The task's splits tokenised by the teacher's tokenizer; a teacher left untrained with no head is refused."""
    splits = tokenize_task(task, teacher.tokenizer, cfg.task.max_length)
    log(f"[data] tokenised (max_length {cfg.task.max_length}){' from the Arrow cache' if splits.from_cache else ''}")
    if teacher.mode == "never" and teacher.head_missing:
        raise UserInputError("teacher.finetune", "never", "the teacher has no trained classification head; "
                             "use teacher.finetune=auto")
    return splits


def _finetune_teacher(cfg: Config, task: TaskData, teacher: LoadedTeacher, out: Path, train: datasets.Dataset,
                      dev_loader: DataLoader) -> FineTuned:
    """Fine-tune the teacher on the task and save it (with its record) to ``OUTPUT/teacher``."""
    f = cfg.finetune
    if teacher.previous_key is not None and teacher.previous_key != teacher.finetune_key:
        log(f"[teacher] {out / 'teacher'} was fine-tuned with other data or settings; it is replaced when this "
            "fine-tune finishes (to keep it: --set teacher.model=DIR --set teacher.finetune=never)")
    log(f"[finetune] {cfg.teacher.model} on {task.source}: {f.max_steps} steps, batch {f.batch_size}, lr {f.lr}")
    train_iter = infinite(make_loader(train, teacher.tokenizer, f.batch_size, shuffle=True, seed=cfg.seed))
    result = finetune(teacher.model, train_iter, dev_loader, task.metric, f.max_steps, f.lr, f.warmup_ratio,
                      f.weight_decay, f.eval_every, log)
    prunable, total = count_params(teacher.model)
    teacher_dir = out / "teacher"
    save_model_dir(teacher.model, teacher.tokenizer, teacher_dir, record={
        "role": "teacher", "source": cfg.teacher.model, "finetune_key": teacher.finetune_key,
        "task": task_record(task, cfg.task), "sparsity": 0.0, "params": {"prunable": prunable, "total": total},
        "metrics": result["best"], "finetune": {"steps": f.max_steps, "seconds": round(result["seconds"], 1)}})
    metrics = {k: v for k, v in result["best"].items() if k != "step"}
    log(f"[finetune] best dev {task.metric} {metrics['metric']:.4f}; saved {teacher_dir}")
    return FineTuned(teacher_dir, metrics)


def _sharded_teacher_pass(cfg: Config, task: TaskData, teacher: LoadedTeacher, teacher_dir: Path, out: Path,
                          data_key: str, splits: TokenizedSplits) -> TeacherMeasure:
    """A sharded teacher's dev metric and importance, measured by a worker group reading its files shard by shard
    (:mod:`minidisc_ray.teacher_pass`), and the fingerprint of those files."""
    t0 = time.perf_counter()
    teacher_fp = files_fingerprint(teacher_dir, cache=out / "teacher_files.json")
    log(f"[teacher] fingerprint of the files of {teacher_dir} ({time.perf_counter() - t0:.1f}s)")
    metrics, importance = sharded_teacher_pass(
        cfg, teacher_dir=str(Path(teacher_dir).resolve()), kind=task.kind, teacher_fp=teacher_fp, data_key=data_key,
        tokenizer=teacher.tokenizer, dev=splits.dev, sample=importance_sample(splits.train, cfg), metric=task.metric,
        output_dir=out, log=log)
    return TeacherMeasure(metrics, importance, teacher_fp)


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
