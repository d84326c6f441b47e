"""A stored model read shard by shard (``teacher.placement: sharded``): its shapes from the safetensors headers,
each rank's rows of each tensor (cut to a pruning plan on the way), never the whole model in one process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
)

from minidisc_ray.errors import UserInputError
from minidisc_ray.families import Origin, get_adaptor, sources
from minidisc_ray.modelio.load import LoadedModel
from minidisc_ray.modelio.locate import (
    PLAN,
    check_architecture,
    read_record,
    resolve_model,
)
from minidisc_ray.modelio.weights import empty_model, set_pad_token
from minidisc_ray.pruning import PruningPlan, prune_model

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel


def load_frozen_sharded(directory: str | os.PathLike[str], kind: str, device: torch.device,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen model (teacher, or the assistant that teaches the next link) sharded with FSDP2 over the
    initialised process group, each rank reading only its own rows of every weight from the directory's
    safetensors: no process ever holds the whole model (``teacher.placement: sharded``). See
    :func:`load_sharded`."""
    return load_sharded(directory, kind, device, dtype)


def check_shardable(directory: str | os.PathLike[str], field: str = "teacher.placement") -> Path:
    """``directory`` if it is a model directory that can be read shard by shard (config.json and safetensors),
    else the one-line :class:`UserInputError` that says to use ``replicated``."""
    path = Path(directory)
    if not path.is_dir() or not sorted(path.glob("*.safetensors")) or not (path / "config.json").is_file():
        raise UserInputError(field, "sharded", f"{path} is not a model directory with safetensors weights (a GGUF "
                             "file or hub id cannot be read shard by shard); use replicated")
    return path


def stored_architecture(directory: str | os.PathLike[str], kind: str,
                        config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model stored in ``directory`` (a pruned one from its ``pruning_plan.json``) on the meta device:
    shapes, no weights, nothing read but config and plan."""
    path = Path(directory)
    stored = json.loads((path / PLAN).read_text()) if (path / PLAN).is_file() else None
    return empty_model(config if config is not None else AutoConfig.from_pretrained(str(path)),
                       stored["heads_per_layer"] if stored else None, stored["neurons_per_layer"] if stored else None,
                       kind=kind, hidden=stored.get("hidden_size") if stored else None)


def _stored_tensors(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every weight in ``path``'s safetensors: the file that holds it and its shape (headers only)."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[key] = (f, tuple(handle.get_slice(key).get_shape()))
    return found


def _file_names(model: nn.Module) -> dict[int, list[str]]:
    """Each parameter's names as a checkpoint may store them: every name it has (tied weights have several),
    each also without the base model's prefix (a backbone saved alone, e.g. ``BertModel``, stores
    ``embeddings...`` where the task model has ``bert.embeddings...``)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for found in names.values():
        found.extend([n[len(prefix):] for n in found if prefix != "." and n.startswith(prefix)])
    return names


def load_model_meta(spec: str, num_labels: int | None = None, field: str = "teacher.model",
                    kind: str = "classification") -> LoadedModel:
    """:func:`load_model_dir`'s answer without the weights: the model on the meta device, its tokenizer, record
    and whether the classification head is missing from the files, which are checked against the architecture
    (names and shapes, from the safetensors headers). What the driver holds of a ``teacher.placement: sharded``
    teacher: no process loads it whole."""
    where = resolve_model(spec, field)
    path = check_shardable(where)
    record = read_record(path, field)
    config = AutoConfig.from_pretrained(str(path))
    check_architecture(config, field, spec)
    if num_labels is not None and kind != "lm":
        known = record.get("task", {}).get("num_labels")
        if known is not None and known != num_labels:
            raise UserInputError(field, spec, f"the teacher was trained with {known} labels but the data has "
                                 f"{num_labels}; use a teacher fine-tuned on this task")
        config.num_labels = num_labels
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = stored_architecture(path, kind, config)
    head_missing = _check_stored_weights(model, path, spec, field)
    model.config.architectures = [type(model).__name__]
    set_pad_token(model, tokenizer)
    return LoadedModel(model.eval(), tokenizer, record, head_missing)


def _check_stored_weights(model: nn.Module, path: Path, spec: str, field: str) -> bool:
    """Whether the classification head is missing from ``path``'s files; any other weight of ``model`` missing, or
    stored in another shape, is refused."""
    shapes = {name: shape for name, (_, shape) in _stored_tensors(path).items()}
    names = _file_names(model)
    head_missing = False
    for name, param in model.named_parameters():
        stored = next((n for n in names[id(param)] if n in shapes), None)
        if stored is None:
            if "classifier" in name or "score" in name:
                head_missing = True
                continue
            raise UserInputError(field, spec, f"{path} has no weight {name}; save the model with minidisc-ray or "
                                 "transformers' save_pretrained")
        if shapes[stored] != tuple(param.shape):
            raise UserInputError(field, spec, f"{stored} is {list(shapes[stored])} in the files but "
                                 f"{list(param.shape)} in the architecture (a head for another label count?); use "
                                 "a teacher fine-tuned on this task")
    return head_missing


