"""Model directories: :func:`load_model_dir` (the one loader: the architecture from ``config.json``, cut to
``pruning_plan.json``, weights from ``model.safetensors``) and :func:`save_model_dir`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from minidisc_ray.axes import hidden_width
from minidisc_ray.errors import UserInputError
from minidisc_ray.modelio.blobs import model_from_blob
from minidisc_ray.modelio.locate import (
    PLAN,
    RECORD,
    WEIGHTS,
    auto_class,
    check_architecture,
    config_of,
    read_record,
    resolve_model,
)
from minidisc_ray.modelio.weights import save_weights, set_pad_token
from minidisc_ray.outputs import check_model_output, writing_model_dir
from minidisc_ray.pruning import PruningPlan

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel


class LoadedModel(NamedTuple):
    """A loaded model, its tokenizer, its record (``minidisc.json``; empty when there is none) and whether the
    classification head was missing from the files (a pretrained-only backbone: the head is newly initialised)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    record: dict[str, Any]
    head_missing: bool


def load_model_dir(spec: str, num_labels: int | None = None, trust_remote_code: bool = False,
                   field: str = "teacher.model", kind: str = "classification") -> LoadedModel:
    """Load a model directory (pruned or not), a GGUF file or a hub id, as a ``kind`` model
    (``classification``: a sequence classifier; ``lm``: a causal language model).

    Returns ``(model, tokenizer, record, head_missing)`` (:class:`LoadedModel`) where ``head_missing`` says the
    classification head was missing from the checkpoint (a pretrained-only backbone).
    """
    where = resolve_model(spec, field)
    path = Path(where)
    record = read_record(path, field) if path.is_dir() else {}
    try:
        if path.is_file():  # GGUF: tokenizer and weights from the one file
            return _load_gguf(path, num_labels, kind, record)
        if path.is_dir() and (path / "config.json").is_file():
            check_architecture(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code), field, spec)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        if path.is_dir() and (path / PLAN).is_file():
            pruned = _load_pruned(where, trust_remote_code)
            set_pad_token(pruned, tokenizer)
            return LoadedModel(pruned, tokenizer, record, False)
        _check_recorded_labels(record, num_labels, spec, field)
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                                  "output_loading_info": True}
        if num_labels is not None and kind != "lm":
            kwargs["num_labels"] = num_labels
        model, info = auto_class(kind).from_pretrained(where, **kwargs)
        model.config.architectures = [type(model).__name__]
        set_pad_token(model, tokenizer)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files, bad configs, hub errors: all one line for the user
        raise _load_failure(exc, spec, field, num_labels, path) from None
    head_missing = any("classifier" in k or "score" in k for k in info.get("missing_keys", []))
    return LoadedModel(model.eval(), tokenizer, record, head_missing)


def _load_gguf(path: Path, num_labels: int | None, kind: str, record: dict[str, Any]) -> LoadedModel:
    """A GGUF file: tokenizer and weights from the one file (a classifier's head is new: ``score``)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "output_loading_info": True}
    if num_labels is not None and kind != "lm":
        kwargs["num_labels"] = num_labels
    model, info = auto_class(kind).from_pretrained(str(path.parent), **kwargs)
    model.config.architectures = [type(model).__name__]
    set_pad_token(model, tokenizer)
    head_missing = any("score" in k for k in info.get("missing_keys", []))
    return LoadedModel(model.eval(), tokenizer, record, head_missing)


def _load_pruned(where: str, trust_remote_code: bool) -> PreTrainedModel:
    """A pruned model directory: the architecture from ``config.json`` cut to ``pruning_plan.json``, then its
    weights."""
    path = Path(where)
    plan_data = json.loads((path / PLAN).read_text())
    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    blob = {"config": config, "heads": plan_data["heads_per_layer"], "neurons": plan_data["neurons_per_layer"],
            "hidden": plan_data.get("hidden_size"), "state": load_file(str(path / WEIGHTS))}
    model: PreTrainedModel = model_from_blob(blob, trust_remote_code)
    return model


def _check_recorded_labels(record: dict[str, Any], num_labels: int | None, spec: str, field: str) -> None:
    """Refuse a model whose record says it was trained for another label count than the data's."""
    known = record.get("task", {}).get("num_labels")
    if num_labels is not None and known is not None and known != num_labels:
        raise UserInputError(field, spec, f"the teacher was trained with {known} labels but the data has "
                             f"{num_labels}; use a teacher fine-tuned on this task or teacher.finetune=always")


def _load_failure(exc: Exception, spec: str, field: str, num_labels: int | None, path: Path) -> UserInputError:
    """The one line a failed load ends in: a label-count mismatch, an unreachable hub, or damaged files."""
    text = str(exc).strip() or type(exc).__name__
    if "size mismatch" in text or "num_labels" in text or "shape" in text:
        return UserInputError(field, spec, f"the teacher's label count does not match the data ({num_labels} "
                              "labels); set teacher.finetune=always to train a new head")
    if not path.exists():
        return UserInputError(field, spec, "the model hub is unreachable or has no such model; "
                              "pass a local model directory")
    return UserInputError(field, spec, f"could not load the model ({type(exc).__name__}: "
                          f"{text.splitlines()[0][:160]}); the files may be truncated or corrupt, save the "
                          "model again")


def save_model_dir(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str],
                   plan: PruningPlan | None = None, record: dict[str, Any] | None = None,
                   card: str | None = None, field: str = "--output") -> Path:
    """Write a model directory atomically: a temporary sibling, renamed into place when complete.

    ``out_dir`` must be absent, empty, or a model directory minidisc-ray wrote (it is then replaced);
    anything else is refused with a :class:`UserInputError` before anything is written.
    """
    out = check_model_output(out_dir, field)
    with writing_model_dir(out, field) as tmp:
        config = config_of(model)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_weights(model, tmp / WEIGHTS)
        tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / PLAN).write_text(json.dumps({"heads_per_layer": plan.heads_per_layer,
                                                "neurons_per_layer": plan.neurons_per_layer,
                                                "sparsity": plan.sparsity, "meta": plan.meta,
                                                **stored_axes(model, plan)}, indent=1))
        (tmp / RECORD).write_text(json.dumps(record if record is not None else {"role": "model"}, indent=1,
                                             default=str))
        if card is not None:
            (tmp / "README.md").write_text(card)
    return out


def stored_axes(model: nn.Module, plan: PruningPlan) -> dict[str, Any]:
    """What ``pruning_plan.json`` says of the hidden and depth axes: the kept width (``hidden_size``, when the
    residual stream was cut: the config keeps the teacher's, which the head size derives from) and the source
    layers kept (``layers``)."""
    out: dict[str, Any] = {}
    width = hidden_width(model)
    if width != int(config_of(model).hidden_size):
        out["hidden_size"] = width
    if plan.layers is not None:
        out["layers"] = plan.layers
    return out


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


