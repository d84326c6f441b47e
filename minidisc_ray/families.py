"""Model-family adaptors: where each architecture keeps its heads and FFN neurons.

Pruning, masking and parameter accounting go through an adaptor so they do not depend on one model
family. Two families are supported:

* BERT-family encoders (BERT, RoBERTa, MiniLM, which is BERT-shaped): a unit is one attention head;
* Llama-architecture decoders (Llama, Qwen2, Mistral: q/k/v/o projections with grouped-query attention,
  a SwiGLU MLP, RMSNorm): a head unit is one **key/value group**, the KV head together with the query
  heads that read it. Dropping whole groups keeps every layer a valid GQA layer with the teacher's
  group size, so the stock attention code runs the pruned layer unchanged (it reshapes with ``-1``
  heads) and the KV cache shrinks with the query heads. Pruning query heads inside a group would keep
  the KV heads (where decode-time memory goes) and leave groups of unequal size, which stock
  attention cannot express.

An FFN unit is one neuron: BERT's intermediate row with its output column, a decoder's gate and up
rows with the matching down column. Another family plugs in by registering an adaptor in
:data:`ADAPTORS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from minidisc_ray.errors import UserInputError

# where each tensor of a model being pruned comes from, while :func:`sources` records it (else None):
# id(new tensor) -> (the new tensor, source tensor, kept rows or None, kept columns or None)
Origin = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]
_SOURCES: dict[int, Origin] | None = None


class sources:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Record, while active, which rows and columns of which source tensor every tensor that pruning creates
    holds (:func:`prune_linear_layer`, the hidden and depth cuts of :mod:`minidisc_ray.axes`, and the clones of
    :func:`~minidisc_ray.pruning.prune_model`): what lets a pruned model built on the meta device be filled
    from the unpruned model's files, each rank reading only its own rows
    (:func:`minidisc_ray.modelio.sharded.load_sharded`). A tensor cut twice (a projection's heads, then its
    hidden columns) is recorded against the stored tensor, with both indices."""

    def __enter__(self) -> dict[int, Origin]:
        global _SOURCES
        if _SOURCES is not None:
            raise RuntimeError("families.sources() does not nest")
        _SOURCES = {}
        return _SOURCES

    def __exit__(self, *exc: object) -> None:
        global _SOURCES
        _SOURCES = None


def _then(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """The index of ``second`` applied after ``first`` (either may be None: all of them)."""
    if first is None:
        return second
    return first if second is None else first[second]


def record_source(new: torch.Tensor, source: torch.Tensor, dim: int | None = None,
                  index: torch.Tensor | None = None) -> None:
    """Note that ``new`` holds ``source`` (whole, or its ``index`` along ``dim``) while :class:`sources`
    records; nothing otherwise."""
    if _SOURCES is None:
        return
    index = None if index is None else index.detach().cpu()
    rows, cols = (index, None) if dim == 0 else (None, index) if dim == 1 else (None, None)
    prior = _SOURCES.get(id(source))
    if prior is not None and prior[0] is source:  # ``source`` is itself a cut of a stored tensor
        _, source, before_rows, before_cols = prior
        rows, cols = _then(before_rows, rows), _then(before_cols, cols)
    _SOURCES[id(new)] = (new, source, rows, cols)


def prune_linear_layer(layer: nn.Linear, index: torch.Tensor, dim: int = 0) -> nn.Linear:
    """A new ``nn.Linear`` keeping the rows (``dim=0``) or columns (``dim=1``) ``index`` of ``layer``.

    Unlike ``transformers.pytorch_utils.prune_linear_layer`` the new layer is built on the meta device
    and given the sliced tensors: no random initialisation of a throw-away weight (the bulk of pruning
    time at billion-parameter scale) and no CPU round trip for a model on a GPU or on ``meta``. The new
    parameters are trainable, whatever ``layer``'s were.
    """
    record = index
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias.index_select(0, index).detach().clone()
    with torch.device("meta"):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight)  # trainable, as a freshly built layer (the candidate of a frozen teacher)
    record_source(new.weight, layer.weight, dim, record)
    if bias is not None:
        new.bias = nn.Parameter(bias)
        record_source(new.bias, layer.bias, None if dim == 1 else 0, None if dim == 1 else record)
    return new


