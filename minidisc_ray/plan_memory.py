"""The plan's memory model: bytes per GPU of training one model against a frozen one under a layout, and forward
FLOPs per token, from the models' shapes alone.

Bytes per parameter of the trained model: fp32 master weights 4, fp32 gradients 4, AdamW moments 8; FSDP divides
all three by ``N``. The frozen teacher is held once per worker in bf16 (2 bytes per parameter) on GPU, as the chain
does. Activations are those of a bf16 forward with memory-efficient attention (no length-squared score matrix), per
layer and token ``2 * (4h + 2q + 2kv + 4f)`` bytes (norm inputs and outputs, q/k/v and the attention output, gate,
up, activation and product of the MLP), plus the logits the KL term keeps (bf16 logits and three fp32
vocabulary-sized tensors per position), plus the teacher's kept hidden states. FSDP adds the all-gathered bf16
weights of two layers (the one running and the one prefetched). A 10% margin is kept for the CUDA context and the
allocator. These are estimates: a real run's figure belongs in ``benchmarks/results``.
"""

from __future__ import annotations

from dataclasses import dataclass

from minidisc_ray.losses import hidden_layer_indices

GIB = 1024**3
HEADROOM = 0.9  # fraction of a GPU's memory a plan may fill


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


def flops_per_token(shape: Shape, context: int) -> float:
    """Forward FLOPs per token: 2 per weight of every matmul (the output layer included, embedding lookups
    excluded) plus attention scores and weighted sums over ``context`` positions."""
    matmul = shape.prunable + shape.vocab * shape.hidden  # layers + the output layer (tied or not)
    return 2.0 * matmul + 4.0 * context * shape.q_width


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


def _frozen_bytes(teacher: Shape, setting: Setting, cpu: bool) -> float:
    """The frozen teacher's weights on one worker: whole, its shard plus two gathered layers, or none (offline)."""
    n = setting.workers
    per_param = 4.0 if cpu else 2.0
    if setting.placement == "replicated":
        return per_param * teacher.params
    if setting.placement == "sharded":
        return per_param * teacher.params / n + (2.0 * per_param * teacher.largest_layer if n > 1 else 0.0)
    return 0.0


def stage_memory(student: Shape, teacher: Shape, length: int, lm: bool, setting: Setting, cpu: bool = False,
                 keep_best: bool = False) -> dict[str, float]:
    """Bytes per GPU of training ``student`` against frozen ``teacher`` laid out as ``setting``.

    ``cpu``: the same arithmetic for an fp32 run on the CPU (teacher and activations in fp32), where
    ``keep_best`` (a chain stage) adds the copy of the best weights the loop keeps in host memory."""
    n = setting.workers
    shard = n if setting.parallelism == "fsdp" else 1
    tokens = setting.micro_batch * length
    mem = {
        "weights": 4.0 * student.params / shard,
        "gradients": 4.0 * student.params / shard,
        "optimizer": 8.0 * student.params / shard,
        "teacher": _frozen_bytes(teacher, setting, cpu),
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
