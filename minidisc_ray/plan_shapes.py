"""Architectures and candidate shapes for ``minidisc plan``: a teacher's config read without its weights, the
candidates cut from it on the meta device, the numbers memory and FLOPs depend on, and a CPU forward's latency.

The teacher is instantiated on the meta device (shapes only, no memory, no download of weights) and every
candidate of the grid is cut from it with the same pruning code the job runs, using uniform per-layer widths (the
job's importance ranking moves units between layers but keeps their number).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from minidisc_ray.errors import UserInputError
from minidisc_ray.families import count_params, get_adaptor, unit_counts, unit_widths
from minidisc_ray.modelio.locate import check_architecture, config_of, resolve_model
from minidisc_ray.modelio.weights import empty_model
from minidisc_ray.plan_memory import Shape
from minidisc_ray.pruning import PruningPlan, prune_model

KNOWN_CONFIGS = Path(__file__).parent / "known_configs"


def known_config_path(hub_id: str) -> Path | None:
    """The bundled config.json of a well-known hub model (architecture numbers only), if we carry one."""
    path = KNOWN_CONFIGS / f"{hub_id.replace('/', '--')}.json"
    return path if path.is_file() else None


def load_architecture(spec: str, field: str = "teacher.model") -> PretrainedConfig:
    """A transformers config for ``spec``: a config.json file, a model directory, a GGUF file, ``minilm`` or
    ``smollm2``, or a hub id we carry the config of (no network, no weights)."""
    config = _read_architecture(spec, field)
    check_architecture(config, field, spec)
    return config


def _read_architecture(spec: str, field: str) -> PretrainedConfig:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _read_config_json(path, spec, field)
    known = known_config_path(spec)
    if known is not None and not path.exists():
        return _read_architecture(str(known), field)
    return _read_model_config(spec, field)


def _read_config_json(path: Path, spec: str, field: str) -> PretrainedConfig:
    """A transformers config.json file (at most 4 MiB, architectures transformers ships)."""
    try:
        if path.stat().st_size > 1 << 22:
            raise ValueError("over 4 MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not an object")
        if data.get("auto_map"):
            raise UserInputError(field, spec, "the config names its own model code (auto_map); minidisc-ray "
                                 "plans only architectures transformers ships")
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except UserInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserInputError(field, spec, f"not a transformers config.json ({type(exc).__name__}); give a "
                             "config.json with model_type, or a model directory") from None


def _read_model_config(spec: str, field: str) -> PretrainedConfig:
    """The config of a local model directory, a GGUF file or an embedded model (``minilm``, ``smollm2``)."""
    where = resolve_model(spec, field)
    p = Path(where)
    if not p.exists():
        raise UserInputError(field, spec, "no local config for this hub id; pass the model's config.json "
                             "(minidisc plan path/to/config.json) or a local model directory")
    try:
        if p.is_file():  # GGUF: the metadata holds the architecture
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoConfig.from_pretrained(where)
    except Exception as exc:  # noqa: BLE001 - a broken or foreign file: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserInputError(field, spec, f"could not read the architecture ({type(exc).__name__}: {first}); give "
                             "a transformers config.json, a model directory or a GGUF file") from None


def _uniform(layers: int, keep: int) -> list[int]:
    base, extra = divmod(keep, layers)
    return [base + (1 if i < extra else 0) for i in range(layers)]


def model_shape(model: nn.Module, vocab: int) -> Shape:
    """The numbers of ``model`` (on the meta device or not) that memory and FLOPs depend on."""
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    prunable, total = count_params(model)
    width = adaptor.head_unit_width(model)
    head_dim = adaptor.head_dim(model)
    units, ffn = unit_counts(model)
    q, kv = units * width, units * head_dim  # a unit: a KV group of width/head_dim query heads (1 in encoders)
    largest = max((sum(p.numel() for p in x.parameters()) for x in layers), default=0)
    return Shape(total, prunable, len(layers), int(config_of(model).hidden_size), q, kv, ffn, vocab, largest)


def uniform_cut(model: nn.Module, sparsity: float, share_unpruned: bool = False) -> nn.Module:
    """``model`` cut to unit sparsity ``sparsity`` with the same number of heads and neurons removed from
    every layer (the first units kept): the shape the plan assumes for a candidate of that sparsity."""
    heads, neurons = unit_widths(model)
    h_keep = sum(heads) - int(round(sparsity * sum(heads)))
    n_keep = sum(neurons) - int(round(sparsity * sum(neurons)))
    plan = PruningPlan.prefix(_uniform(len(heads), h_keep), _uniform(len(heads), n_keep), sparsity)
    return prune_model(model, plan, share_unpruned=share_unpruned)


def candidate_models(config: PretrainedConfig, kind: str,
                     sparsities: list[float]) -> tuple[nn.Module, dict[float, nn.Module]]:
    """The teacher and one model per sparsity, all on the meta device, cut with uniform per-layer widths."""
    teacher = empty_model(config, kind=kind)
    return teacher, {s: uniform_cut(teacher, s, share_unpruned=True) for s in sparsities}


@torch.no_grad()
def materialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A real CPU copy of a meta-device model: random weights (N(0, 0.02)) and the model's own buffers.

    ``to_empty`` gives every tensor fresh uninitialised memory, buffers included: position and token-type
    ids would hold whatever the memory held (garbage embedding indices). The buffers are real in
    :func:`~minidisc_ray.modelio.weights.empty_model`'s models, so they are copied back after it.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    missing = [name for name, b in model.named_buffers() if b.is_meta]
    if missing:
        raise RuntimeError(f"buffer {missing[0]} has no value to materialise")
    real = copy.deepcopy(model).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for p in real.parameters():
        if p.is_floating_point():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
    for name, b in real.named_buffers():
        b.copy_(buffers[name])
    return real


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, length: int, repeats: int = 3) -> float:
    """Median forward time (batch 1, ``length`` tokens) of a real copy of ``model``'s architecture."""
    real = materialise(model)
    real.eval()
    ids = torch.randint(0, int(config_of(real).vocab_size), (1, length))
    real(input_ids=ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        real(input_ids=ids)
        times.append((time.perf_counter() - t0) * 1000)
    return float(sorted(times)[len(times) // 2])
