"""Deployment benchmark: uniform vs global pruning layouts on SST-2, and ONNX Runtime vs torch latency.

    python benchmarks/deploy.py                       # fine-tunes all-MiniLM-L6-v2 on SST-2 first (~10 min, 2 cores)
    python benchmarks/deploy.py --teacher DIR         # a fine-tuned SST-2 teacher directory

For each sparsity (0.5, 0.9) and layout (global: the paper's ranking across layers; uniform: the same
number of heads and neurons in every layer, what a stock config can hold) the teacher is pruned by the
same gradient importance and recovered by the same number of distillation steps, then scored on the
SST-2 dev set (872 rows). The 0.9 students are exported to ONNX (``minidisc export``) and their CPU
latency under onnxruntime is measured against torch's (median of 20 forward passes, 2 threads each).
Writes ``benchmarks/results/deploy.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SST2, write  # noqa: E402


def _latency(fn: Any, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(sorted(times)[len(times) // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="fine-tuned SST-2 teacher directory (default: fine-tune MiniLM here)")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="recovery distillation steps per pruned model")
    ap.add_argument("--train-rows", type=int, default=20000)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import infinite, load_task, make_loader, tokenize_task
    from minidisc_ray.export import export_model
    from minidisc_ray.families import count_params
    from minidisc_ray.modelio.load import load_model_dir, save_model_dir
    from minidisc_ray.pipeline import set_label_names
    from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
    from minidisc_ray.training import distill, evaluate, finetune

    torch.manual_seed(0)
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    task = load_task(TaskConfig(data=str(SST2), max_train_samples=args.train_rows, max_length=64))
    teacher, tokenizer, _, _ = load_model_dir(args.teacher or "minilm", num_labels=2)
    set_label_names(teacher, task)
    train, dev, _ = tokenize_task(task, tokenizer, 64)
    dev_loader = make_loader(dev, tokenizer, 64)
    finetuned = None
    if not args.teacher:
        res = finetune(teacher, infinite(make_loader(train, tokenizer, 32, shuffle=True, seed=0)), dev_loader,
                       "accuracy", args.finetune_steps, 1e-4, 0.1, 0.01, 100, log=print)
        finetuned = {"steps": args.finetune_steps, "seconds": round(res["seconds"], 1)}
    teacher_acc = evaluate(teacher, dev_loader, "accuracy")["accuracy"]
    imp = compute_importance(teacher, make_loader(train.select(range(512)), tokenizer, 32))
    prunable_t, total_t = count_params(teacher)
    rows: list[dict[str, Any]] = []
    students: dict[str, Any] = {}
    for s in (0.5, 0.9):
        for layout in ("global", "uniform"):
            plan = plan_for_sparsity(imp, s, layout=layout)
            model = prune_model(teacher, plan)
            torch.manual_seed(1)
            t0 = time.perf_counter()
            distill(model, teacher, infinite(make_loader(train, tokenizer, 32, shuffle=True, seed=1)), args.steps,
                    1e-4)
            acc = evaluate(model, dev_loader, "accuracy")["accuracy"]
            prunable, total = count_params(model)
            row = {"sparsity": s, "layout": layout, "accuracy": acc, "params": total,
                   "param_sparsity": 1 - prunable / prunable_t, "heads_per_layer": plan.heads_per_layer,
                   "neurons_per_layer": plan.neurons_per_layer, "recovery_seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row)
            if s == 0.9:
                students[layout] = (model, plan)
    latency = []
    work = Path(tempfile.mkdtemp(prefix="minidisc-deploy-"))
    enc = [tokenizer(["a gorgeous, witty, seductive movie ."] * b, padding="max_length", max_length=64,
                     truncation=True, return_tensors="pt") for b in (1, 32)]
    for layout, (model, plan) in students.items():
        src = save_model_dir(model, tokenizer, work / f"student-{layout}", plan=plan,
                             record={"role": "student", "sparsity": 0.9})
        info = export_model(str(src), "onnx", str(work / f"onnx-{layout}"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        sess = ort.InferenceSession(str(work / f"onnx-{layout}" / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        model.eval()
        for e in enc:
            feeds = {"input_ids": e["input_ids"].numpy(), "attention_mask": e["attention_mask"].numpy()}
            with torch.no_grad():
                torch_ms = _latency(lambda e=e, m=model: m(input_ids=e["input_ids"],
                                                           attention_mask=e["attention_mask"]))
            ort_ms = _latency(lambda feeds=feeds, sess=sess: sess.run(None, feeds))
            latency.append({"layout": layout, "batch": int(e["input_ids"].shape[0]), "tokens": 64,
                            "torch_ms": round(torch_ms, 2), "onnxruntime_ms": round(ort_ms, 2),
                            "speedup": round(torch_ms / ort_ms, 2), "onnx_max_abs_diff": info["max_abs_diff"]})
            print(latency[-1])
    write("deploy", {"teacher": args.teacher or "all-MiniLM-L6-v2 fine-tuned here", "finetune": finetuned,
                     "teacher_accuracy": teacher_acc, "teacher_params": total_t, "recovery_steps": args.steps,
                     "rows": rows, "latency": latency, "dev_rows": len(dev),
                     "seconds": round(time.perf_counter() - t_start, 1),
                     "command": "python benchmarks/deploy.py " + " ".join(sys.argv[1:])}, quick=False)


if __name__ == "__main__":
    main()