class EmptySelfAttention(nn.Module):
    """Stands in for a self-attention block whose heads were all pruned.

    It returns a zero-width context, so the output projection contributes only its bias and the
    residual path (``LayerNorm(bias + hidden)``) stays: exactly what the teacher computes with every
    head of the layer masked.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class EmptyDecoderAttention(nn.Module):
    """Stands in for a decoder self-attention block whose key/value groups were all pruned.

    It keeps the (zero-input) output projection, so it returns that projection's bias (zero without
    one): exactly what the teacher's attention contributes to the residual stream when every group
    is masked.
    """

    def __init__(self, o_proj: nn.Module) -> None:
        super().__init__()
        self.o_proj = o_proj

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


class SlicedLinear(nn.Module):
    """A view of the first ``rows`` outputs or the first ``cols`` inputs of a shared ``nn.Linear``.

    The weights are slices of ``base``'s parameters (no copy), so gradients flow back into the shared
    weights: how a slimmable network runs a narrower width without paying for the full one.
    """

    def __init__(self, base: nn.Linear, rows: int | None = None, cols: int | None = None) -> None:
        super().__init__()
        self.base, self.rows, self.cols = base, rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w: torch.Tensor = self.base.weight
        b: torch.Tensor | None = self.base.bias
        if self.rows is not None:
            w = w[: self.rows]
            b = None if b is None else b[: self.rows]
        if self.cols is not None:
            w = w[:, : self.cols]
        return F.linear(x, w, b)


class _Swaps:
    """Module replacements (``swap(parent, name, new)``) that :meth:`restore` undoes in reverse order."""

    def __init__(self) -> None:
        self.undo: list[tuple[nn.Module, str, nn.Module]] = []

    def __call__(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.undo.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def restore(self) -> None:
        for parent, name, old in reversed(self.undo):
            setattr(parent, name, old)


def _checked_widths(adaptor: Any, model: Any, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int],
                    unit: str) -> list[tuple[Any, int, int]]:
    """(layer, heads, neurons) per layer, after checking the widths fit the model's layers."""
    layers = adaptor.layers(model)
    if len(heads_per_layer) != len(layers) or len(neurons_per_layer) != len(layers):
        raise ValueError(f"widths for {len(heads_per_layer)} layers, model has {len(layers)}")
    out = list(zip(layers, heads_per_layer, neurons_per_layer, strict=True))
    for layer, h, n in out:
        if not 0 <= h <= adaptor.num_heads(layer) or not 0 <= n <= adaptor.num_neurons(layer):
            raise ValueError(f"width ({h} {unit}, {n} neurons) exceeds the layer")
    return out


class FamilyAdaptor(Protocol):
    """What pruning needs to know of a model family."""

    family: str

    def layers(self, model: Any) -> Sequence[Any]: ...
    def num_heads(self, layer: Any) -> int: ...
    def head_dim(self, model: Any) -> int: ...
    def num_neurons(self, layer: Any) -> int: ...
    def prune_layer(self, layer: Any, heads: Sequence[int], neurons: Sequence[int], head_dim: int) -> None: ...
    def attach_masks(self, model: Any, head_masks: Sequence[torch.Tensor],
                     neuron_masks: Sequence[torch.Tensor]) -> list[Any]: ...
    def slice_widths(self, model: Any, heads_per_layer: Sequence[int],
                     neurons_per_layer: Sequence[int]) -> Callable[[], None]: ...
    def unit_inputs(self, layer: Any) -> tuple[nn.Module, nn.Module]: ...
    def head_unit_width(self, model: Any) -> int: ...


