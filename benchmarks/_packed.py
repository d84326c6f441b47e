"""Tokenised rows and models packed for a machine without ``datasets``, ``ray`` or a model hub (the lent GPU
machine: Python, torch, transformers and pyarrow only, and at most 64 MiB carried to it).

Rows are one safetensors file per split (``input_ids``, ``attention_mask``, ``token_type_ids`` where the tokenizer
makes them, ``labels``; right-padded to the longest row, int32), read back into batches trimmed to their own longest
row, as :func:`minidisc_ray.data.make_loader` pads them. A model is its ``config.json`` and its weights in bf16
(``model.safetensors``): half the bytes, and a teacher is fine-tuned from them in fp32 as from any checkpoint.
Packing runs here (it reads the task with :mod:`minidisc_ray.data`); reading needs only torch and safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def pack_rows(rows: Any, path: Path, pad_id: int = 0) -> Path:
    """Write tokenised rows (a ``datasets.Dataset`` or a list of dicts of int lists) to ``path`` as padded tensors."""
    items = [dict(r) for r in rows]
    width = max(len(r["input_ids"]) for r in items)
    out: dict[str, torch.Tensor] = {}
    for col in COLUMNS:
        if col not in items[0]:
            continue
        if col == "labels" and not hasattr(items[0][col], "__len__"):
            if any(float(r[col]) != int(r[col]) for r in items):
                raise ValueError(f"{path}: labels that are not class ids (a regression task) are not packed")
            out[col] = torch.tensor([int(r[col]) for r in items], dtype=torch.int32)
            continue
        fill = pad_id if col == "input_ids" else 0
        t = torch.full((len(items), width), fill, dtype=torch.int32)
        for i, r in enumerate(items):
            v = torch.as_tensor(r[col], dtype=torch.int32)
            t[i, : len(v)] = v
        out[col] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


class Rows:
    """Packed rows in memory: ``len``, and batches of any index list trimmed to their longest row."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors
        self.n = int(tensors["input_ids"].shape[0])

    @classmethod
    def load(cls, path: Path) -> Rows:
        return cls(load_file(str(path)))

    def __len__(self) -> int:
        return self.n

    def select(self, index: list[int]) -> Rows:
        return Rows({k: v[index] for k, v in self.t.items()})

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        mask = self.t["attention_mask"][index]
        width = int(mask.sum(1).max())
        out = {k: v[index][:, :width].long() if v.dim() == 2 else v[index].long() for k, v in self.t.items()}
        return out

    def batches(self, size: int, shuffle: bool = False, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """One pass, in order (evaluation) or shuffled by ``seed``."""
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(self.n)).tolist()
        return [self.batch(order[i:i + size]) for i in range(0, self.n, size)]

    def forever(self, size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled passes without end (a new order each pass), as :func:`minidisc_ray.data.infinite` gives."""
        epoch = 0
        while True:
            yield from self.batches(size, shuffle=True, seed=seed + epoch)
            epoch += 1


def pack_model(model: nn.Module, directory: Path) -> Path:
    """``config.json`` and bf16 weights of ``model`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(directory / "config.json"))  # type: ignore[union-attr, operator]
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}
    save_file(state, str(directory / "model.safetensors"))
    return directory


def load_packed_model(directory: Path, num_labels: int | None = None) -> nn.Module:
    """The model :func:`pack_model` wrote, in fp32 (a classifier with a fresh head where ``num_labels`` differs)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(directory))
    if num_labels is not None:
        config.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(config)
    state = {k: v.float() for k, v in load_file(str(directory / "model.safetensors")).items()}
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    head = ("classifier.", "score.")  # a head of another label count starts fresh; every other weight must load
    missing = [k for k in own if k not in fits and not k.startswith(head) and k in dict(model.named_parameters())]
    if missing:
        raise ValueError(f"{directory}: the pack does not hold {len(missing)} weights this model needs (first: "
                         f"{missing[0]}); pack it again with this transformers")
    model.load_state_dict(fits, strict=False)
    return model


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def read_meta(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "meta.json").read_text()))
