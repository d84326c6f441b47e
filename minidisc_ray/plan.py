"""``minidisc plan``: sizes, FLOPs and GPU memory of a job, from the architecture alone (no weights).

The teacher is instantiated on the meta device (shapes only, no memory, no download of weights) and
every candidate of the grid is cut from it with the same pruning code the job runs, using uniform
per-layer widths (the job's importance ranking moves units between layers but keeps their number).
From those shapes the plan derives:

* parameters (prunable and total) and forward FLOPs per token of every candidate, and the measured
  CPU latency of a forward pass where the model is small enough to build here;
* the memory per GPU of one search trial and of each chain stage (teacher -> TA, TA -> student, the
  direct-KD baseline) under DDP and under FSDP for ``N`` GPUs of a given memory, itemised into weights,
  gradients, optimiser state, the frozen teacher and activations at the configured batch and length;
* the smallest Ray Train ``ScalingConfig`` under which each stage fits.

Memory model (bytes per parameter of the trained model): fp32 master weights 4, fp32 gradients 4,
AdamW moments 8; FSDP divides all three by ``N``. The frozen teacher is held once per worker in bf16 (2
bytes per parameter) on GPU, as the chain does. Activations are those of a bf16 forward with
memory-efficient attention (no length-squared score matrix), per layer and token
``2 * (4h + 2q + 2kv + 4f)`` bytes (norm inputs and outputs, q/k/v and the attention output, gate, up,
activation and product of the MLP), plus the logits the KL term keeps (bf16 logits and three fp32
vocabulary-sized tensors per position), plus the teacher's kept hidden states. FSDP adds the
all-gathered bf16 weights of two layers (the one running and the one prefetched). A 10% margin is
kept for the CUDA context and the allocator. These are estimates: a real run's figure belongs in
``benchmarks/results``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minidisc_ray.errors import UserInputError
from minidisc_ray.modelio import check_architecture

GIB = 1024**3
KNOWN_CONFIGS = Path(__file__).parent / "known_configs"
HEADROOM = 0.9  # fraction of a GPU's memory a plan may fill


def known_config_path(hub_id: str) -> Path | None:
    """The bundled config.json of a well-known hub model (architecture numbers only), if we carry one."""
    path = KNOWN_CONFIGS / f"{hub_id.replace('/', '--')}.json"
    return path if path.is_file() else None


def load_architecture(spec: str, field: str = "teacher.model") -> Any:
    """A transformers config for ``spec``: a config.json file, a model directory, a GGUF file, ``minilm`` or
    ``smollm2``, or a hub id we carry the config of (no network, no weights)."""
    config = _read_architecture(spec, field)
    check_architecture(config, field, spec)
    return config


def _read_architecture(spec: str, field: str) -> Any:
    from transformers import AutoConfig

    from minidisc_ray.modelio import resolve_model

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
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
    known = known_config_path(spec)
    if known is not None and not path.exists():
        return _read_architecture(str(known), field)
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


@dataclass(frozen=True)
class Shape:
    """Numbers of one (possibly pruned) model that memory and FLOPs depend on."""

    params: int
    prunable: int
    layers: int
    hidden: int
    q_width: int  # total query width summed over layers (heads x head_dim)
    kv_width: int  # total key/value width summed over layers
    ffn: int  # total MLP / FFN width summed over layers
    vocab: int
    largest_layer: int  # parameters of the largest layer (FSDP all-gathers one at a time)


def _uniform(layers: int, keep: int) -> list[int]:
    base, extra = divmod(keep, layers)
    return [base + (1 if i < extra else 0) for i in range(layers)]


def _shape(model: Any, vocab: int) -> Shape:
    from minidisc_ray.families import count_params, get_adaptor, unit_counts

    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    prunable, total = count_params(model)
    width = adaptor.head_unit_width(model)
    head_dim = adaptor.head_dim(model)
    units, ffn = unit_counts(model)
    q, kv = units * width, units * head_dim  # a unit: a KV group of width/head_dim query heads (1 in encoders)
    largest = max((sum(p.numel() for p in x.parameters()) for x in layers), default=0)
    return Shape(total, prunable, len(layers), int(model.config.hidden_size), q, kv, ffn, vocab, largest)


def candidate_models(config: Any, kind: str, sparsities: list[float]) -> tuple[Any, dict[float, Any]]:
    """The teacher and one model per sparsity, all on the meta device, cut with uniform per-layer widths."""
    from minidisc_ray.families import unit_widths
    from minidisc_ray.modelio import empty_model
    from minidisc_ray.pruning import PruningPlan, prune_model

    teacher = empty_model(config, kind=kind)
    heads, neurons = unit_widths(teacher)
    out = {}
    for s in sparsities:
        h_keep = sum(heads) - int(round(s * sum(heads)))
        n_keep = sum(neurons) - int(round(s * sum(neurons)))
        plan = PruningPlan.prefix(_uniform(len(heads), h_keep), _uniform(len(heads), n_keep), s)
        out[s] = prune_model(teacher, plan, share_unpruned=True)
    return teacher, out


def flops_per_token(shape: Shape, context: int) -> float:
    """Forward FLOPs per token: 2 per weight of every matmul (the output layer included, embedding lookups
    excluded) plus attention scores and weighted sums over ``context`` positions."""
    matmul = shape.prunable + shape.vocab * shape.hidden  # layers + the output layer (tied or not)
    return 2.0 * matmul + 4.0 * context * shape.q_width


def activation_bytes(shape: Shape, tokens: int, lm: bool) -> float:
    """Activations kept for the backward pass of one micro-batch of ``tokens`` tokens (bf16)."""
    per_token = 2 * (4 * shape.hidden * shape.layers + 2 * shape.q_width + 2 * shape.kv_width + 4 * shape.ffn)
    logits = tokens * shape.vocab * (2 + 3 * 4) if lm else 0
    return float(per_token * tokens + logits)


def teacher_forward_bytes(shape: Shape, tokens: int, lm: bool) -> float:
    """What the frozen teacher's no-grad forward keeps: its logits and the hidden states the loss matches."""
    kept_hidden = min(shape.layers, 6) + 1
    logits = tokens * shape.vocab * (2 + 4) if lm else 0
    return float(tokens * shape.hidden * 2 * kept_hidden + logits)


