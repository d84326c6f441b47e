"""The two axes pruning cuts besides heads and FFN neurons: the hidden size (the residual stream's channels) and
the depth (whole layers), cut structurally on a model tree whose tensors are still shared with the source.

**Hidden size.** One list of kept channels is cut through everything that reads or writes the residual stream:
the embeddings (word, position, token type), every norm, the projections that read the stream (query/key/value,
the FFN's input, a decoder's gate/up) by their columns and those that write it (the attention and FFN outputs)
by their rows, the pooler and classification head or the language-model head (tied embeddings stay tied). A
norm then computes its statistics over the kept channels: the cut model is *not* the teacher with channels
masked, it is the stock model of the smaller width with the sliced weights (the tests check exactly that). The
attention head size stays the teacher's: ``config.hidden_size`` keeps the teacher's value (the head size of a BERT
is derived from it), and the kept width is :func:`hidden_width`.

**Depth.** :func:`keep_layers` keeps some layers, in order, renumbering a decoder's layer indices (its KV cache
slots) and the config's layer count.

Every new tensor is recorded with :func:`~minidisc_ray.families.record_source` (rows or columns of which source
tensor), so a cut built on the meta device can be filled from the source's files shard by shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from minidisc_ray.engine import scan_batches
from minidisc_ray.families import (
    EmptyDecoderAttention,
    EmptySelfAttention,
    get_adaptor,
    prune_linear_layer,
    record_source,
)

AXES = ("heads", "ffn", "hidden", "depth")


def hidden_width(model: Any) -> int:
    """The width of the residual stream (the input embeddings' columns): the teacher's ``hidden_size``, or fewer
    channels after a hidden cut."""
    return int(model.get_input_embeddings().weight.shape[1])


def _cut(param: torch.Tensor, index: torch.Tensor, dim: int) -> nn.Parameter:
    new = nn.Parameter(param.index_select(dim, index.to(param.device)).detach().clone(),
                       requires_grad=param.requires_grad)
    record_source(new, param, dim, index)
    return new


def _embedding(emb: nn.Embedding, index: torch.Tensor) -> None:
    emb.weight = _cut(emb.weight, index, 1)
    emb.embedding_dim = len(index)


def _norm(norm: Any, index: torch.Tensor) -> None:
    """A LayerNorm or RMSNorm over the kept channels only (its statistics too)."""
    norm.weight = _cut(norm.weight, index, 0)
    if getattr(norm, "bias", None) is not None:
        norm.bias = _cut(norm.bias, index, 0)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)


def _reads(linear: nn.Module, index: torch.Tensor) -> nn.Linear:
    return prune_linear_layer(linear, index, dim=1)  # type: ignore[arg-type]


def _writes(linear: nn.Module, index: torch.Tensor) -> nn.Linear:
    return prune_linear_layer(linear, index, dim=0)  # type: ignore[arg-type]


def _bert_hidden(model: Any, index: torch.Tensor) -> None:
    base = model.base_model
    emb = base.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if getattr(emb, name, None) is not None:
            _embedding(getattr(emb, name), index)
    _norm(emb.LayerNorm, index)
    for layer in base.encoder.layer:
        attn = layer.attention
        if not isinstance(attn.self, EmptySelfAttention):
            for name in ("query", "key", "value"):
                setattr(attn.self, name, _reads(getattr(attn.self, name), index))
        attn.output.dense = _writes(attn.output.dense, index)
        _norm(attn.output.LayerNorm, index)
        layer.intermediate.dense = _reads(layer.intermediate.dense, index)
        layer.output.dense = _writes(layer.output.dense, index)
        _norm(layer.output.LayerNorm, index)
    if getattr(base, "pooler", None) is not None:  # its output channels: the same choice, what the head reads
        base.pooler.dense = _writes(_reads(base.pooler.dense, index), index)
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        model.classifier = _reads(head, index)
    elif head is not None:  # RoBERTa's head: dense (stream -> its own width) then out_proj
        head.dense = _writes(_reads(head.dense, index), index)
        head.out_proj = _reads(head.out_proj, index)


def _llama_hidden(model: Any, index: torch.Tensor) -> None:
    base = model.base_model
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is base.embed_tokens.weight
    _embedding(base.embed_tokens, index)
    for layer in base.layers:
        _norm(layer.input_layernorm, index)
        _norm(layer.post_attention_layernorm, index)
        attn = layer.self_attn
        attn.o_proj = _writes(attn.o_proj, index)
        if not isinstance(attn, EmptyDecoderAttention):
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _reads(getattr(attn, name), index))
        mlp = layer.mlp
        mlp.gate_proj = _reads(mlp.gate_proj, index)
        mlp.up_proj = _reads(mlp.up_proj, index)
        mlp.down_proj = _writes(mlp.down_proj, index)
    _norm(base.norm, index)
    if getattr(model, "lm_head", None) is not None:
        if tied:
            model.lm_head.weight = base.embed_tokens.weight
        else:
            model.lm_head = _reads(model.lm_head, index)
    if getattr(model, "score", None) is not None:
        model.score = _reads(model.score, index)


_HIDDEN = {"bert": _bert_hidden, "llama": _llama_hidden}


def cut_hidden(model: Any, channels: Sequence[int]) -> None:
    """Keep the residual-stream channels ``channels`` (in that order) of ``model``, in place on its module tree."""
    width = hidden_width(model)
    if not channels or len(set(channels)) != len(channels) or not all(0 <= c < width for c in channels):
        raise ValueError(f"hidden channels must be distinct indices into {width}, at least one")
    _HIDDEN[get_adaptor(model).family](model, torch.tensor(list(channels), dtype=torch.long))


def residual_norms(model: Any) -> list[nn.Module]:
    """The norms whose outputs are the normalised residual stream (what channel importance reads)."""
    base = model.base_model
    if get_adaptor(model).family == "bert":
        return [base.embeddings.LayerNorm, *(m for layer in base.encoder.layer
                                              for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm))]
    return [*(m for layer in base.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)),
            base.norm]


@torch.no_grad()
def channel_importance(model: Any, batches: Iterable[dict[str, torch.Tensor]],
                       max_samples: int | None = None) -> list[float]:
    """Importance of each residual-stream channel: the mean magnitude of its value in every normalised residual
    stream (each norm's output), summed over the norms, over the non-padding tokens of ``batches``; L2-normalised
    (Minitron's activation score for the embedding channels). No labels and no backward pass."""
    width = hidden_width(model)
    total = torch.zeros(width, dtype=torch.float64)
    state: dict[str, Any] = {"tokens": 0.0}

    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        flat = out.reshape(-1, out.shape[-1]).float()
        mask = state.get("mask")
        if mask is not None:
            flat = flat[mask.to(flat.device)]
        total.add_(flat.abs().sum(0).double().cpu())

    def step(batch: dict[str, torch.Tensor]) -> None:
        if "attention_mask" in batch:
            state["mask"] = batch["attention_mask"].reshape(-1).bool()
            state["tokens"] += float(batch["attention_mask"].sum())
        else:
            state["tokens"] += float(batch["input_ids"].numel())
        model(**{k: v for k, v in batch.items() if k != "labels"})

    handles = [norm.register_forward_hook(hook) for norm in residual_norms(model)]
    scan_batches(model, batches, max_samples, handles, step)
    mean = total / max(state["tokens"], 1.0)
    return (mean / mean.norm().clamp_min(1e-12)).tolist()


def keep_channels(scores: Sequence[float], width: int, multiple: int = 1) -> list[int]:
    """The ``width`` most important channels (rounded down to a multiple of ``multiple``, at least one), in
    ascending index order (the teacher's channel order, so a stock model of the smaller width reads them)."""
    n = max(multiple, width - width % multiple) if multiple > 1 else max(1, width)
    ranked = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
    return sorted(ranked[:min(n, len(scores))])


def keep_layers(model: Any, keep: Sequence[int]) -> None:
    """Keep the layers ``keep`` (ascending indices into the current layers) of ``model``, in place: the layer
    list, a decoder's per-layer indices (KV cache slots) and the config's layer count and per-layer types."""
    adaptor = get_adaptor(model)
    layers = list(adaptor.layers(model))
    total = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or not all(0 <= i < total for i in keep):
        raise ValueError(f"layers to keep must be ascending distinct indices into {total}, at least one")
    parent = model.base_model.encoder if adaptor.family == "bert" else model.base_model
    name = "layer" if adaptor.family == "bert" else "layers"
    setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    for new, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cfg: Any = model.config
    cfg.num_hidden_layers = len(keep)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == total:
        cfg.layer_types = [types[i] for i in keep]


CUT_ATTR = "minidisc_cut"  # config attribute (saved in config.json): the layers and channels kept of the source


def record_cut(model: Any, layers: Sequence[int] | None, channels: Sequence[int] | None) -> None:
    """Note on ``model``'s config which layers and residual channels of the model it was cut from it keeps (none:
    all), replacing what its source noted of its own source."""
    if layers is None and channels is None:
        if hasattr(model.config, CUT_ATTR):
            delattr(model.config, CUT_ATTR)
        return
    setattr(model.config, CUT_ATTR, {"layers": None if layers is None else list(layers),
                                     "hidden": None if channels is None else list(channels)})


def teacher_states_for(student: Any, teacher_hidden: Sequence[Any], wanted: Sequence[int]) -> list[Any]:
    """The teacher's hidden states the student's ``wanted`` ones (indices into its ``hidden_states``, 0 = the
    embeddings) are compared with, at the student's indices (None elsewhere): the teacher layer each student
    layer was cut from, on the channels it kept (no learned projection: a cut keeps a subset of both)."""
    core = getattr(student, "module", student)  # under DDP
    cut = getattr(core.config, CUT_ATTR, None) or {}
    layers, channels = cut.get("layers"), cut.get("hidden")
    index = None if channels is None else torch.tensor(channels, dtype=torch.long)
    # a decoder's last hidden state is its final norm's output, the teacher's too: the last compares with the last
    final_norm = get_adaptor(core).family == "llama" and layers is not None
    out: list[Any] = [None] * (max(wanted, default=0) + 1)
    for j in wanted:
        if final_norm and layers is not None and j == len(layers):
            t = teacher_hidden[len(teacher_hidden) - 1]
        else:
            t = teacher_hidden[j if layers is None or j == 0 else layers[j - 1] + 1]
        out[j] = t if index is None else t.index_select(-1, index.to(t.device))
    return out
