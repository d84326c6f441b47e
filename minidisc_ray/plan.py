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
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from minidisc_ray.errors import UserInputError
from minidisc_ray.families import count_params, get_adaptor, unit_counts, unit_widths
from minidisc_ray.losses import hidden_layer_indices
from minidisc_ray.modelio.locate import check_architecture, resolve_model
from minidisc_ray.modelio.weights import empty_model
from minidisc_ray.pruning import PruningPlan, prune_model

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
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    prunable, total = count_params(model)
    width = adaptor.head_unit_width(model)
    head_dim = adaptor.head_dim(model)
    units, ffn = unit_counts(model)
    q, kv = units * width, units * head_dim  # a unit: a KV group of width/head_dim query heads (1 in encoders)
    largest = max((sum(p.numel() for p in x.parameters()) for x in layers), default=0)
    return Shape(total, prunable, len(layers), int(model.config.hidden_size), q, kv, ffn, vocab, largest)


def uniform_cut(model: Any, sparsity: float, share_unpruned: bool = False) -> Any:
    """``model`` cut to unit sparsity ``sparsity`` with the same number of heads and neurons removed from
    every layer (the first units kept): the shape the plan assumes for a candidate of that sparsity."""
    heads, neurons = unit_widths(model)
    h_keep = sum(heads) - int(round(sparsity * sum(heads)))
    n_keep = sum(neurons) - int(round(sparsity * sum(neurons)))
    plan = PruningPlan.prefix(_uniform(len(heads), h_keep), _uniform(len(heads), n_keep), sparsity)
    return prune_model(model, plan, share_unpruned=share_unpruned)


def candidate_models(config: Any, kind: str, sparsities: list[float]) -> tuple[Any, dict[float, Any]]:
    """The teacher and one model per sparsity, all on the meta device, cut with uniform per-layer widths."""
    teacher = empty_model(config, kind=kind)
    return teacher, {s: uniform_cut(teacher, s, share_unpruned=True) for s in sparsities}


def flops_per_token(shape: Shape, context: int) -> float:
    """Forward FLOPs per token: 2 per weight of every matmul (the output layer included, embedding lookups
    excluded) plus attention scores and weighted sums over ``context`` positions."""
    matmul = shape.prunable + shape.vocab * shape.hidden  # layers + the output layer (tied or not)
    return 2.0 * matmul + 4.0 * context * shape.q_width


PLACEMENTS = ("replicated", "sharded", "offline")
# what ``minidisc run`` runs for trials and stages alike, in the order the plan recommends them: the teacher whole
# where it fits, else sharded (the exact loss, hidden-state term included, no stored targets), else offline
RUNNABLE_PLACEMENTS = ("replicated", "sharded", "offline")


@dataclass(frozen=True)
class Setting:
    """How one stage or trial is laid out on its workers (the memory it needs follows from these).

    ``placement`` is where the frozen teacher lives: ``replicated`` (whole, bf16, on every worker),
    ``sharded`` (FSDP2 over the same workers, resharded after each forward: a worker holds 1/n of it plus
    the two layers being gathered) or ``offline`` (not at all: its top-``top_k`` logits per position were
    written to Parquet by one batch-inference pass, and the stage reads them back). ``micro_batch``
    sequences per forward, ``grad_accum`` forwards per optimiser step; ``checkpointing`` keeps only each
    layer's input and recomputes the rest in the backward pass; ``kl_chunk`` > 0 computes the
    vocabulary-sized KL over that many positions at a time, each chunk recomputed in the backward pass.
    """

    placement: str = "replicated"
    parallelism: str = "ddp"
    workers: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    checkpointing: bool = False
    kl_chunk: int = 0
    top_k: int = 64

    def describe(self) -> str:
        savers = [x for x, on in (("activation checkpointing", self.checkpointing),
                                  (f"KL in chunks of {self.kl_chunk} positions", self.kl_chunk > 0)) if on]
        return (f"teacher {self.placement}, {self.parallelism} x {self.workers}, micro-batch {self.micro_batch} x "
                f"{self.grad_accum}" + (", " + ", ".join(savers) if savers else ""))


