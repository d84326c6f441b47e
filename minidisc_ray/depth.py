"""Depth pruning: remove whole layers, alone or after width pruning (as NVIDIA's Minitron does).

A layer's importance is how much it changes the residual stream: one minus the cosine similarity of its
input and output hidden states, averaged over the non-padding tokens of a small sample (the "block
importance" of ShortGPT and Minitron's depth ranking; ~1k samples in Minitron). Layers that barely turn
the stream are the ones whose removal costs least. :func:`drop_layers` returns a new model without them
(the layer list, ``num_hidden_layers``, per-layer ``layer_types`` and the attention ``layer_idx`` of a
decoder's KV cache renumbered); :func:`skipping` runs the original with those layers made the identity,
which is what the smaller model must compute exactly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from minidisc_ray.axes import CUT_ATTR, keep_layers, record_cut
from minidisc_ray.engine import scan_batches
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import get_adaptor


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     max_samples: int | None = None) -> list[float]:
    """Per layer, the mean over non-padding tokens of ``1 - cos(input, output)`` of its hidden states."""
    layers = list(get_adaptor(model).layers(model))
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0.0
    current: dict[str, torch.Tensor] = {}

    def hook(i: int) -> Any:
        def fn(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            cos = torch.nn.functional.cosine_similarity(x.float(), _hidden(out).float(), dim=-1)
            totals[i] += float(((1 - cos) * current["mask"]).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def step(batch: dict[str, torch.Tensor]) -> None:
        nonlocal count
        current["mask"] = batch["attention_mask"].float()
        model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        count += float(current["mask"].sum())

    scan_batches(model, batches, max_samples, handles, step)  # pruning's loop: eval mode, device, hooks removed after
    return [float(t / max(count, 1.0)) for t in totals]


def layers_to_drop(importance: list[float], n: int, field: str = "pruning.depth") -> list[int]:
    """The ``n`` least important layers (ascending indices); at least one layer is always kept."""
    if not 0 <= n < len(importance):
        raise UserInputError(field, n, f"remove 0 to {len(importance) - 1} of the model's {len(importance)} layers")
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    return sorted(order[:n])


def drop_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """A new model without the layers ``drop`` (indices into the current layers); ``model`` is unchanged."""
    total = len(get_adaptor(model).layers(model))
    if any(not 0 <= i < total for i in drop) or len(set(drop)) >= total:
        raise ValueError(f"cannot drop layers {drop} of {total}")
    out = copy.deepcopy(model)
    keep = [i for i in range(total) if i not in set(drop)]
    keep_layers(out, keep)
    before = getattr(out.config, CUT_ATTR, None) or {}
    record_cut(out, keep if before.get("layers") is None else [before["layers"][i] for i in keep], before.get("hidden"))
    return out


@contextlib.contextmanager
def skipping(model: nn.Module, drop: list[int]) -> Iterator[nn.Module]:
    """``model`` with the layers ``drop`` turned into the identity (their output replaced by their input)."""
    layers = list(get_adaptor(model).layers(model))

    def identity(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in drop]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