def stage_memory(student: Shape, teacher: Shape, tokens: int, lm: bool, parallelism: str, n: int) -> dict[str, float]:
    """Bytes per GPU of training ``student`` against frozen ``teacher`` on ``n`` GPUs."""
    shard = n if parallelism == "fsdp" else 1
    mem = {
        "weights": 4.0 * student.params / shard,
        "gradients": 4.0 * student.params / shard,
        "optimizer": 8.0 * student.params / shard,
        "teacher": 2.0 * teacher.params,
        "activations": activation_bytes(student, tokens, lm) + teacher_forward_bytes(teacher, tokens, lm),
    }
    if parallelism == "fsdp" and n > 1:
        mem["fsdp_gather"] = 2.0 * 2 * student.largest_layer
    mem["total"] = sum(mem.values())
    return mem


def smallest_fit(student: Shape, teacher: Shape, tokens: int, lm: bool, gpus: int, gpu_bytes: float) -> dict[str, Any]:
    """The smallest worker count that fits, DDP first (no communication of weights), then FSDP."""
    for parallelism in ("ddp", "fsdp"):
        for n in range(1, gpus + 1):
            if parallelism == "ddp" and n > 1:
                break  # DDP memory does not fall with more workers
            total = stage_memory(student, teacher, tokens, lm, parallelism, n)["total"]
            if total <= HEADROOM * gpu_bytes:
                return {"fits": True, "parallelism": parallelism, "num_workers": n, "use_gpu": True,
                        "gib_per_gpu": round(total / GIB, 2),
                        "scaling_config": f"ScalingConfig(num_workers={n}, use_gpu=True)"}
    total = stage_memory(student, teacher, tokens, lm, "fsdp", gpus)["total"]
    return {"fits": False, "parallelism": "fsdp", "num_workers": gpus, "gib_per_gpu": round(total / GIB, 2),
            "scaling_config": None}