def activation_bytes(shape: Shape, tokens: int, lm: bool, checkpointing: bool = False, kl_chunk: int = 0,
                     length: int = 1, cpu: bool = False) -> float:
    """Activations kept for the backward pass of one micro-batch of ``tokens`` tokens (bf16 on a GPU; fp32
    with ``cpu``, the column :mod:`benchmarks.memory` measures).

    With ``checkpointing`` only each layer's input is kept, plus one layer's activations while it is
    recomputed. The KL term keeps the logits and their gradient, and three fp32 vocabulary-sized
    tensors per position (log-softmax, softmax, product): for every position at once, or for ``kl_chunk``
    positions at a time when the KL is chunked.
    """
    elt = 4 if cpu else 2
    per_layer = elt * (4 * shape.hidden + (2 * shape.q_width + 2 * shape.kv_width + 4 * shape.ffn)
                       / max(1, shape.layers))
    if checkpointing:
        body = tokens * (elt * shape.hidden * shape.layers + per_layer)
    else:
        body = tokens * per_layer * shape.layers
    if not lm:
        return float(body)
    positions = min(tokens, kl_chunk) if kl_chunk > 0 else tokens
    logits = tokens * shape.vocab * 2 * elt + positions * shape.vocab * 3 * 4
    return float(body + logits)


def teacher_forward_bytes(shape: Shape, tokens: int, lm: bool, placement: str = "replicated", kl_chunk: int = 0,
                          top_k: int = 64, cpu: bool = False) -> float:
    """What the frozen teacher contributes to a step: its logits and the hidden states the loss matches
    (online), or the stored top-k targets read back (offline: int32 indices, fp32 logits, fp32 log-sum-exp)."""
    if placement == "offline":
        return float(tokens * (top_k * 8 + 4)) if lm else float(tokens * 8)
    elt = 4 if cpu else 2
    kept_hidden = len(hidden_layer_indices(shape.layers))
    if not lm:
        return float(tokens * shape.hidden * elt * kept_hidden)
    positions = min(tokens, kl_chunk) if kl_chunk > 0 else tokens
    return float(tokens * shape.hidden * elt * kept_hidden + tokens * shape.vocab * elt + positions * shape.vocab * 4)


def stage_memory(student: Shape, teacher: Shape, length: int, lm: bool, setting: Setting, cpu: bool = False,
                 keep_best: bool = False) -> dict[str, float]:
    """Bytes per GPU of training ``student`` against frozen ``teacher`` laid out as ``setting``.

    ``cpu``: the same arithmetic for an fp32 run on the CPU (teacher and activations in fp32), where
    ``keep_best`` (a chain stage) adds the copy of the best weights the loop keeps in host memory."""
    n = setting.workers
    shard = n if setting.parallelism == "fsdp" else 1
    frozen_bytes = 4.0 if cpu else 2.0
    if setting.placement == "replicated":
        frozen = frozen_bytes * teacher.params
    elif setting.placement == "sharded":
        frozen = frozen_bytes * teacher.params / n + (2.0 * frozen_bytes * teacher.largest_layer if n > 1 else 0.0)
    else:
        frozen = 0.0
    tokens = setting.micro_batch * length
    mem = {
        "weights": 4.0 * student.params / shard,
        "gradients": 4.0 * student.params / shard,
        "optimizer": 8.0 * student.params / shard,
        "teacher": frozen,
        "activations": activation_bytes(student, tokens, lm, setting.checkpointing, setting.kl_chunk, cpu=cpu),
        "teacher_outputs": teacher_forward_bytes(teacher, tokens, lm, setting.placement, setting.kl_chunk,
                                                 setting.top_k, cpu=cpu),
    }
    if setting.parallelism == "fsdp" and n > 1:
        mem["fsdp_gather"] = 2.0 * 2 * student.largest_layer
    if cpu and keep_best:
        mem["best_weights"] = 4.0 * student.params / shard
    mem["total"] = sum(mem.values())
    return mem


def _worker_counts(limit: int) -> list[int]:
    counts, n = [], 1
    while n < limit:
        counts.append(n)
        n *= 2
    return [*counts, limit]


