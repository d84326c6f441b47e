"""Importance-based structured pruning of attention heads and FFN neurons (MiniDisc, arXiv 2205.14570).

For decoders a head unit is a key/value group (see :mod:`minidisc_ray.families`).

Importance of a unit is the accumulated first-order Taylor score ``|d loss / d mask|`` over a data
sample, L2-normalised per layer; heads and neurons are ranked globally and separately. A candidate at
sparsity ``s`` drops the ``s``-fraction least important heads and the ``s``-fraction least important
neurons; kept units are ordered by importance, so every candidate is a prefix of the reordered
teacher. :func:`prune_model` returns a new, genuinely smaller module; the teacher is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from minidisc_ray.axes import cut_hidden, hidden_width, keep_layers, record_cut
from minidisc_ray.engine import model_device, scan_batches
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import get_adaptor, record_source


@dataclass(frozen=True)
class Importance:
    """Per-layer importance scores (already L2-normalised per layer)."""

    heads: list[list[float]]
    neurons: list[list[float]]
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "neurons": self.neurons, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Importance:
        return cls([list(map(float, h)) for h in d["heads"]], [list(map(float, n)) for n in d["neurons"]],
                   int(d.get("samples", 0)))


@dataclass(frozen=True)
class PruningPlan:
    """Which heads and neurons each layer keeps, most important first (indices into the source model); and,
    on the other axes (:mod:`minidisc_ray.axes`), which layers (``layers``: ascending indices into the source's
    layers, None = all; ``heads`` and ``neurons`` then hold one entry per kept layer) and which residual-stream
    channels (``hidden``, None = all) it keeps."""

    heads: list[list[int]]
    neurons: list[list[int]]
    sparsity: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    hidden: list[int] | None = None
    layers: list[int] | None = None

    @property
    def heads_per_layer(self) -> list[int]:
        return [len(h) for h in self.heads]

    @property
    def neurons_per_layer(self) -> list[int]:
        return [len(n) for n in self.neurons]

    def to_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("hidden", self.hidden), ("layers", self.layers)) if v is not None}
        return {"sparsity": self.sparsity, "heads": self.heads, "neurons": self.neurons, "meta": self.meta, **extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        return cls([list(map(int, h)) for h in d["heads"]], [list(map(int, n)) for n in d["neurons"]],
                   float(d.get("sparsity", 0.0)), dict(d.get("meta", {})),
                   None if d.get("hidden") is None else [int(c) for c in d["hidden"]],
                   None if d.get("layers") is None else [int(i) for i in d["layers"]])

    @classmethod
    def prefix(cls, heads_per_layer: list[int], neurons_per_layer: list[int], sparsity: float = 0.0,
               hidden_size: int | None = None) -> PruningPlan:
        """Plan that keeps the first n units of each layer, and the first ``hidden_size`` channels (how a saved
        pruned model is rebuilt)."""
        return cls([list(range(h)) for h in heads_per_layer], [list(range(n)) for n in neurons_per_layer], sparsity,
                   hidden=None if hidden_size is None else list(range(hidden_size)))


def check_sparsity(s: float, field_name: str = "--sparsity") -> float:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s < 1.0):
        raise UserInputError(field_name, s, "use a sparsity in [0, 1), e.g. 0.5")
    return float(s)


IMPORTANCE_METHODS = ("gradient", "activation")


def compute_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                       max_samples: int | None = None, method: str = "gradient",
                       weights: list[float] | None = None,
                       reduce: Callable[[list[torch.Tensor]], None] | None = None) -> Importance:
    """Importance of every head unit and FFN neuron over ``batches``, L2-normalised per layer.

    ``gradient`` (the paper's score) accumulates ``|d loss / d mask|``: one backward pass per batch, and
    batches must carry ``labels`` so the model returns its task loss. ``activation`` needs no backward
    pass and no labels: a head unit scores the mean L2 norm of its attention output per token, a neuron
    the mean magnitude of its activation (Minitron's one-shot activation score), which is what a
    billion-parameter teacher can afford. The model runs in eval mode, so scores are deterministic.

    Split over the ranks of a sharded model (:mod:`minidisc_ray.teacher_pass`): ``weights`` multiplies each
    batch's contribution (0: the batch runs, for the group's collectives, and adds nothing), and ``reduce``
    combines the raw per-unit sums across ranks in place before they are normalised.
    """
    if method not in IMPORTANCE_METHODS:
        raise UserInputError("pruning.importance", method, f"use one of {', '.join(IMPORTANCE_METHODS)}")
    weight = iter(weights) if weights is not None else None
    if method == "activation":
        return _activation_importance(model, batches, max_samples, weight, reduce)

    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    device = model_device(model)
    head_masks = [torch.ones(adaptor.num_heads(layer), requires_grad=True, device=device) for layer in layers]
    neuron_masks = [torch.ones(adaptor.num_neurons(layer), requires_grad=True, device=device) for layer in layers]
    head_acc = [torch.zeros_like(m) for m in head_masks]
    neuron_acc = [torch.zeros_like(m) for m in neuron_masks]

    def step(batch: dict[str, torch.Tensor]) -> None:
        w = next(weight) if weight is not None else 1.0
        out = model(**batch)
        if out.loss is None:
            raise ValueError("importance batches need labels")
        wrt = [m for m in head_masks + neuron_masks if m.numel()]
        it = iter(torch.autograd.grad(out.loss, wrt, allow_unused=True))
        for acc in head_acc + neuron_acc:
            if acc.numel():
                g = next(it)
                if g is not None and w:
                    acc += w * g.abs().detach()

    seen = scan_batches(model, batches, max_samples, adaptor.attach_masks(model, head_masks, neuron_masks), step)
    if reduce is not None:
        reduce(head_acc + neuron_acc)
    return Importance(_normalise(head_acc), _normalise(neuron_acc), seen)


def _normalise(xs: list[torch.Tensor]) -> list[list[float]]:
    return [(x.cpu() / x.norm().clamp_min(1e-12)).tolist() if x.numel() else [] for x in xs]


@torch.no_grad()
def _activation_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                           max_samples: int | None, weight: Iterator[float] | None = None,
                           reduce: Callable[[list[torch.Tensor]], None] | None = None) -> Importance:
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    device = model_device(model)
    width = adaptor.head_unit_width(model)
    head_acc = [torch.zeros(adaptor.num_heads(layer), device=device, dtype=torch.float64) for layer in layers]
    neuron_acc = [torch.zeros(adaptor.num_neurons(layer), device=device, dtype=torch.float64) for layer in layers]
    tokens: dict[str, Any] = {"w": 1.0}  # the current batch's non-padding token mask, (batch * length,)

    def rows(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        return flat[tokens["mask"]] if "mask" in tokens else flat

    handles = []
    for layer, hacc, nacc in zip(layers, head_acc, neuron_acc, strict=True):
        def head_hook(_m: nn.Module, args: tuple[Any, ...], acc: torch.Tensor = hacc) -> None:
            if acc.numel() and tokens["w"]:
                x = rows(args[0])
                acc += tokens["w"] * x.reshape(x.shape[0], -1, width).norm(dim=-1).sum(0).double()

        def neuron_hook(_m: nn.Module, args: tuple[Any, ...], acc: torch.Tensor = nacc) -> None:
            if acc.numel() and tokens["w"]:
                acc += tokens["w"] * rows(args[0]).abs().sum(0).double()

        head_site, neuron_site = adaptor.unit_inputs(layer)
        handles.append(head_site.register_forward_pre_hook(head_hook))
        handles.append(neuron_site.register_forward_pre_hook(neuron_hook))

    def step(batch: dict[str, torch.Tensor]) -> None:
        tokens["w"] = next(weight) if weight is not None else 1.0
        if "attention_mask" in batch:
            tokens["mask"] = batch["attention_mask"].reshape(-1).bool()
        model(**{k: v for k, v in batch.items() if k != "labels"})

    seen = scan_batches(model, batches, max_samples, handles, step)
    if reduce is not None:
        reduce(head_acc + neuron_acc)
    return Importance(_normalise([a.float() for a in head_acc]), _normalise([a.float() for a in neuron_acc]), seen)


def _keep(scores: list[list[float]], sparsity: float, base: int | None) -> list[list[int]]:
    """Keep ``base - round(s * base)`` units (``base``: the original teacher's count, default the
    current one), dropping the globally least important; each layer's rest is ordered by importance."""
    units = [(score, layer, idx) for layer, row in enumerate(scores) for idx, score in enumerate(row)]
    base = len(units) if base is None else base
    n_keep = base - int(round(sparsity * base))
    if n_keep > len(units):
        raise UserInputError("sparsity", sparsity, f"the model is already sparser than {sparsity}; "
                             "choose a higher target sparsity")
    n_drop = len(units) - n_keep
    ranked = sorted(units, key=lambda u: (u[0], -u[1], -u[2]))  # least important first, ties stable
    dropped = {(layer, idx) for _, layer, idx in ranked[:n_drop]}
    keep = []
    for layer, row in enumerate(scores):
        kept = [i for i in range(len(row)) if (layer, i) not in dropped]
        keep.append(sorted(kept, key=lambda i, row=row: (-row[i], i)))  # type: ignore[misc]
    return keep


def _keep_uniform(scores: list[list[float]], sparsity: float, base: int | None) -> list[list[int]]:
    """Keep the same number of units in every layer (``per_layer - round(s * per_layer)`` of the
    teacher's per-layer count), the most important of each layer, ordered by importance."""
    layers = len(scores)
    per_layer = (base if base is not None else sum(len(r) for r in scores)) / max(1, layers)
    n_keep = int(round(per_layer)) - int(round(sparsity * per_layer))
    if any(n_keep > len(row) for row in scores):
        raise UserInputError("sparsity", sparsity, f"the model is already sparser than {sparsity}; "
                             "choose a higher target sparsity")
    return [sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:n_keep] for row in scores]  # type: ignore[misc]