def load_sharded(directory: str | os.PathLike[str], kind: str, device: torch.device,
                 dtype: torch.dtype | None = None, *, plan: PruningPlan | None = None, trainable: bool = False,
                 mp_policy: MixedPrecisionPolicy | None = None, shard: bool = True,
                 freeze_unpruned: bool = False) -> nn.Module:
    """The model in ``directory``, or the candidate ``plan`` cuts from it, sharded with FSDP2 over the
    initialised process group, each rank reading only its own rows of every weight from the directory's
    safetensors: no process ever holds the whole model or the whole candidate.

    The architecture is built on the meta device (:func:`empty_model`, a pruned one from its
    ``pruning_plan.json``); with ``plan`` it is then pruned on the meta device while
    :class:`~minidisc_ray.families.sources` records which rows or columns of which stored weight each
    candidate tensor keeps. Every layer and the root are ``fully_shard``-ed (a frozen model with
    ``reshard_after_forward``: a forward gathers one layer at a time and frees it again; a trainable one
    with ``mp_policy``, as :class:`minidisc_ray.chain.placement.ModelPlacement` shards a student), the shards are
    materialised on ``device`` and filled from the files (FSDP2 shards dim 0 in ``torch.chunk`` order: rank r
    holds rows ``[r * ceil(n / world), ...)``; a kept-rows tensor reads the span of teacher rows its shard's
    indices cover, a kept-columns one its own rows with every column, one tensor at a time). Zero-size
    weights (fully pruned blocks) stay plain tensors. The candidate equals
    :func:`~minidisc_ray.pruning.prune_model` of the whole model (test: ``test_chain_ray``).

    ``shard=False`` builds it whole on ``device`` instead (no process group needed): a candidate cut from
    the files, its process reading only the rows and columns it keeps, never the whole model.
    ``freeze_unpruned`` leaves the weights ``plan`` does not cut (embeddings, norms, the head) frozen, as
    :func:`~minidisc_ray.pruning.prune_model` of a frozen teacher leaves them (a search trial's recovery)."""
    path = check_shardable(directory)
    model: nn.Module = stored_architecture(path, kind)
    names = _file_names(model)  # the stored model's tensor -> the names the files may hold it under
    origin: dict[int, Origin] = {}
    if plan is not None:
        if freeze_unpruned:  # prune_model's clones keep the source's flag, the layers it cuts are trainable
            model.requires_grad_(False)
        with sources() as origin:
            model = prune_model(model, plan)
    if not (plan is not None and freeze_unpruned):
        model.requires_grad_(trainable)
    if dtype is not None:  # the weights only (bf16 shards on a GPU); buffers such as rotary frequencies keep theirs
        for param in model.parameters():
            param.data = param.data.to(dtype)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # where each parameter's values are: the stored tensor's names, and the rows or columns it keeps of it
    wanted: dict[str, _Stored] = {}
    for name, param in model.named_parameters():
        _, source, rows, cols = origin.get(id(param), (param, param, None, None))
        wanted[name] = _Stored(names.get(id(source), [name]), rows, cols)
    if shard:
        _fully_shard(model, trainable, mp_policy)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():  # to_empty left them uninitialised
            buf.copy_(buffers[name])
        _fill_from_files(model, path, wanted, shard)
    return model.train() if trainable else model.eval()


@dataclass(frozen=True)
class _Stored:
    """Where a parameter's values are stored: the names the files may hold the tensor under, and the rows and
    columns it keeps of it (``None``: all)."""

    names: list[str]
    rows: torch.Tensor | None
    cols: torch.Tensor | None


def _fully_shard(model: nn.Module, trainable: bool, mp_policy: MixedPrecisionPolicy | None) -> None:
    """FSDP2 over every layer and the root; a frozen model resharded after each forward, zero-size weights (fully
    pruned blocks) left as plain tensors."""
    empty = {p for p in model.parameters() if p.numel() == 0}
    extra: dict[str, Any] = {} if trainable else {"reshard_after_forward": True}
    if mp_policy is not None:
        extra["mp_policy"] = mp_policy
    for layer in get_adaptor(model).layers(model):
        fully_shard(layer, ignored_params=empty, **extra)
    fully_shard(model, ignored_params=empty, **extra)


def _fill_from_files(model: nn.Module, path: Path, wanted: dict[str, _Stored], shard: bool) -> None:
    """Copy into each parameter (this rank's shard of it under FSDP) its values from ``path``'s safetensors."""
    where = {name: f for name, (f, _) in _stored_tensors(path).items()}
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    for name, param in model.named_parameters():
        stored = wanted[name]
        key = next((n for n in stored.names if n in where), None)
        if key is None:
            raise UserInputError("teacher.placement", "sharded", f"{path} has no weight {stored.names[0]}; save "
                                 "the model with minidisc-ray or transformers' save_pretrained, or use replicated")
        local = param.to_local() if isinstance(param, DTensor) else param
        if not local.numel():
            continue
        start = rank * -(-param.shape[0] // world) if isinstance(param, DTensor) else 0
        stop = start + local.shape[0]
        local.copy_(_read_rows(where[key], key, stored, start, stop).to(local.dtype))


def _read_rows(file: Path, key: str, stored: _Stored, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the tensor a parameter keeps of stored tensor ``key``, read from ``file`` alone."""
    with safe_open(str(file), framework="pt") as handle:
        rows = handle.get_slice(key)
        if stored.rows is not None:  # kept rows: the span of stored rows the shard's indices cover
            mine = stored.rows[start:stop]
            lo, hi = int(mine.min()), int(mine.max()) + 1
            out = rows[lo:hi].index_select(0, mine - lo)
        else:
            out = rows[start:stop]
        return out if stored.cols is None else out.index_select(1, stored.cols)  # kept columns of those rows