def _savers(batch: int, length: int) -> list[tuple[int, int, bool, int]]:
    """(micro-batch, accumulation, checkpointing, KL chunk) from none to all of the memory savers, in the
    order they cost compute: none; chunked KL (free); checkpointing (one more forward); smaller micro-batches."""
    chunk = max(1, min(length, 256))
    out = [(batch, 1, False, 0), (batch, 1, False, chunk), (batch, 1, True, chunk)]
    micro = batch
    while micro > 1:
        micro = max(1, micro // 2)
        out.append((micro, -(-batch // micro), True, chunk))
    return out


def smallest_fit(student: Shape, teacher: Shape, length: int, lm: bool, batch: int, max_workers: int,
                 gpu_bytes: float, placements: tuple[str, ...] = ("replicated",), top_k: int = 64) -> dict[str, Any]:
    """The first layout under which training ``student`` fits ``gpu_bytes`` per GPU: placements in the order
    given, then fewest workers (DDP on one, FSDP beyond: fewer GPUs per trial leave more trials running side by
    side), then fewest memory savers (each costs compute)."""
    last: tuple[Setting, dict[str, float]] | None = None
    for placement in placements:
        for n in _worker_counts(max_workers):
            for micro, accum, ckpt, chunk in _savers(batch, length):
                setting = Setting(placement, "ddp" if n == 1 else "fsdp", n, micro, accum, ckpt, chunk if lm else 0,
                                  top_k)
                mem = stage_memory(student, teacher, length, lm, setting)
                last = (setting, mem)
                if mem["total"] <= HEADROOM * gpu_bytes:
                    return _fit_row(True, setting, mem)
    assert last is not None
    return _fit_row(False, *last)


def _fit_row(fits: bool, setting: Setting, mem: dict[str, float]) -> dict[str, Any]:
    return {"fits": fits, **dataclasses.asdict(setting), "num_workers": setting.workers,
            "gib_per_gpu": round(mem["total"] / GIB, 2), "memory_gib": {k: round(v / GIB, 3) for k, v in mem.items()},
            "layout": setting.describe(),
            "scaling_config": f"ScalingConfig(num_workers={setting.workers}, use_gpu=True)" if fits else None}


def offline_pass(teacher: Shape, length: int, gpus: int, gpu_bytes: float, top_k: int,
                 batch: int = 8) -> dict[str, Any]:
    """The offline teacher's one batch-inference pass: GPUs per replica (the bf16 teacher split by layers
    over them, plus one batch's activations and logits), replicas over the cluster, and what is stored."""
    need = 2.0 * teacher.params + batch * length * (2 * teacher.hidden * 4 + teacher.vocab * 6)
    per_replica = max(1, math.ceil(need / (HEADROOM * gpu_bytes)))
    return {"gpus_per_replica": per_replica, "replicas": max(0, gpus // per_replica), "fits": per_replica <= gpus,
            "gib_per_replica": round(need / GIB, 2), "top_k": top_k,
            "stored_bytes_per_token": top_k * 8 + 4,
            "stored_gib_per_million_tokens": round(1e6 * (top_k * 8 + 4) / GIB, 3)}


@torch.no_grad()
def materialise(model: Any, seed: int = 0) -> Any:
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
              source: str = "", nodes: int = 1, placement: str = "auto", top_k: int = 64) -> dict[str, Any]:
    """The whole plan as plain data (see the module docstring).

    ``gpus`` per node, ``nodes`` nodes. Every candidate's search trial and every chain stage is laid out
    under each teacher placement (:class:`Setting`); the recommended placement is the first of
    ``replicated, sharded, offline`` (or the one asked for) under which all of them fit.
    """
    t0 = time.perf_counter()
    lm = kind == "lm"
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    total_gpus = gpus * nodes
    sparsities = sorted({0.0, *grid, student_sparsity})
    teacher_model, models = candidate_models(config, kind, [s for s in sparsities if s > 0])
    models[0.0] = teacher_model
    shapes = {s: _shape(m, vocab) for s, m in models.items()}
    teacher = shapes[0.0]
    gpu_bytes = gpu_gib * GIB
    candidates = [s for s in grid if s != student_sparsity and s > 0]
    ta = shapes[min(candidates)] if candidates else teacher  # the largest TA the search could choose
    student = shapes[student_sparsity]
    links = (("teacher_to_assistant", ta, teacher), ("assistant_to_student", student, ta),
             ("direct_kd", student, teacher))
    layouts: dict[str, Any] = {}
    for p in PLACEMENTS:
        trials = {s: smallest_fit(shapes[s], teacher, length, lm, trial_batch, total_gpus, gpu_bytes, (p,), top_k)
                  for s in candidates}
        stages = {name: smallest_fit(trained, frozen, length, lm, distill_batch, total_gpus, gpu_bytes, (p,), top_k)
                  for name, trained, frozen in links}
        entry: dict[str, Any] = {"trials": {str(s): t for s, t in trials.items()}, "stages": stages,
                                 "trial_gpus": max((t["workers"] for t in trials.values()), default=1)}
        if p == "offline":  # the teacher's pass feeds trials, the first link, direct KD; the assistant's the next link
            entry["teacher_pass"] = offline_pass(teacher, length, total_gpus, gpu_bytes, top_k)
            entry["assistant_pass"] = offline_pass(ta, length, total_gpus, gpu_bytes, top_k)
        entry["fits_all"] = (all(t["fits"] for t in trials.values()) and all(x["fits"] for x in stages.values())
                             and all(entry.get(k, {}).get("fits", True) for k in ("teacher_pass", "assistant_pass")))
        layouts[p] = entry
    order = RUNNABLE_PLACEMENTS if placement == "auto" else (placement,)
    recommended = next((p for p in order if layouts[p]["fits_all"]), None)
    chosen = layouts[recommended or order[0]]
    rows = []
    for s in sparsities:
        sh = shapes[s]
        role = "teacher" if s == 0.0 else ("student" if s == student_sparsity else "candidate")
        row: dict[str, Any] = {"sparsity": s, "role": role, "params": sh.params, "prunable": sh.prunable,
                               "gflops_per_token": round(flops_per_token(sh, length) / 1e9, 4)}
        if sh.params <= latency_max_params:
            row["cpu_latency_ms"] = round(cpu_latency_ms(models[s], length), 2)
        if role == "candidate":
            one = stage_memory(sh, teacher, length, lm, Setting(micro_batch=trial_batch))
            row["trial_gib"] = round(one["total"] / GIB, 2)
            # the same trial in fp32 on a CPU worker (the column benchmarks/memory.py checks)
            row["trial_cpu_gib"] = round(stage_memory(sh, teacher, length, lm, Setting(micro_batch=trial_batch),
                                                      cpu=True)["total"] / GIB, 2)
            row["trial_fits_one_gpu"] = one["total"] <= HEADROOM * gpu_bytes
            row["trial"] = chosen["trials"][str(s)]
        rows.append(row)
    tokens = distill_batch * length
    stages = {}
    for name, trained, frozen in links:
        per = {p: {k: round(v / GIB, 3) for k, v in
                   stage_memory(trained, frozen, length, lm, Setting(parallelism=p, workers=total_gpus,
                                                                     micro_batch=distill_batch)).items()}
               for p in ("ddp", "fsdp")}
        cpu = stage_memory(trained, frozen, length, lm, Setting(micro_batch=distill_batch), cpu=True, keep_best=True)
        stages[name] = {"trained_params": trained.params, "frozen_params": frozen.params,
                        f"gib_per_gpu_on_{total_gpus}": per, "smallest": chosen["stages"][name],
                        "cpu_gib": round(cpu["total"] / GIB, 3)}
    worst_trial = max((r for r in rows if r["role"] == "candidate"), key=lambda r: r["trial_gib"], default=None)
    # the driver (one process, host memory): replicated and offline, it loads the teacher whole in fp32 (its dev
    # metric, the importance pass) and puts it in the object store once (fp32, the driver's node); sharded, it
    # holds the shapes only (a worker group measures metric and importance, the workers cut every candidate).
    # auto keeps each evaluated candidate's recovered fp32 weights in OUTPUT/recovered when trials hold the
    # teacher whole (its halving round starts from them); under sharded or offline trials it keeps none
    kept = [4.0 * shapes[s].params for s in candidates]
    whole = round(4.0 * teacher.params / GIB, 2)
    driver = {"teacher_gib": {"replicated": whole, "sharded": 0.0, "offline": whole},
              "object_store_gib": {"replicated": whole, "sharded": 0.0, "offline": whole},
              "recovered_gib": {"replicated": round(sum(kept) / GIB, 2), "sharded": 0.0, "offline": 0.0},
              "note": "host memory of the driver process and disk of OUTPUT/recovered (auto, every grid point "
                      "evaluated: the most it keeps)"}
    return {
        "source": source, "model_type": getattr(config, "model_type", None), "kind": kind,
        "teacher_params": teacher.params, "teacher_params_billions": round(teacher.params / 1e9, 3),
        "sequence_length": length, "trial_batch": trial_batch, "distill_batch_per_worker": distill_batch,
        "tokens_per_step": tokens, "nodes": nodes, "gpus_per_node": gpus, "gpus": total_gpus, "gpu_gib": gpu_gib,
        "candidates": rows, "placement": recommended, "placements": layouts,
        "search_trial": {"largest_candidate_gib": worst_trial["trial_gib"] if worst_trial else None,
                         "all_fit_one_gpu": all(r.get("trial_fits_one_gpu", True) for r in rows),
                         "trial_gpus": chosen["trial_gpus"],
                         "note": "trial_gib: one candidate on one GPU beside the whole bf16 teacher; 'trial': the "
                                 "smallest layout under the recommended placement (search.trial_gpus workers)"},
        "chain": stages, "driver": driver,
        "assumptions": "bf16 teacher, fp32 AdamW student (16 bytes per parameter, FSDP divides "
        "them), bf16 activations with memory-efficient attention, 16 bytes per position of vocabulary-sized "
        f"logits, {int(HEADROOM * 100)}% of GPU memory usable; TA sized as the grid's least sparse candidate",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def render(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text for a terminal: the candidates, which placements fit, and the
    recommended one's layout of every trial and stage with its memory itemised."""
    lines = [f"{plan['source']}: {plan['model_type']} ({plan['kind']}), teacher {plan['teacher_params'] / 1e9:.3f}B "
             f"parameters; length {plan['sequence_length']}, {plan['nodes']} node(s) x {plan['gpus_per_node']} x "
             f"{plan['gpu_gib']:g} GiB GPUs",
             f"{'sparsity':>8} {'role':>9} {'params':>14} {'GFLOP/tok':>10} {'CPU ms':>8} {'1-GPU trial GiB':>16}"]
    for r in plan["candidates"]:
        ms = f"{r['cpu_latency_ms']:.1f}" if "cpu_latency_ms" in r else "-"
        flag = "" if r.get("trial_fits_one_gpu", True) else " (!)"
        trial = f"{r['trial_gib']:.1f}{flag}" if "trial_gib" in r else "-"
        lines.append(f"{r['sparsity']:>8.2f} {r['role']:>9} {r['params']:>14,} {r['gflops_per_token']:>10.3f} "
                     f"{ms:>8} {trial:>16}")
    for name, entry in plan["placements"].items():
        worst = max(list(entry["trials"].values()) + list(entry["stages"].values()), key=lambda x: x["gib_per_gpu"])
        lines.append(f"teacher {name:>10}: {'fits' if entry['fits_all'] else 'does not fit'} (largest: "
                     f"{worst['gib_per_gpu']:.1f} GiB per GPU; trials on up to {entry['trial_gpus']} GPU(s))")
    chosen = plan["placement"]
    if chosen is None:
        lines.append(f"nothing fits {plan['gpus']} GPUs under any placement: more nodes (--nodes) or a sparser grid")
        lines.append(f"planned in {plan['seconds']} s")
        return "\n".join(lines)
    entry = plan["placements"][chosen]
    lines.append(f"recommended: teacher.placement: {chosen}"
                 + (f", search.trial_workers: {entry['trial_gpus']}" if entry["trial_gpus"] > 1 else ""))
    for who in ("teacher", "assistant"):
        if f"{who}_pass" in entry:
            tp = entry[f"{who}_pass"]
            lines.append(f"  offline {who} pass: {tp['replicas']} replica(s) of {tp['gpus_per_replica']} GPU(s) "
                         f"({tp['gib_per_replica']} GiB each); top-{tp['top_k']} targets take "
                         f"{tp['stored_gib_per_million_tokens']} GiB per million tokens")
    items = [(f"trial {s}", t) for s, t in entry["trials"].items()] + list(entry["stages"].items())
    for name, fit in items:
        mem = ", ".join(f"{k} {v:.1f}" for k, v in fit["memory_gib"].items() if k != "total" and v >= 0.05)
        lines.append(f"  {name:>22}: {fit['layout']}: {fit['gib_per_gpu']:.1f} GiB per GPU ({mem})")
    cpu_trial = max((r["trial_cpu_gib"] for r in plan["candidates"] if "trial_cpu_gib" in r), default=0.0)
    cpu_stage = max((x["cpu_gib"] for x in plan["chain"].values()), default=0.0)
    lines.append(f"on CPU workers (fp32, one process each): trials up to {cpu_trial:.1f} GiB, chain stages up to "
                 f"{cpu_stage:.1f} GiB of host memory")
    if "driver" in plan:
        d = plan["driver"]
        lines.append(f"driver (host memory): the teacher in fp32 {d['teacher_gib'][chosen]:.1f} GiB, its object-store "
                     f"copy {d['object_store_gib'][chosen]:.1f} GiB; OUTPUT/recovered (auto) up to "
                     f"{d['recovered_gib'][chosen]:.1f} GiB")
    lines.append(f"planned in {plan['seconds']} s")
    return "\n".join(lines)


def check_gpus(gpus: int, gpu_gib: float, nodes: int = 1) -> None:
    if gpus < 1:
        raise UserInputError("--gpus", gpus, "use 1 or more GPUs")
    if nodes < 1:
        raise UserInputError("--nodes", nodes, "use 1 or more nodes")
    if not (math.isfinite(gpu_gib) and gpu_gib > 0):
        raise UserInputError("--gpu-memory", gpu_gib, "give the memory of one GPU in GiB, e.g. 80")