LAYOUTS = ("global", "uniform")


def plan_for_sparsity(importance: Importance, sparsity: float,
                      base_units: tuple[int, int] | None = None, layout: str = "global") -> PruningPlan:
    """The candidate at ``sparsity``: the s-fraction least important heads and neurons removed.

    Args:
        importance: scores of the model being pruned.
        sparsity: fraction of heads and of neurons to remove, in [0, 1).
        base_units: (heads, neurons) of the original teacher when the model being pruned is already
            pruned (a TA pruned into the student): ``sparsity`` then stays relative to the teacher.
        layout: ``global`` ranks units across layers (the paper; layers end up with different widths);
            ``uniform`` keeps the same number in every layer, so a decoder's pruned config is a stock one
            (see ``minidisc export --format hf``).
    """
    s = check_sparsity(sparsity)
    if layout not in LAYOUTS:
        raise UserInputError("pruning.layout", layout, f"use one of {', '.join(LAYOUTS)}")
    bh, bn = base_units if base_units is not None else (None, None)
    keep = _keep_uniform if layout == "uniform" else _keep
    return PruningPlan(keep(importance.heads, s, bh), keep(importance.neurons, s, bn), s, {"layout": layout})


def prune_model(model: nn.Module, plan: PruningPlan, share_unpruned: bool = False, rebuild: bool = False) -> nn.Module:
    """A new model that keeps only ``plan``'s heads and neurons (in plan order); ``model`` is untouched.

    No copy of ``model`` is made: the new module tree first shares ``model``'s tensors, each layer's
    projections are then cut to the kept rows/columns (new, smaller tensors), and what was not cut
    (embeddings, norms, the head) is cloned, unless ``share_unpruned`` keeps it shared (a frozen
    candidate used only for inference). Peak memory is the teacher plus the candidate.
    """
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model) if plan.layers is None else plan.layers
    if len(plan.heads) != len(layers) or len(plan.neurons) != len(layers):
        raise ValueError(f"plan has {len(plan.heads)} layers, model has {len(layers)}")
    head_dim = adaptor.head_dim(model)
    tensors = [*model.parameters(), *model.buffers()]
    memo: dict[int, Any] = {id(t): t for t in tensors}
    new = copy.deepcopy(model, memo)  # the module tree only: every tensor is shared with ``model``
    if plan.layers is not None:  # depth first: the per-layer cuts below are of the kept layers
        keep_layers(new, plan.layers)
    for layer, heads, neurons in zip(adaptor.layers(new), plan.heads, plan.neurons, strict=True):
        adaptor.prune_layer(layer, heads, neurons, head_dim)
    if plan.hidden is not None and plan.hidden != list(range(hidden_width(model))):  # all of them in order: no cut
        cut_hidden(new, plan.hidden)
    if not rebuild:  # which of its source's layers and channels the cut keeps: what the hidden-state loss compares
        record_cut(new, plan.layers, plan.hidden if plan.hidden != list(range(hidden_width(model))) else None)
    if not share_unpruned:
        shared = {id(t) for t in tensors}
        clones: dict[int, nn.Parameter] = {}  # one clone per source tensor: tied weights stay tied
        for module in new.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in shared:
                    if id(param) not in clones:
                        clones[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                        record_source(clones[id(param)], param)
                    module._parameters[name] = clones[id(param)]
            for name, buf in list(module._buffers.items()):
                if buf is not None and id(buf) in shared:
                    module._buffers[name] = buf.clone()
    return new


def masked(model: nn.Module, plan: PruningPlan) -> list[Any]:
    """Attach 0/1 masks to ``model`` that silence what ``plan`` drops; returns hook handles to remove.

    The masked teacher computes what the pruned model computes (used to test pruning; the
    shared-weight sandwich strategy uses the cheaper :func:`sliced`).
    """
    adaptor = get_adaptor(model)
    heads, neurons = [], []
    for layer, kh, kn in zip(adaptor.layers(model), plan.heads, plan.neurons, strict=True):
        device = next(layer.parameters()).device
        hm = torch.zeros(adaptor.num_heads(layer), device=device)
        hm[list(kh)] = 1.0
        nm = torch.zeros(adaptor.num_neurons(layer), device=device)
        nm[list(kn)] = 1.0
        heads.append(hm)
        neurons.append(nm)
    return adaptor.attach_masks(model, heads, neurons)


@contextlib.contextmanager
def sliced(model: nn.Module, heads_per_layer: list[int], neurons_per_layer: list[int]) -> Iterator[nn.Module]:
    """Within the block ``model`` runs as its prefix sub-network (the first ``heads_per_layer[i]`` heads
    and ``neurons_per_layer[i]`` neurons of layer ``i``), on views of its own weights.

    This is the slimmable-network forward of the sandwich strategy: it costs what the narrow model
    costs and its gradients land in the shared weights. ``model`` must be ordered by importance (a
    ``prune_model`` result with the sparsity-0 plan) for the prefixes to be the candidates.
    """
    restore = get_adaptor(model).slice_widths(model, heads_per_layer, neurons_per_layer)
    try:
        yield model
    finally:
        restore()


def param_sparsity(prunable: int, reference_prunable: int) -> float:
    """The *parameter* sparsity: the fraction of the reference's prunable parameters (its transformer layers')
    that a model with ``prunable`` of them no longer has. What the lambda-tradeoff scores, reports and cards
    print; the *unit* sparsity (fraction of heads and FFN neurons removed, :meth:`PruningPlan.prefix`,
    :func:`plan_for_sparsity`) is what the grid, the plans and the CLI name."""
    return 1.0 - prunable / reference_prunable