class BertFamilyAdaptor:
    """BERT-shaped encoders: ``base_model.encoder.layer[i]`` with ``attention.self.{query,key,value}``,
    ``attention.output.dense``, ``intermediate.dense`` and ``output.dense``."""

    family = "bert"

    def layers(self, model: Any) -> Sequence[Any]:
        return list(model.base_model.encoder.layer)

    def num_heads(self, layer: Any) -> int:
        attn = layer.attention.self
        return 0 if isinstance(attn, EmptySelfAttention) else int(attn.num_attention_heads)

    def head_dim(self, model: Any) -> int:
        cfg = model.config
        return int(cfg.hidden_size // cfg.num_attention_heads)

    def num_neurons(self, layer: Any) -> int:
        return int(layer.intermediate.dense.out_features)

    def unit_inputs(self, layer: Any) -> tuple[nn.Module, nn.Module]:
        """The linear layers whose input columns are the heads' contexts and the neurons' activations."""
        return layer.attention.output.dense, layer.output.dense

    def head_unit_width(self, model: Any) -> int:
        return self.head_dim(model)

    def prune_layer(self, layer: Any, heads: Sequence[int], neurons: Sequence[int], head_dim: int) -> None:
        """Keep ``heads`` and ``neurons`` of ``layer`` in the given order (in place on a copy)."""
        with warnings.catch_warnings():  # emptied layers build zero-size Linear layers on purpose
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self._prune_layer(layer, heads, neurons, head_dim)

    def _prune_layer(self, layer: Any, heads: Sequence[int], neurons: Sequence[int], head_dim: int) -> None:
        attn = layer.attention
        cols: Any = torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)
        attn.output.dense = prune_linear_layer(attn.output.dense, cols, dim=1)
        if len(heads) == 0:
            attn.self = EmptySelfAttention()
        else:
            sa = attn.self
            for name in ("query", "key", "value"):
                setattr(sa, name, prune_linear_layer(getattr(sa, name), cols, dim=0))
            sa.num_attention_heads = len(heads)
            sa.all_head_size = len(heads) * head_dim
        idx: Any = torch.tensor(list(neurons), dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, idx, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, idx, dim=1)

    def attach_masks(self, model: Any, head_masks: Sequence[torch.Tensor],
                     neuron_masks: Sequence[torch.Tensor]) -> list[Any]:
        """Multiply each head's context and each FFN neuron's activation by its mask entry."""
        handles = []
        d = self.head_dim(model)
        for layer, hm, nm in zip(self.layers(model), head_masks, neuron_masks, strict=True):
            def head_hook(_m: nn.Module, _inp: Any, out: Any, hm: torch.Tensor = hm) -> Any:
                ctx = out[0] * hm.repeat_interleave(d).to(out[0].dtype)
                return (ctx, *out[1:])

            def neuron_hook(_m: nn.Module, _inp: Any, out: torch.Tensor, nm: torch.Tensor = nm) -> torch.Tensor:
                return out * nm.to(out.dtype)

            handles.append(layer.attention.self.register_forward_hook(head_hook))
            handles.append(layer.intermediate.register_forward_hook(neuron_hook))
        return handles


    def slice_widths(self, model: Any, heads_per_layer: Sequence[int],
                     neurons_per_layer: Sequence[int]) -> Callable[[], None]:
        """Make ``model`` compute its sub-network of the first heads and neurons of each layer.

        The projections are swapped for :class:`SlicedLinear` views of the same parameters (a layer
        left without heads gets :class:`EmptySelfAttention`); returns the function that puts the
        original modules back. The result equals :func:`~minidisc_ray.pruning.prune_model` with the
        prefix plan, at the prefix's cost, and trains the shared weights.
        """
        swap = _Swaps()
        d = self.head_dim(model)
        for layer, h, n in _checked_widths(self, model, heads_per_layer, neurons_per_layer, "heads"):
            attn = layer.attention
            swap(attn.output, "dense", SlicedLinear(attn.output.dense, cols=h * d))
            if h == 0:
                swap(attn, "self", EmptySelfAttention())
            else:
                for name in ("query", "key", "value"):
                    swap(attn.self, name, SlicedLinear(getattr(attn.self, name), rows=h * d))
            swap(layer.intermediate, "dense", SlicedLinear(layer.intermediate.dense, rows=n))
            swap(layer.output, "dense", SlicedLinear(layer.output.dense, cols=n))

        return swap.restore


