"""Candidates by budget: the architectures a cut of the teacher can take on the axes pruned, what each costs, and
the one kept per budget by a cheap score (Minitron's search space; the distillation of the few best is then the
search strategies' work, on Ray).

An architecture (:class:`Arch`) is uniform: ``layers`` layers of ``units`` heads (KV groups in a decoder) and
``ffn`` neurons over a residual stream of ``hidden`` channels. Its parameters come from :class:`CostModel`,
exact and cheap: a uniform cut's parameter count is affine in its layer count, and a layer's is affine in its
units and neurons for a given hidden width (every projection is linear in each), so four meta-device cuts
per hidden width give every count. A budget is the fraction of the teacher's *total* parameters (embeddings
included) removed (``params``), of its forward FLOPs per token (``flops``), or of its measured CPU latency
(``latency``, models up to :data:`LATENCY_MAX_PARAMS`).

:func:`architectures` enumerates, for one budget, every (depth, hidden) the axes and limits allow and the
smallest head/FFN cut (one unit sparsity for both, as the grid's) that brings it within budget;
:func:`rank` orders them by the cut teacher's distillation loss on held rows (no training) and
:func:`plan_for_arch` turns one into the :class:`~minidisc_ray.pruning.PruningPlan` of the real teacher, from
its importance scores: the most important layers (:func:`minidisc_ray.depth.layer_importance`), channels
(:func:`minidisc_ray.axes.channel_importance`), heads and neurons.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minidisc_ray.axes import AXES, channel_importance, hidden_width, keep_channels
from minidisc_ray.depth import layer_importance
from minidisc_ray.engine import model_device, to_device
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import get_adaptor, unit_widths
from minidisc_ray.modelio.locate import config_of, kind_of
from minidisc_ray.modelio.weights import empty_model
from minidisc_ray.plan_shapes import cpu_latency_ms
from minidisc_ray.pruning import Importance, PruningPlan, compute_importance, prune_model

BUDGETS = ("params", "flops", "latency")
LATENCY_MAX_PARAMS = 200_000_000


@dataclass(frozen=True)
class Arch:
    """One uniform architecture and its cost (``units`` is the layers' heads, or their key/value groups in a
    decoder, each of the teacher's group size)."""

    layers: int
    hidden: int
    units: int  # heads (encoders) or key/value groups (decoders) per layer
    ffn: int  # neurons per layer
    params: int
    flops: float  # forward FLOPs per token at the context length the cost model was made for
    unit_sparsity: float = 0.0  # the head/FFN cut that brought it within budget

    def text(self) -> str:
        return f"{self.layers} layers, hidden {self.hidden}, {self.units} heads/groups, FFN {self.ffn}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_axes(axes: Sequence[str], field: str = "pruning.axes") -> tuple[str, ...]:
    """The axes, validated: a non-empty subset of heads, ffn, hidden, depth."""
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise UserInputError(field, ",".join(axes) if axes else axes, f"use any of {', '.join(AXES)}, e.g. "
                             "heads,ffn,hidden,depth")
    return tuple(a for a in AXES if a in axes)


def _on_meta(model: Any) -> Any:
    """``model``'s architecture on the meta device (itself when it is there already): cuts of it cost no memory."""
    if all(p.is_meta for p in model.parameters()):
        return model
    config = config_of(model)
    width = hidden_width(model)
    return empty_model(config, *unit_widths(model), kind=kind_of(model),
                       hidden=width if width != int(config.hidden_size) else None)


class CostModel:
    """Parameters and forward FLOPs per token of every uniform cut of ``teacher`` (on the meta device or not)."""

    def __init__(self, teacher: Any, context: int = 128) -> None:
        adaptor = get_adaptor(teacher)
        units, neurons = unit_widths(teacher)
        self.teacher, self.context = _on_meta(teacher), context
        # uniform shapes within every layer (a model pruned with the global layout has layers of unequal widths)
        self.L, self.H, self.U, self.N = len(units), hidden_width(teacher), min(units), min(neurons)
        self.unit_width = adaptor.head_unit_width(teacher)
        self.vocab = int(teacher.get_input_embeddings().weight.shape[0])
        self._per_hidden: dict[int, tuple[int, int, int, int]] = {}
        self.total = sum(p.numel() for p in teacher.parameters())

    def _cut(self, layers: int, hidden: int, units: int, ffn: int) -> nn.Module:
        plan = PruningPlan([list(range(units))] * layers, [list(range(ffn))] * layers,
                           hidden=list(range(hidden)), layers=list(range(layers)))
        with warnings.catch_warnings():  # a cut to zero units builds zero-size layers on purpose
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return prune_model(self.teacher, plan, share_unpruned=True, rebuild=True)

    def _count(self, layers: int, hidden: int, units: int, ffn: int) -> int:
        return sum(p.numel() for p in self._cut(layers, hidden, units, ffn).parameters())

    def _coefficients(self, hidden: int) -> tuple[int, int, int, int]:
        """(the parameters outside the layers, a full-width layer's, one unit's, one neuron's) at ``hidden``."""
        if hidden not in self._per_hidden:
            cut = self._cut(1, hidden, self.U, self.N)
            one = sum(p.numel() for p in cut.parameters())
            (only,) = get_adaptor(cut).layers(cut)
            layer = sum(p.numel() for p in only.parameters())
            unit = one - self._count(1, hidden, self.U - 1, self.N)
            neuron = one - self._count(1, hidden, self.U, self.N - 1)
            self._per_hidden[hidden] = (one - layer, layer, unit, neuron)
        return self._per_hidden[hidden]

    def layer_params(self, hidden: int, units: int, ffn: int) -> int:
        _, layer, unit, neuron = self._coefficients(hidden)
        return layer - (self.U - units) * unit - (self.N - ffn) * neuron

    def params(self, layers: int, hidden: int, units: int, ffn: int) -> int:
        base = self._coefficients(hidden)[0]
        return base + layers * self.layer_params(hidden, units, ffn)

    def flops(self, layers: int, hidden: int, units: int, ffn: int) -> float:
        """Forward FLOPs per token: 2 per weight of the layers' matmuls and of an output layer over the
        vocabulary, plus attention over ``context`` positions (as :func:`minidisc_ray.plan_memory.flops_per_token`)."""
        return (2.0 * (layers * self.layer_params(hidden, units, ffn) + self.vocab * hidden)
                + 4.0 * self.context * layers * units * self.unit_width)

    def arch(self, layers: int, hidden: int, units: int, ffn: int, unit_sparsity: float = 0.0) -> Arch:
        return Arch(layers, hidden, units, ffn, self.params(layers, hidden, units, ffn),
                    self.flops(layers, hidden, units, ffn), unit_sparsity)


@dataclass(frozen=True)
class Limits:
    """How far the enumeration may go on each axis (``pruning.limits``)."""

    min_layers: float = 0.5  # fraction of the teacher's layers kept, at least
    min_hidden: float = 0.5  # fraction of the teacher's hidden size kept, at least
    hidden_step: int = 0  # hidden sizes tried: multiples of this (0: a sixteenth of the teacher's, rounded to 8)
    max_unit_sparsity: float = 0.95


def _hidden_options(cost: CostModel, axes: Sequence[str], limits: Limits) -> list[int]:
    if "hidden" not in axes:
        return [cost.H]
    step = limits.hidden_step or max(8, (cost.H // 16) // 8 * 8)
    low = max(step, math.ceil(cost.H * limits.min_hidden))
    return sorted({cost.H, *range(cost.H - cost.H % step, low - 1, -step)} - {0}, reverse=True)


def _depth_options(cost: CostModel, axes: Sequence[str], limits: Limits) -> list[int]:
    if "depth" not in axes:
        return [cost.L]
    return list(range(cost.L, max(1, math.ceil(cost.L * limits.min_layers)) - 1, -1))


def architectures(cost: CostModel, budget: float, axes: Sequence[str], limits: Limits = Limits(),
                  measure: str = "params", price: Callable[[Arch], float] | None = None) -> list[Arch]:
    """Every uniform architecture the ``axes`` reach within ``budget`` (the fraction of the teacher's cost
    removed, by ``measure``): each (depth, hidden) option with the smallest head/FFN cut that brings it within
    budget; options that cannot be brought within it are left out. ``latency`` ranks by parameters here (the
    measured latency of the kept ones is :func:`cpu_latency`)."""
    axes = check_axes(axes)
    if not 0.0 <= budget < 1.0:
        raise UserInputError("pruning.grid", budget, "use budgets in [0, 1), the fraction of the teacher removed")
    if measure not in BUDGETS:
        raise UserInputError("pruning.budget", measure, f"use one of {', '.join(BUDGETS)}")
    if measure == "latency" and price is None:
        raise ValueError("a latency budget needs a price (LatencyModel.ms)")
    cost_of: Callable[[Arch], float] = (price if measure == "latency" and price is not None
                                        else (lambda a: a.flops) if measure == "flops" else (lambda a: float(a.params)))
    target = (1.0 - budget) * cost_of(cost.arch(cost.L, cost.H, cost.U, cost.N))
    out = []
    for layers in _depth_options(cost, axes, limits):
        for hidden in _hidden_options(cost, axes, limits):
            for step in range(int(limits.max_unit_sparsity * 200) + 1):
                s = step / 200
                units = cost.U - int(round(s * cost.U)) if "heads" in axes else cost.U
                ffn = cost.N - int(round(s * cost.N)) if "ffn" in axes else cost.N
                if units < 1 or ffn < 1:
                    break
                a = cost.arch(layers, hidden, units, ffn, s if {"heads", "ffn"} & set(axes) else 0.0)
                if cost_of(a) <= target:
                    out.append(a)
                    break
                if not {"heads", "ffn"} & set(axes):
                    break
    return out


def _top(scores: Sequence[float], n: int) -> list[int]:
    """The ``n`` highest-scoring indices, most important first."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:n]


def plan_for_arch(importance: Importance, channels: Sequence[float] | None, layer_scores: Sequence[float] | None,
                  arch: Arch, teacher_layers: int, sparsity: float = 0.0) -> PruningPlan:
    """The cut of the teacher to ``arch``: its most important layers (``layer_scores``, 1 - cos of each layer's
    input and output), channels (``channels``) and, in every kept layer, heads and neurons (``importance``)."""
    if arch.layers < teacher_layers:
        if layer_scores is None:
            raise ValueError("a depth cut needs the layers' importance")
        keep = sorted(sorted(range(teacher_layers), key=lambda i: (-layer_scores[i], i))[:arch.layers])
    else:
        keep = list(range(teacher_layers))
    heads = [_top(importance.heads[i], arch.units) for i in keep]
    neurons = [_top(importance.neurons[i], arch.ffn) for i in keep]
    hidden = None
    width = len(channels) if channels is not None else arch.hidden
    if arch.hidden < width:
        if channels is None:
            raise ValueError("a hidden cut needs the channels' importance")
        hidden = keep_channels(channels, arch.hidden)
    return PruningPlan(heads, neurons, sparsity, {"layout": "uniform", "arch": arch.to_dict()}, hidden=hidden,
                       layers=keep if arch.layers < teacher_layers else None)


TEACHER_CACHE_BYTES = 2**30  # the teacher's log-probabilities on the held rows are kept when they fit in this


@torch.no_grad()
def teacher_log_probs(teacher: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                      limit: int = TEACHER_CACHE_BYTES) -> list[torch.Tensor] | None:
    """The teacher's output log-probabilities on ``batches``, computed once for every shape :func:`rank` scores,
    or None when they would take more than ``limit`` bytes (a large vocabulary: each shape then runs the
    teacher again)."""
    device = model_device(teacher)
    out, size = [], 0
    for batch in batches:
        inputs = {k: v for k, v in to_device(batch, device).items() if k != "labels"}
        logp = F.log_softmax(teacher(**inputs).logits.float(), -1)
        size += logp.numel() * logp.element_size()
        if size > limit:
            return None
        out.append(logp)
    return out


@torch.no_grad()
def distillation_loss(teacher: nn.Module, student: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                      teacher_logp: Sequence[torch.Tensor] | None = None) -> float:
    """Mean KL(teacher || student) of the output distributions over ``batches`` (per row; per non-padding
    token for a language model): how much the cut changed what the model says, before any training.
    ``teacher_logp``: the teacher's log-probabilities on the same batches (:func:`teacher_log_probs`), if known."""
    device = model_device(teacher)
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        inputs = {k: v for k, v in to_device(batch, device).items() if k != "labels"}
        t_logp = teacher_logp[i] if teacher_logp is not None else F.log_softmax(teacher(**inputs).logits.float(), -1)
        s = student(**inputs).logits.float()
        kl = (t_logp.exp() * (t_logp - F.log_softmax(s, -1))).sum(-1)
        if kl.dim() == 2 and "attention_mask" in inputs:  # per token: padding left out
            mask = inputs["attention_mask"].float()
            total, count = total + float((kl * mask).sum()), count + float(mask.sum())
        else:
            total, count = total + float(kl.sum()), count + float(kl.numel())
    return max(0.0, total / max(count, 1.0))  # a KL, never below 0 but for rounding


def rank(teacher: nn.Module, archs: Sequence[Arch], importance: Importance, channels: Sequence[float] | None,
         layer_scores: Sequence[float] | None, held: Sequence[dict[str, torch.Tensor]]) -> list[tuple[Arch, float]]:
    """``archs`` with the distillation loss of the teacher cut to each on the ``held`` batches, lowest first."""
    layers = len(get_adaptor(teacher).layers(teacher))
    cached = teacher_log_probs(teacher, held) if len(archs) > 1 else None
    scored = []
    for a in archs:
        cut = prune_model(teacher, plan_for_arch(importance, channels, layer_scores, a, layers), share_unpruned=True)
        scored.append((a, distillation_loss(teacher, cut, held, cached)))
    return sorted(scored, key=lambda x: (x[1], -x[0].params))


class LatencyModel:
    """Measured CPU latency of a forward pass (batch 1) as ``a + b * FLOPs + c * layers``, fitted on a few cuts
    built and timed here: depth buys latency that parameters and FLOPs do not show (each layer's fixed cost)."""

    def __init__(self, cost: CostModel, length: int, samples: int = 6) -> None:
        if cost.total > LATENCY_MAX_PARAMS:
            raise UserInputError("pruning.budget", "latency", f"the teacher has {cost.total:,} parameters, more than "
                                 f"the {LATENCY_MAX_PARAMS:,} this machine times; use params or flops")
        picks = [(cost.L, cost.H, cost.U, cost.N)]
        for i in range(1, samples):  # spread over depth, width and units
            f = i / samples
            picks.append((max(1, round(cost.L * (1 - 0.5 * f))), max(8, int(cost.H * (1 - 0.5 * ((i * 2) % 3) / 2))),
                          max(1, round(cost.U * (1 - 0.8 * f))), max(1, round(cost.N * (1 - 0.8 * f)))))
        rows, times = [], []
        for layers, hidden, units, ffn in picks:
            plan = PruningPlan([list(range(units))] * layers, [list(range(ffn))] * layers,
                               hidden=list(range(hidden)), layers=list(range(layers)))
            model = prune_model(cost.teacher, plan, share_unpruned=True)
            rows.append([1.0, cost.flops(layers, hidden, units, ffn), float(layers)])
            times.append(cpu_latency_ms(model, length))
        solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                      torch.tensor(times, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
        self.a, self.b, self.c = (float(x) for x in solution)
        self.measured = [{"shape": list(p), "ms": round(t, 3)} for p, t in zip(picks, times, strict=True)]

    def ms(self, a: Arch) -> float:
        return self.a + self.b * a.flops + self.c * a.layers


Batches = Sequence[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ShapeSpec:
    """How a job cuts by budget (``pruning.axes`` with hidden or depth): the axes, what a budget measures, the
    limits, the cheap score's context length, and the teacher's cost in that measure (what a budget is a fraction
    of, also when the model being cut is an assistant)."""

    axes: tuple[str, ...]
    measure: str = "params"
    limits: Limits = Limits()
    context: int = 128
    teacher_cost: float = 0.0


def cost_in(cost: CostModel, measure: str) -> float:
    """The model's own cost in ``measure`` (latency: FLOPs, which :class:`LatencyModel` then calibrates)."""
    return float(cost.total) if measure == "params" else cost.arch(cost.L, cost.H, cost.U, cost.N).flops


Chosen = dict[float, tuple[PruningPlan, list[tuple[Arch, float]]]]


def budget_plans(model: nn.Module, importance: Importance, sample: Batches, held: Batches, budgets: Sequence[float],
                 spec: ShapeSpec, field: str = "pruning.grid") -> Chosen:
    """For each budget (a fraction of ``spec.teacher_cost`` removed; of ``model``'s own cost when that is 0), the
    plan of the shape of least distillation loss on ``held`` among those the axes reach, and every shape scored."""
    axes = check_axes(spec.axes)
    channels = channel_importance(model, sample) if "hidden" in axes else None
    layer_scores = layer_importance(model, sample) if "depth" in axes else None
    cost = CostModel(model, spec.context)
    own = cost_in(cost, "flops" if spec.measure == "latency" else spec.measure)
    lat = LatencyModel(cost, spec.context) if spec.measure == "latency" else None
    out = {}
    for b in budgets:
        # the budget as a fraction of this model (an assistant: of the teacher's cost); a model already within it
        # (relative <= 0) keeps its own shape as one of the options
        relative = max(0.0, 1.0 - (1.0 - b) * (spec.teacher_cost or own) / own)
        archs = architectures(cost, relative, axes, spec.limits, spec.measure, lat.ms if lat is not None else None)
        if not archs:
            raise UserInputError(field, b, f"no shape on the axes {','.join(axes)} fits this budget within "
                                 "pruning.min_layers and pruning.min_hidden; lower them, add an axis or lower the "
                                 "budget")
        ranked = rank(model, archs, importance, channels, layer_scores, held)
        out[b] = (plan_for_arch(importance, channels, layer_scores, ranked[0][0], cost.L, b), ranked)
    return out


def choose_cut(teacher: nn.Module, sample: Batches, held: Batches, budget: float, axes: Sequence[str],
               measure: str = "params", importance: str = "gradient", limits: Limits = Limits(),
               context: int = 128) -> tuple[nn.Module, PruningPlan, list[tuple[Arch, float]]]:
    """The teacher cut to the architecture that keeps the most of it (lowest distillation loss on ``held``)
    among those the ``axes`` reach within ``budget``; the plan, and every architecture with its loss."""
    imp = compute_importance(teacher, sample, method=importance)
    (plan, ranked), = budget_plans(teacher, imp, sample, held, [budget],
                                   ShapeSpec(tuple(axes), measure, limits, context)).values()
    return prune_model(teacher, plan), plan, ranked


SHAPE_KEYS = ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim")


def parse_shape(spec: str, cost: CostModel, field: str = "--shape") -> Arch:
    """``layers=16,hidden=3072,ffn=9216,heads=32,kv_heads=8,head_dim=128`` (any subset: the rest the teacher's)
    as an :class:`Arch` of the teacher ``cost`` models. Pruning never changes the head size nor a decoder's group
    size, so ``head_dim`` must be the teacher's and ``heads`` a multiple of its group size."""
    values: dict[str, int] = {}
    for part in (p for p in spec.split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key.strip() not in SHAPE_KEYS or not value.strip().isdigit() or int(value) < 1:
            raise UserInputError(field, spec, f"use KEY=POSITIVE_INT pairs with keys {', '.join(SHAPE_KEYS)}, e.g. "
                                 "layers=16,hidden=3072")
        values[key.strip()] = int(value)
    teacher = cost.teacher
    adaptor = get_adaptor(teacher)
    head_dim, group = adaptor.head_dim(teacher), adaptor.head_unit_width(teacher) // adaptor.head_dim(teacher)
    if values.get("head_dim", head_dim) != head_dim:
        raise UserInputError(field, spec, f"head_dim must stay the teacher's {head_dim}: pruning keeps whole heads")
    units = values.get("kv_heads", values.get("heads", cost.U * group) // group)
    if "heads" in values and values["heads"] != units * group:
        raise UserInputError(field, spec, f"heads must be kv_heads x {group} (the teacher's group size)")
    layers, hidden, ffn = values.get("layers", cost.L), values.get("hidden", cost.H), values.get("ffn", cost.N)
    for name, got, most in (("layers", layers, cost.L), ("hidden", hidden, cost.H),
                            ("heads", units * group, cost.U * group), ("ffn", ffn, cost.N)):
        if got > most:
            raise UserInputError(field, spec, f"{name}={got} is more than the teacher's {most}")
    return cost.arch(layers, hidden, units, ffn)
