"""Reading task data into raw train and dev splits: local files and directories through ``datasets``' builders
(a single file split with a seed), and GLUE tasks from the Hugging Face hub, with the identity of what was read."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from minidisc_ray.config import TaskConfig
from minidisc_ray.data_paths import FILE_BUILDERS, file_id, resolve_data_path
from minidisc_ray.errors import UserInputError


@dataclass(frozen=True)
class GlueTask:
    """Columns, label count and selection metric of one GLUE task."""

    text_columns: tuple[str, ...]
    num_labels: int
    metric: str
    dev_split: str = "validation"
    label_names: tuple[str, ...] = ()  # what the class ids 0..K-1 mean (GLUE's own names)


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(("sentence",), 2, "accuracy", label_names=("negative", "positive")),
    "cola": GlueTask(("sentence",), 2, "matthews_correlation", label_names=("unacceptable", "acceptable")),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, "f1", label_names=("not_equivalent", "equivalent")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, "pearson_spearman"),
    "qqp": GlueTask(("question1", "question2"), 2, "f1", label_names=("not_duplicate", "duplicate")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, "accuracy", "validation_matched",
                     ("entailment", "neutral", "contradiction")),
    "qnli": GlueTask(("question", "sentence"), 2, "accuracy", label_names=("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, "accuracy", label_names=("entailment", "not_entailment")),
}

# Directory names of the GLUE distribution (e.g. ../shared/data/glue/SST-2) -> task names.
_GLUE_DIR_NAMES = {"sst-2": "sst2", "cola": "cola", "mrpc": "mrpc", "sts-b": "stsb", "qqp": "qqp",
                   "mnli": "mnli", "qnli": "qnli", "rte": "rte"}


@dataclass(frozen=True)
class RawSplits:
    """Train and dev splits as read (nothing filtered or encoded yet) and the identity of their source."""

    train: datasets.Dataset
    dev: datasets.Dataset
    ident: str  # the files' content digests (and the seeded split), or the hub name
    glue: GlueTask | None = None  # the GLUE task the source is, when it is one


def _read_file(path: Path, encoding: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserInputError("task.data", str(path), f"use a file ending in {', '.join(sorted(FILE_BUILDERS))}")
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs["encoding"] = encoding
        if path.suffix.lower() == ".tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the csv builder logs its own traceback before raising: one line is ours
    try:
        # datasets' own cache knows a file by path, size and mtime: a file edited in place with both kept
        # would come back stale, so the file is always parsed again (our tokenised cache is keyed by content)
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", download_mode="force_redownload",
                                   **kwargs)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a user file problem
        text = f"{exc} {exc.__cause__ or ''} {exc.__context__ or ''}"
        if isinstance(exc, UnicodeDecodeError) or "codec can't decode" in text or "UnicodeDecodeError" in text:
            raise UserInputError("task.encoding", encoding, f"{path.name} is not {encoding} text; set "
                                 "--set task.encoding=latin-1 (or the file's real encoding)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError("task.data", str(path), f"the file could not be parsed ({first[:160]}); check its "
                             "format, or task.encoding if it is not utf-8") from None
    finally:
        quiet.setLevel(level)
    return ds


def _split_files(directory: Path) -> tuple[Path, Path]:
    for ext in (".tsv", ".csv", ".parquet", ".jsonl", ".json"):
        train = directory / f"train{ext}"
        for dev_name in ("dev", "validation", "dev_matched"):
            dev = directory / f"{dev_name}{ext}"
            if train.is_file() and dev.is_file():
                return train, dev
    raise UserInputError("task.data", str(directory),
                         "a data directory needs train.tsv and dev.tsv (or train/dev csv, json, parquet)")


def _glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise UserInputError("task.data", name, f"unknown GLUE task; use one of {', '.join(GLUE_TASKS)}, "
                             "a local directory or a file")
    return GLUE_TASKS[name]


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the Hugging Face hub (honours HF_HUB_OFFLINE and HF_ENDPOINT)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub(data: str) -> RawSplits:
    """A GLUE task's train and dev splits from the hub (``glue/sst2`` or ``sst2``)."""
    name = data.split("/", 1)[1] if data.lower().startswith("glue/") else data
    name = name.lower().replace("-", "")
    glue = _glue_task(name)
    unreachable = UserInputError("task.data", data, "the dataset hub is unreachable; download the GLUE data and "
                                 "pass --set task.data=DIR (a directory with train.tsv and dev.tsv)")
    if not hub_reachable():
        raise unreachable
    try:
        dsd = datasets.load_dataset("nyu-mll/glue", name)
    except Exception:  # noqa: BLE001 - offline, blocked, or hub error: all mean "not reachable"
        raise unreachable from None
    return RawSplits(dsd["train"], dsd[glue.dev_split], f"hub:{data}", glue)


def read_local(path: Path, cfg: TaskConfig, seed: int) -> RawSplits:
    """Train and dev splits of a local directory (train/dev files) or file (a seeded split), and their identity."""
    if path.is_dir():
        train_file, dev_file = _split_files(path)
        train, dev = _read_file(train_file, cfg.encoding), _read_file(dev_file, cfg.encoding)
        return RawSplits(train, dev, f"{file_id(train_file)}|{file_id(dev_file)}")
    full = _read_file(path, cfg.encoding)
    if len(full) < 2:
        raise UserInputError("task.data", str(path), "the file needs at least two rows")
    parts = full.train_test_split(test_size=cfg.dev_fraction, seed=seed)
    return RawSplits(parts["train"], parts["test"], f"{file_id(path)}|split={cfg.dev_fraction}:{seed}")


def read_task_splits(cfg: TaskConfig, seed: int) -> RawSplits:
    """The splits of a classification task: from the hub for a GLUE name, else the local source (a directory
    named as in the GLUE distribution, e.g. ``SST-2``, is that GLUE task)."""
    path = resolve_data_path(cfg.data)
    if path is None:
        return load_hub(cfg.data)
    raw = read_local(path, cfg, seed)
    if path.is_dir():
        return dataclasses.replace(raw, glue=GLUE_TASKS.get(_GLUE_DIR_NAMES.get(path.name.lower(), "")))
    return raw