class LlamaFamilyAdaptor:
    """Llama-architecture decoders: ``base_model.layers[i]`` with ``self_attn.{q,k,v,o}_proj`` (grouped-query
    attention) and ``mlp.{gate,up,down}_proj``. A head unit is a key/value group (see the module doc)."""

    family = "llama"

    def layers(self, model: Any) -> Sequence[Any]:
        return list(model.base_model.layers)

    def head_dim(self, model: Any) -> int:
        cfg = model.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def group_size(self, model: Any) -> int:
        cfg = model.config
        return int(cfg.num_attention_heads // (cfg.num_key_value_heads or cfg.num_attention_heads))

    def head_unit_width(self, model: Any) -> int:
        return self.head_dim(model) * self.group_size(model)

    def num_heads(self, layer: Any) -> int:
        attn = layer.self_attn
        if isinstance(attn, EmptyDecoderAttention):
            return 0
        return int(attn.k_proj.out_features // attn.head_dim)

    def num_neurons(self, layer: Any) -> int:
        return int(layer.mlp.down_proj.in_features)

    def unit_inputs(self, layer: Any) -> tuple[nn.Module, nn.Module]:
        return layer.self_attn.o_proj, layer.mlp.down_proj

    def prune_layer(self, layer: Any, heads: Sequence[int], neurons: Sequence[int], head_dim: int) -> None:
        """Keep the key/value groups ``heads`` and the MLP ``neurons`` in the given order (in place)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            attn = layer.self_attn
            if isinstance(attn, EmptyDecoderAttention) and heads:
                raise ValueError("a layer without key/value groups cannot keep any")
            group = int(getattr(attn, "num_key_value_groups", 1))
            kv: Any = torch.tensor([g * head_dim + j for g in heads for j in range(head_dim)], dtype=torch.long)
            q: Any = torch.tensor([(g * group + i) * head_dim + j for g in heads for i in range(group)
                                   for j in range(head_dim)], dtype=torch.long)
            o_proj = prune_linear_layer(attn.o_proj, q, dim=1)
            if len(heads) == 0:
                layer.self_attn = EmptyDecoderAttention(o_proj)
            else:
                attn.o_proj = o_proj
                attn.q_proj = prune_linear_layer(attn.q_proj, q, dim=0)
                attn.k_proj = prune_linear_layer(attn.k_proj, kv, dim=0)
                attn.v_proj = prune_linear_layer(attn.v_proj, kv, dim=0)
            idx: Any = torch.tensor(list(neurons), dtype=torch.long)
            mlp = layer.mlp
            mlp.gate_proj = prune_linear_layer(mlp.gate_proj, idx, dim=0)
            mlp.up_proj = prune_linear_layer(mlp.up_proj, idx, dim=0)
            mlp.down_proj = prune_linear_layer(mlp.down_proj, idx, dim=1)
            mlp.intermediate_size = len(neurons)

    def attach_masks(self, model: Any, head_masks: Sequence[torch.Tensor],
                     neuron_masks: Sequence[torch.Tensor]) -> list[Any]:
        """Multiply each group's attention output and each MLP neuron by its mask entry (on the inputs of
        ``o_proj`` and ``down_proj``)."""
        width = self.head_unit_width(model)
        handles = []
        for layer, hm, nm in zip(self.layers(model), head_masks, neuron_masks, strict=True):
            def head_hook(_m: nn.Module, args: tuple[Any, ...], hm: torch.Tensor = hm) -> Any:
                return (args[0] * hm.repeat_interleave(width).to(args[0].dtype), *args[1:])

            def neuron_hook(_m: nn.Module, args: tuple[Any, ...], nm: torch.Tensor = nm) -> Any:
                return (args[0] * nm.to(args[0].dtype), *args[1:])

            o_proj, down_proj = self.unit_inputs(layer)
            handles.append(o_proj.register_forward_pre_hook(head_hook))
            handles.append(down_proj.register_forward_pre_hook(neuron_hook))
        return handles

    def slice_widths(self, model: Any, heads_per_layer: Sequence[int],
                     neurons_per_layer: Sequence[int]) -> Callable[[], None]:
        """The prefix sub-network on views of the same weights (see :meth:`BertFamilyAdaptor.slice_widths`)."""
        swap = _Swaps()
        d, width = self.head_dim(model), self.head_unit_width(model)
        for layer, h, n in _checked_widths(self, model, heads_per_layer, neurons_per_layer, "groups"):
            attn = layer.self_attn
            if h == 0:
                swap(layer, "self_attn", EmptyDecoderAttention(SlicedLinear(attn.o_proj, cols=0)))
            else:
                swap(attn, "o_proj", SlicedLinear(attn.o_proj, cols=h * width))
                swap(attn, "q_proj", SlicedLinear(attn.q_proj, rows=h * width))
                swap(attn, "k_proj", SlicedLinear(attn.k_proj, rows=h * d))
                swap(attn, "v_proj", SlicedLinear(attn.v_proj, rows=h * d))
            swap(layer.mlp, "gate_proj", SlicedLinear(layer.mlp.gate_proj, rows=n))
            swap(layer.mlp, "up_proj", SlicedLinear(layer.mlp.up_proj, rows=n))
            swap(layer.mlp, "down_proj", SlicedLinear(layer.mlp.down_proj, cols=n))

        return swap.restore


ADAPTORS: dict[str, FamilyAdaptor] = {
    "bert": BertFamilyAdaptor(),
    "roberta": BertFamilyAdaptor(),
    "xlm-roberta": BertFamilyAdaptor(),
    "llama": LlamaFamilyAdaptor(),
    "qwen2": LlamaFamilyAdaptor(),
    "mistral": LlamaFamilyAdaptor(),
}


def get_adaptor(model: Any) -> FamilyAdaptor:
    """Adaptor of ``model``'s family; a one-line error naming the supported families otherwise."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTORS:
        raise UserInputError("teacher.model", model_type,
                             f"model family not supported yet; use one of {', '.join(sorted(ADAPTORS))}")
    return ADAPTORS[model_type]


def unit_widths(model: Any) -> tuple[list[int], list[int]]:
    """(heads or KV groups per layer, FFN neurons per layer): the prunable units, read from the family's
    adaptor in this one place."""
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    return [adaptor.num_heads(x) for x in layers], [adaptor.num_neurons(x) for x in layers]


def unit_counts(model: Any) -> tuple[int, int]:
    """(heads, neurons) of the whole model: what unit sparsities are fractions of."""
    heads, neurons = unit_widths(model)
    return sum(heads), sum(neurons)


def count_params(model: Any) -> tuple[int, int]:
    """(prunable, total) parameter counts; prunable = the transformer layers' parameters."""
    adaptor = get_adaptor(model)
    prunable = sum(p.numel() for layer in adaptor.layers(model) for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters())
    return prunable, total
