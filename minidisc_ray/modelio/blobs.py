"""Models in Ray's object store: a model as a blob of numpy arrays (one copy shared by every trial on a node,
read without copying) and back."""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from torch import nn

from minidisc_ray.axes import hidden_width
from minidisc_ray.families import unit_widths
from minidisc_ray.modelio.locate import (
    config_of,
    kind_of,
)
from minidisc_ray.modelio.weights import empty_model
from minidisc_ray.records import digest


def pack_tensors(state: dict[str, torch.Tensor]) -> dict[str, tuple[Any, str]]:
    """Tensors as numpy arrays (with their torch dtype) so Ray's object store shares them without copying.

    ``ray.get`` of a numpy array maps the object store's memory read-only; every worker on a node reads
    the same bytes. bf16 travels as its raw 16-bit pattern.
    """
    packed = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        packed[name] = (arr, str(t.dtype).removeprefix("torch."))
    return packed


def unpack_tensors(packed: dict[str, Any], writable: bool) -> dict[str, torch.Tensor]:
    """Tensors over :func:`pack_tensors`' arrays: shared (read-only memory) unless ``writable``."""
    out = {}
    for name, value in packed.items():
        if isinstance(value, torch.Tensor):
            t = value
        else:
            arr, dtype = value
            with warnings.catch_warnings():  # read-only object-store memory: fine for weights nobody writes
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(arr)
            if dtype == "bfloat16":
                t = t.view(torch.bfloat16)
        out[name] = t.clone() if writable else t
    return out


def share_key(model: nn.Module, weights_fp: str) -> str:
    """What names a model's object-store copy: its weights' fingerprint and its config (two models with the same
    weights but another dropout or head config are different models; ``architectures``, which
    :func:`model_blob` fills in, is left out so the key is the same before and after)."""
    config = {k: v for k, v in config_of(model).to_dict().items() if k != "architectures"}
    return digest(weights_fp, json.dumps(config, sort_keys=True, default=str))


def model_blob(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A picklable description of ``model`` (config, per-layer shapes, weights) for Ray's object store.

    transformers 5 models carry output-capturing hooks that do not survive pickling (hidden states
    come back as None), so models travel as blobs and are rebuilt with :func:`model_from_blob`. The
    weights travel as numpy arrays (:func:`pack_tensors`): put once, read by every trial and worker of a
    node without a copy. ``state`` replaces the model's own weights (a model on the meta device: its
    architecture, given the weights a stage trained).
    """
    heads, neurons = unit_widths(model)
    config = config_of(model)
    config.architectures = [type(model).__name__]  # what save_pretrained records too
    width = hidden_width(model)
    return {"config": config, "kind": kind_of(model), "heads": heads, "neurons": neurons,
            "hidden": width if width != int(config.hidden_size) else None,
            "state": pack_tensors(model.state_dict() if state is None else state)}


def model_from_blob(blob: dict[str, Any], trust_remote_code: bool = False, trainable: bool = True) -> Any:
    """Rebuild a (possibly pruned) model from :func:`model_blob`'s output or a saved directory's parts.

    Shapes come from a meta-device model and the weights are assigned, never copied into a randomly
    initialised model; with ``trainable=False`` (a frozen teacher) they stay the object store's memory.
    """
    model = empty_model(blob["config"], list(blob["heads"]), list(blob["neurons"]), trust_remote_code,
                        blob.get("kind"), hidden=blob.get("hidden"))
    state = unpack_tensors(blob["state"], writable=trainable)
    tied = bool(getattr(blob["config"], "tie_word_embeddings", False)) and kind_of(model) == "lm"
    if tied:  # tied input/output embeddings may be stored under one of their names (safetensors drops aliases)
        pair = ["lm_head.weight"] + [n for n, p in model.named_parameters(remove_duplicate=False)
                                     if p is model.get_input_embeddings().weight]
        present = [n for n in pair if n in state]
        for name in pair:
            if name not in state and present:
                state[name] = state[present[0]]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.tie_weights()
    if not trainable:
        model.requires_grad_(False)
    return model.eval()
