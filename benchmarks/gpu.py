"""The GPU check: the costliest distillation stage of three chains on a CUDA device in bf16, measured against
``minidisc plan``; random-weight models of the real shapes, synthetic rows, no Ray.

The chains: all-MiniLM-L6-v2's shape (BERT, 22.7M, classification, 128 tokens), SmolLM2-135M's (Llama, GQA 9/3,
30 layers, language modelling, 256 tokens) and a 1B-class decoder (Llama-3.2-1B's shape: 16 layers, hidden 2048,
GQA 32/8, FFN 8192, 1.24B; 512 tokens) for an MFU figure the small models cannot give. For each, the stage
teacher -> assistant at unit sparsity 0.5 (the teacher frozen in bf16 beside the trained model, as a chain worker
holds them) runs ``--steps`` optimiser steps after ``--warmup`` untimed ones, and records:

* samples/s and tokens/s of the timed steps;
* MFU: achieved FLOP/s over the device's bf16 dense peak (a table by device name, or ``--peak-tflops``),
  counting 6 FLOPs per trained parameter and token (forward and backward) plus 2 per teacher parameter and
  token (its forward);
* peak memory (``torch.cuda.max_memory_allocated``) against the plan's itemised prediction for the same
  layout (:func:`minidisc_ray.plan_memory.stage_memory`), and their ratio.

Throughput and memory do not depend on the weights' values, so nothing is downloaded or carried: the lent GPU
machine (torch, transformers, pyarrow; no ray, datasets, optuna or model hub; 64 MiB carried) runs it from the
tree. ``--dry-run`` (what runs without a GPU, and in the test run): tiny models of the same families, two steps
on the CPU, the same code path and the same record; it checks the script, not the hardware. Run on a GPU node:

    python benchmarks/gpu.py                      # writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run            # anywhere, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, write  # noqa: E402

# bf16 dense tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "V100": 125.0, "B200": 2250.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name.upper()), None)


SHAPES: dict[str, dict[str, Any]] = {
    # name: family, config fields, task kind, tokens per row, micro-batch on the GPU
    "minilm": {"family": "bert", "lm": False, "length": 128, "batch": 64,
               "config": {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                          "intermediate_size": 1536, "max_position_embeddings": 512}},
    "smollm2": {"family": "llama", "lm": True, "length": 256, "batch": 16,
                "config": {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                           "num_key_value_heads": 3, "intermediate_size": 1536, "tie_word_embeddings": True,
                           "max_position_embeddings": 2048}},
    "llama1b": {"family": "llama", "lm": True, "length": 512, "batch": 8,
                "config": {"vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
                           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
                           "tie_word_embeddings": True, "max_position_embeddings": 4096, "head_dim": 64}},
}
TINY = {"bert": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 64, "max_position_embeddings": 64},
        "llama": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}}


def stage_case(name: str, dry: bool) -> dict[str, Any]:
    """A random-weight teacher of ``name``'s shape (tiny with ``dry``) and synthetic rows for it."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    spec = SHAPES[name]
    fields = TINY[spec["family"]] if dry else spec["config"]
    torch.manual_seed(0)
    if spec["family"] == "bert":
        teacher = BertForSequenceClassification(BertConfig(**fields, num_labels=2))
    else:
        teacher = LlamaForCausalLM(LlamaConfig(**fields))
    length = 16 if dry else spec["length"]
    return {"teacher": teacher.eval(), "lm": spec["lm"], "length": length, "vocab": fields["vocab_size"],
            "batch": 4 if dry else spec["batch"]}


def synthetic_batches(case: dict[str, Any], batch: int, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` batches of random token ids, every row ``length`` tokens (labels: the ids for a language model,
    a random class otherwise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, case["vocab"], (batch, case["length"]), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        b["labels"] = ids.clone() if case["lm"] else torch.randint(0, 2, (batch,), generator=g)
        out.append(b)
    return out


def measure(case: dict[str, Any], batch: int, steps: int, warmup: int, device: Any, peak: float | None
            ) -> dict[str, Any]:
    import torch

    from minidisc_ray.engine import Loop, LoopSpec
    from minidisc_ray.families import count_params
    from minidisc_ray.plan_memory import GIB, Setting, stage_memory
    from minidisc_ray.plan_shapes import model_shape
    from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
    from minidisc_ray.training import kd_loss_fn

    teacher, lm = case["teacher"].to(device), case["lm"]
    imp = compute_importance(teacher, synthetic_batches(case, 4, 4, seed=1), method="activation")
    student = prune_model(teacher, plan_for_sparsity(imp, 0.5)).train()
    vocab = int(getattr(teacher.config, "vocab_size", 0) or 0)
    predicted = stage_memory(model_shape(student, vocab), model_shape(teacher, vocab), case["length"], lm,
                             Setting(micro_batch=batch))
    frozen = teacher.requires_grad_(False)
    if device.type == "cuda":
        frozen = frozen.to(torch.bfloat16)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    loop = Loop(student, LoopSpec(steps=warmup + steps, lr=1e-4), kd_loss_fn(frozen))
    batches = iter(synthetic_batches(case, batch, warmup + steps, seed=0))
    tokens = 0
    for _ in range(warmup):
        loop.step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(batches)
        tokens += int(b["attention_mask"].numel())
        loop.step(iter([b]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    trained, total_teacher = count_params(student)[1], count_params(frozen)[1]
    flops = (6.0 * trained + 2.0 * total_teacher) * tokens
    row: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher_params": total_teacher, "trained_params": trained, "batch": batch, "length": case["length"],
        "steps": steps, "seconds": round(seconds, 3), "samples_per_s": round(batch * steps / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "tflops_achieved": round(flops / seconds / 1e12, 3),
        "plan_gib": round(predicted["total"] / GIB, 6),
        "plan_items_gib": {k: round(v / GIB, 6) for k, v in predicted.items()}}
    if peak:
        row["peak_tflops"], row["mfu"] = peak, round(flops / seconds / 1e12 / peak, 4)
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        row["peak_gib"] = round(measured / GIB, 3)
        row["plan_over_measured"] = round(predicted["total"] / measured, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, not a GPU")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--chains", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak (default: a table)")
    args = ap.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU node, or with --dry-run to check the script")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    peak = peak_tflops(name, args.peak_tflops) if not args.dry_run else (args.peak_tflops or 1.0)
    rows = {}
    for chain in args.chains:
        case = stage_case(chain, args.dry_run)
        rows[chain] = measure(case, case["batch"], steps, warmup, device, peak)
        rows[chain]["shape"] = "tiny (dry run)" if args.dry_run else SHAPES[chain]["config"]
        print(chain, rows[chain], flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write("gpu" if not args.dry_run else "gpu.dryrun", {
        "device": name, "precision": "bf16 autocast, bf16 teacher" if device.type == "cuda" else "fp32 (CPU dry run)",
        "weights": "random (throughput and memory do not depend on them)", "data": "synthetic token ids",
        "stages": rows, "repo": REPO.name}, False)


if __name__ == "__main__":
    main()