@torch.no_grad()
def materialise(model: Any, seed: int = 0) -> Any:
    """A real CPU copy of a meta-device model: random weights (N(0, 0.02)) and the model's own buffers.

    ``to_empty`` gives every tensor fresh uninitialised memory, buffers included: position and token-type
    ids would hold whatever the memory held (garbage embedding indices). The buffers are real in
    :func:`~minidisc_ray.modelio.empty_model`'s models, so they are copied back after it.
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
def cpu_latency_ms(model: Any, length: int, repeats: int = 3) -> float:
    """Median forward time (batch 1, ``length`` tokens) of a real copy of ``model``'s architecture."""
    real = materialise(model)
    real.eval()
    ids = torch.randint(0, int(real.config.vocab_size), (1, length))
    real(input_ids=ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        real(input_ids=ids)
        times.append((time.perf_counter() - t0) * 1000)
    return float(sorted(times)[len(times) // 2])


def make_plan(config: Any, kind: str, grid: list[float], student_sparsity: float, length: int, trial_batch: int,
              distill_batch: int, gpus: int, gpu_gib: float, latency_max_params: int = 200_000_000,
              source: str = "") -> dict[str, Any]:
    """The whole plan as plain data (see the module docstring)."""
    t0 = time.perf_counter()
    lm = kind == "lm"
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    sparsities = sorted({0.0, *grid, student_sparsity})
    teacher_model, models = candidate_models(config, kind, [s for s in sparsities if s > 0])
    models[0.0] = teacher_model
    shapes = {s: _shape(m, vocab) for s, m in models.items()}
    teacher = shapes[0.0]
    gpu_bytes = gpu_gib * GIB
    rows = []
    for s in sparsities:
        sh = shapes[s]
        role = "teacher" if s == 0.0 else ("student" if s == student_sparsity else "candidate")
        row: dict[str, Any] = {"sparsity": s, "role": role, "params": sh.params, "prunable": sh.prunable,
                               "gflops_per_token": round(flops_per_token(sh, length) / 1e9, 4)}
        if sh.params <= latency_max_params:
            row["cpu_latency_ms"] = round(cpu_latency_ms(models[s], length), 2)
        if role == "candidate":
            trial = stage_memory(sh, teacher, trial_batch * length, lm, "ddp", 1)
            row["trial_gib"] = round(trial["total"] / GIB, 2)
            row["trial_fits_one_gpu"] = trial["total"] <= HEADROOM * gpu_bytes
        rows.append(row)
    candidates = [s for s in grid if s != student_sparsity and s > 0]
    ta = shapes[min(candidates)] if candidates else teacher  # the largest TA the search could choose
    student = shapes[student_sparsity]
    tokens = distill_batch * length
    stages = {}
    for name, trained, frozen in (("teacher_to_assistant", ta, teacher), ("assistant_to_student", student, ta),
                                  ("direct_kd", student, teacher)):
        per = {p: {k: round(v / GIB, 3) for k, v in stage_memory(trained, frozen, tokens, lm, p, gpus).items()}
               for p in ("ddp", "fsdp")}
        stages[name] = {"trained_params": trained.params, "frozen_params": frozen.params,
                        f"gib_per_gpu_on_{gpus}": per, "smallest": smallest_fit(trained, frozen, tokens, lm, gpus,
                                                                                 gpu_bytes)}
    worst_trial = max((r for r in rows if r["role"] == "candidate"), key=lambda r: r["trial_gib"], default=None)
    return {
        "source": source, "model_type": getattr(config, "model_type", None), "kind": kind,
        "teacher_params": teacher.params, "teacher_params_billions": round(teacher.params / 1e9, 3),
        "sequence_length": length, "trial_batch": trial_batch, "distill_batch_per_worker": distill_batch,
        "gpus": gpus, "gpu_gib": gpu_gib, "candidates": rows,
        "search_trial": {"largest_candidate_gib": worst_trial["trial_gib"] if worst_trial else None,
                         "all_fit_one_gpu": all(r.get("trial_fits_one_gpu", True) for r in rows),
                         "note": "a trial trains one candidate on one GPU (search.trial_gpus: 1)"},
        "chain": stages, "assumptions": "bf16 teacher per worker, fp32 AdamW student, bf16 activations with "
        f"memory-efficient attention, {int(HEADROOM * 100)}% of GPU memory usable; TA sized as the grid's "
        "least sparse candidate",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def render(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text for a terminal."""
    lines = [f"{plan['source']}: {plan['model_type']} ({plan['kind']}), teacher {plan['teacher_params'] / 1e9:.3f}B "
             f"parameters; length {plan['sequence_length']}, {plan['gpus']} x {plan['gpu_gib']:g} GiB GPUs",
             f"{'sparsity':>8} {'role':>9} {'params':>14} {'GFLOP/tok':>10} {'CPU ms':>8} {'trial GiB':>10}"]
    for r in plan["candidates"]:
        ms = f"{r['cpu_latency_ms']:.1f}" if "cpu_latency_ms" in r else "-"
        flag = "" if r.get("trial_fits_one_gpu", True) else " (!)"
        trial = f"{r['trial_gib']:.1f}{flag}" if "trial_gib" in r else "-"
        lines.append(f"{r['sparsity']:>8.2f} {r['role']:>9} {r['params']:>14,} {r['gflops_per_token']:>10.3f} "
                     f"{ms:>8} {trial:>10}")
    for name, st in plan["chain"].items():
        sm = st["smallest"]
        fit = (f"fits: {sm['parallelism']} x {sm['num_workers']} GPU ({sm['gib_per_gpu']} GiB each)" if sm["fits"]
               else f"does not fit on {plan['gpus']} GPUs ({sm['gib_per_gpu']} GiB each under FSDP)")
        lines.append(f"{name:>22}: {fit}")
    if not plan["search_trial"]["all_fit_one_gpu"]:
        lines.append("(!) a search trial of that candidate needs more than one GPU's memory")
    lines.append(f"planned in {plan['seconds']} s")
    return "\n".join(lines)


def check_gpus(gpus: int, gpu_gib: float) -> None:
    if gpus < 1:
        raise UserInputError("--gpus", gpus, "use 1 or more GPUs")
    if not (math.isfinite(gpu_gib) and gpu_gib > 0):
        raise UserInputError("--gpu-memory", gpu_gib, "give the memory of one GPU in GiB, e.g. 80")
