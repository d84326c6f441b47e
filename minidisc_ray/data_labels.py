"""Columns and labels of classification data: which columns hold the texts and the label, and the labels
checked and encoded as ``labels`` (class ids 0..K-1, or floats for regression)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import datasets

from minidisc_ray.config import TaskConfig
from minidisc_ray.data_files import GlueTask
from minidisc_ray.errors import UserInputError
from minidisc_ray.logs import log

# Column pairs seen in GLUE TSV files, tried in order when the config names no text column.
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                 ("#1 String", "#2 String"), ("premise", "hypothesis"))
_SINGLE_COLUMNS = ("sentence", "text", "content", "review")
_LABEL_COLUMNS = ("label", "score", "is_duplicate", "Quality", "gold_label", "sentiment")


@dataclass(frozen=True)
class EncodedLabels:
    """Both splits with their labels as ``labels``, the number of classes (1: regression) and their names."""

    train: datasets.Dataset
    dev: datasets.Dataset
    num_labels: int
    label_names: list[str] | None  # the classes' names when the labels were strings


def pick_text_columns(cfg: TaskConfig, columns: list[str], glue: GlueTask | None) -> tuple[str, ...]:
    if cfg.text_column:
        wanted = (cfg.text_column,) + ((cfg.text_pair_column,) if cfg.text_pair_column else ())
        for name, col in zip(("task.text_column", "task.text_pair_column"), wanted, strict=False):
            if col not in columns:
                raise UserInputError(name, col, f"the data has columns {columns}; set --set {name}=COLUMN")
        return wanted
    if glue is not None and all(c in columns for c in glue.text_columns):
        return glue.text_columns
    for pair in _PAIR_COLUMNS:
        if all(c in columns for c in pair):
            return pair
    for single in _SINGLE_COLUMNS:
        if single in columns:
            return (single,)
    raise UserInputError("task.text_column", None, f"the data has columns {columns}; set --set task.text_column=COLUMN")


def pick_label_column(cfg: TaskConfig, columns: list[str]) -> str:
    if cfg.label_column in columns:
        return cfg.label_column
    if cfg.label_column == "label":  # the default: try the GLUE spellings
        for name in _LABEL_COLUMNS:
            if name in columns:
                return name
    raise UserInputError("task.label_column", cfg.label_column,
                         f"the data has columns {columns}; set --set task.label_column=COLUMN")


def encode_labels(train: datasets.Dataset, dev: datasets.Dataset, label_col: str, regression: bool,
                  source: str) -> EncodedLabels:
    """Rows without a label left out, the rest checked and encoded: floats (regression), string labels as ids of
    their sorted names, or integer class ids kept (they must be 0..K-1, each present in train)."""
    before = len(train), len(dev)
    train = train.filter(lambda r: r[label_col] is not None and r[label_col] != "")
    dev = dev.filter(lambda r: r[label_col] is not None and r[label_col] != "")
    dropped = before[0] - len(train), before[1] - len(dev)
    if any(dropped):
        log(f"[data] {dropped[0]} train and {dropped[1]} dev rows have no {label_col!r} label ({source}): left out")
    values = list(train[label_col])
    dev_values = list(dev[label_col])
    for split, vals in (("train", values), ("dev", dev_values)):
        _check_label_values(vals, label_col, split, source)
    kinds = {isinstance(v, str) for v in values + dev_values}
    if len(kinds) > 1:
        raise UserInputError("task.label_column", label_col, f"labels mix numbers and strings across train and dev "
                             f"({source}); use one kind in both splits")
    if regression:
        def to_float(r: dict[str, Any]) -> dict[str, Any]:
            return {"labels": float(r[label_col])}
        return EncodedLabels(train.map(to_float), dev.map(to_float), 1, None)
    if values and isinstance(values[0], str):
        return _encode_names(train, dev, label_col, values, source)
    return _encode_ids(train, dev, label_col, values, dev_values, source)


def _encode_names(train: datasets.Dataset, dev: datasets.Dataset, label_col: str, values: list[Any],
                  source: str) -> EncodedLabels:
    """String labels as the ids of their sorted names; a dev label train never has is refused."""
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(dev[label_col]) - set(names))
    if unknown:
        raise UserInputError("task.label_column", label_col,
                             f"dev labels {unknown[:5]} never occur in train ({source}); fix the data")

    def to_id(r: dict[str, Any]) -> dict[str, Any]:
        return {"labels": index[r[label_col]]}
    return EncodedLabels(train.map(to_id), dev.map(to_id), len(names), names)


def _encode_ids(train: datasets.Dataset, dev: datasets.Dataset, label_col: str, values: list[Any],
                dev_values: list[Any], source: str) -> EncodedLabels:
    """Numeric labels as class ids: whole numbers 0..K-1, each present in train, and no other id in dev."""
    if values and isinstance(values[0], float) and any(v != int(v) for v in values[:1000]):
        raise UserInputError("task.regression", False,
                             f"label column {label_col!r} holds real numbers; set --set task.regression=true")
    if dev_values and isinstance(dev_values[0], float) and any(v != int(v) for v in dev_values[:1000]):
        raise UserInputError("task.regression", False,
                             f"dev label column {label_col!r} holds real numbers; set --set task.regression=true")
    ints = [int(v) for v in values]
    ids = sorted(set(ints))
    if ids != list(range(len(ids))):
        raise UserInputError("task.label_column", label_col, f"class ids in train are {ids[:8]}, not 0..K-1 each "
                             "present; renumber them 0..K-1 or write the labels as strings")
    outside = sorted({int(v) for v in dev_values} - set(ids))
    if outside:
        raise UserInputError("task.label_column", label_col, f"dev class ids {outside[:5]} never occur in train "
                             f"({source}); fix the data")

    def to_int(r: dict[str, Any]) -> dict[str, Any]:
        return {"labels": int(r[label_col])}
    return EncodedLabels(train.map(to_int), dev.map(to_int), len(ids), None)


def _check_label_values(values: list[Any], label_col: str, split: str, source: str) -> None:
    """Refuse labels no task can use: lists, NaN (a row would silently drop out) and infinities."""
    for row, v in enumerate(values):
        if isinstance(v, (list, tuple, dict)):
            raise UserInputError("task.label_column", label_col, f"{split} row {row} holds a {type(v).__name__} "
                                 f"label ({source}); give one number or one string per row")
        if isinstance(v, float) and not math.isfinite(v):
            bad = sum(1 for x in values if isinstance(x, float) and not math.isfinite(x))
            raise UserInputError("task.label_column", label_col, f"{split} row {row} has label {v} ({bad} rows "
                                 f"not finite, {source}); fix or remove those rows")
