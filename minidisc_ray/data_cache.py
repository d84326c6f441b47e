"""The cache of tokenised splits: Arrow directories under ``$MINIDISC_CACHE`` (default ``~/.cache/minidisc_ray``),
one per task data, tokenizer and length, written whole or not at all, so a second run does not tokenise again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from transformers import PreTrainedTokenizerBase

from minidisc_ray.errors import UserInputError


class TokenizedSplits(NamedTuple):
    """Tokenised train and dev splits, and whether they came from the cache."""

    train: datasets.Dataset
    dev: datasets.Dataset
    from_cache: bool


def cache_root() -> Path:
    """``$MINIDISC_CACHE`` (default ``~/.cache/minidisc_ray``); a file or an unwritable place is refused."""
    raw = os.environ.get("MINIDISC_CACHE")
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "minidisc_ray"
    for p in (root, *root.absolute().parents):
        if p.exists() and not p.is_dir():
            raise UserInputError("MINIDISC_CACHE", str(root), f"{p} is a file; point MINIDISC_CACHE at a directory")
    return root


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """What names a tokenizer in the caches: its class, vocabulary size and a digest of its vocabulary."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())[:5000]).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}"


def cache_entry(ident: str) -> Path:
    """The cache directory of the tokenised splits ``ident`` names (data, tokenizer, length, kind)."""
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_root() / "tokenized" / key


def read_entry(target: Path) -> TokenizedSplits | None:
    """The splits a finished cache entry holds, or None when there is none (or it was never finished)."""
    if not (target / "done").is_file():
        return None
    return TokenizedSplits(datasets.load_from_disk(str(target / "train")),
                           datasets.load_from_disk(str(target / "dev")), True)


def write_entry(target: Path, train: datasets.Dataset, dev: datasets.Dataset,
                description: dict[str, Any]) -> TokenizedSplits:
    """Write both splits to ``target`` through a temporary sibling renamed into place, and read them back.

    An unfinished entry of ours (only ``train``, ``dev``, ``done`` inside) is replaced; a directory holding
    anything else is refused, nothing deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    train.save_to_disk(str(tmp / "train"))
    dev.save_to_disk(str(tmp / "dev"))
    (tmp / "done").write_text(json.dumps(description))
    if target.exists():  # a cache entry of ours without its "done" mark (only train/dev/done inside)
        if not {p.name for p in target.iterdir()} <= {"train", "dev", "done"}:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserInputError("MINIDISC_CACHE", str(cache_root()), f"{target} holds files minidisc-ray did "
                                 "not write; point MINIDISC_CACHE at a directory of its own")
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return TokenizedSplits(datasets.load_from_disk(str(target / "train")).with_format("torch"),
                           datasets.load_from_disk(str(target / "dev")).with_format("torch"), False)
