"""A paper-budget slice of ``minidisc study`` on one GPU, without Ray: RTE, the all-MiniLM-L6-v2 teacher.

What it answers: at the budgets of the MiniDisc reference code (10 epochs per chain stage at batch 16: about
1,400 steps on RTE's 2,241 training rows once 249 are carved off to select on), does the lambda-tradeoff pick the
assistant that exhaustive trial distillation picks, is the tradeoff's rank of the candidates the students' rank
(Spearman), does any assistant beat direct KD at the same total steps, and does the rule with no search (the
candidate nearest above the student, or direct KD, the better on validation), which meets the cost and regret
targets on the four committed 2-core studies, still do at this budget? The studies committed from 2 CPU cores
ran stages of 300 steps at batch 32 (a fifth of this), where the assistants' advantage may not show.

Per seed: the teacher fine-tuned on the training rows (``--teacher-epochs``, early stopping on the validation rows);
its importance over 512 training rows; each candidate assistant cut at its unit sparsity and recovered as
``minidisc run`` recovers it (60 steps at batch 32), scored by ``metric + lam * parameter sparsity``; the chain
teacher -> assistant -> student through every candidate (each stage ``--epochs`` at batch 16, evaluated once per
epoch, the best weights kept); direct KD teacher -> student for the two stages' steps. Every student is measured
on the validation rows (what a choice may read) and on RTE's 277 dev rows (what no choice saw; every regret here
is on them).

Everything runs in this process on the engine (:mod:`minidisc_ray.engine`, :mod:`minidisc_ray.training`,
:mod:`minidisc_ray.pruning`): the GPU machine has torch, transformers and pyarrow, not ray, datasets or optuna.
Its inputs travel as a pack of about 47 MB (``benchmarks/gpu_pack/rte``: the teacher's weights in bf16, the rows
tokenised): make it here, then carry it::

    python benchmarks/gpu_study.py --pack                 # here: writes benchmarks/gpu_pack/rte (git-ignored)
    python benchmarks/gpu_study.py                        # on the GPU: benchmarks/results/gpu_study.json
    python benchmarks/gpu_study.py --dry-run              # anywhere, seconds: a tiny pack, 2 steps per stage

``--dry-run`` packs a tiny random BERT and synthetic rows and runs the same code for a few steps on the CPU: it
checks the script, not the hardware or the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._packed import Rows, load_packed_model, pack_model, pack_rows, read_meta, write_meta  # noqa: E402

PACK = Path(__file__).resolve().parent / "gpu_pack" / "rte"
RTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "RTE"
GRID = (0.5, 0.6, 0.7, 0.8)  # candidate assistants (unit sparsity of heads and FFN neurons)
STUDENT = 0.9
LAM = 0.2


def make_pack(target: Path, data: Path, max_length: int) -> Path:
    """The teacher (all-MiniLM-L6-v2 with a fresh 2-class head, bf16) and RTE tokenised, for the GPU machine."""
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, tokenize_task
    from minidisc_ray.modelio.load import load_model_dir

    model, tok, _, _ = load_model_dir("minilm", num_labels=2)
    task = load_task(TaskConfig(data=str(data), max_length=max_length), seed=0)
    train, dev, _ = tokenize_task(task, tok, max_length)
    pack_model(model, target / "teacher")
    pack_rows(train.with_format(None), target / "train.safetensors", tok.pad_token_id or 0)
    pack_rows(dev.with_format(None), target / "dev.safetensors", tok.pad_token_id or 0)
    write_meta(target, {"task": "RTE", "metric": task.metric, "num_labels": task.num_labels,
                        "max_length": max_length, "teacher": "all-MiniLM-L6-v2", "train_rows": len(train),
                        "dev_rows": len(dev)})
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"packed {target}: {size / 2**20:.1f} MiB")
    return target


def make_dry_pack(target: Path) -> Path:
    """A tiny random BERT and 96 + 32 synthetic labelled rows (the label is the parity of the first token)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    pack_model(BertForSequenceClassification(cfg), target / "teacher")
    for name, n in (("train", 96), ("dev", 32)):
        rows = []
        for _ in range(n):
            length = int(torch.randint(4, 16, ()))
            ids = torch.randint(2, 64, (length,)).tolist()
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "token_type_ids": [0] * length,
                         "labels": ids[0] % 2})
        pack_rows(rows, target / f"{name}.safetensors")
    write_meta(target, {"task": "synthetic", "metric": "accuracy", "num_labels": 2, "max_length": 16,
                        "teacher": "tiny random BERT", "train_rows": 96, "dev_rows": 32})
    return target


def carve(train: Rows, dev_rows: int, seed: int, fraction: float = 0.1) -> tuple[Rows, Rows]:
    """(rows to train on, validation rows): as ``task.validation_fraction`` carves them."""
    import torch

    n = min(int(round(fraction * len(train))), dev_rows)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return train.select(sorted(order[n:])), train.select(sorted(order[:n]))


def spearman(a: list[float], b: list[float]) -> float | None:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    sa, sb = math.sqrt(sum((x - ma) ** 2 for x in ra)), math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (sa * sb) if sa and sb else None


def run_seed(pack: Path, seed: int, device: Any, epochs: float, teacher_epochs: float, dry: bool) -> dict[str, Any]:
    import torch

    from minidisc_ray.config import DistillConfig
    from minidisc_ray.families import count_params, unit_counts
    from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
    from minidisc_ray.training import distill, distill_stage, evaluate, finetune

    meta = read_meta(pack)
    metric = meta["metric"]
    train_all, dev = Rows.load(pack / "train.safetensors"), Rows.load(pack / "dev.safetensors")
    train, valid = carve(train_all, len(dev), seed)
    batch = 16
    per_epoch = math.ceil(len(train) / batch)
    stage_steps = 2 if dry else max(1, round(epochs * per_epoch))
    every = 1 if dry else per_epoch
    valid_b, dev_b = valid.batches(64), dev.batches(64)

    def on(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v.to(device) for k, v in b.items()} for b in rows]

    valid_b, dev_b = on(valid_b), on(dev_b)

    def stream(s: int, size: int = batch) -> Any:
        for b in train.forever(size, s):
            yield {k: v.to(device) for k, v in b.items()}

    times: dict[str, float] = {}
    torch.manual_seed(seed)
    teacher = load_packed_model(pack / "teacher", meta["num_labels"]).to(device)
    t0 = time.perf_counter()
    ft_steps = 2 if dry else max(1, round(teacher_epochs * per_epoch))
    ft = finetune(teacher, stream(seed), valid_b, metric, ft_steps, 2e-5, 0.1, 0.01, every, print)
    times["teacher"] = time.perf_counter() - t0
    teacher.eval().requires_grad_(False)
    t_valid, t_dev = ft["best"]["metric"], evaluate(teacher, dev_b, metric)["metric"]
    print(f"[seed {seed}] teacher: validation {t_valid:.4f}, dev {t_dev:.4f} ({ft_steps} steps, "
          f"{times['teacher']:.0f}s)", flush=True)
    sample = on(train.select(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:512].tolist())
                .batches(32))  # a seeded sample of the training rows, as pruning.importance_samples takes it
    imp = compute_importance(teacher, sample, method="gradient")
    prunable = count_params(teacher)[0]
    base = unit_counts(teacher)
    # evaluated once per epoch, the best weights kept, never stopped early (the reference code's recipe)
    dc = DistillConfig(steps=stage_steps, batch_size=batch, lr=1e-4, eval_every=every, patience=10**6)

    def stage(student: torch.nn.Module, source: torch.nn.Module, steps: int, s: int) -> dict[str, Any]:
        torch.manual_seed(s)
        t = time.perf_counter()
        out = distill_stage(student, source, stream(s), valid_b, metric, False, dataclasses.replace(dc, steps=steps))
        out["dev"] = evaluate(student, dev_b, metric)["metric"]
        out["seconds"] = round(time.perf_counter() - t, 1)
        return out

    def cut_student(source: torch.nn.Module) -> torch.nn.Module:
        own = compute_importance(source, sample, method="gradient")
        return prune_model(source, plan_for_sparsity(own, STUDENT, base_units=base)).requires_grad_(True)

    rows = []
    for s in GRID:
        t = time.perf_counter()
        cand = prune_model(teacher, plan_for_sparsity(imp, s)).to(device).requires_grad_(True)
        torch.manual_seed(seed)
        distill(cand, teacher, stream(seed, 32), 2 if dry else 60, 1e-4)
        recovered = evaluate(cand, valid_b, metric)["metric"]
        param_s = 1 - count_params(cand)[0] / prunable
        cand_seconds = time.perf_counter() - t
        ta = stage(cand, teacher, stage_steps, seed)
        st = stage(cut_student(cand), cand, stage_steps, seed + 1)
        rows.append({"sparsity": s, "param_sparsity": param_s, "recovered": recovered,
                     "tradeoff": recovered + LAM * param_s, "assistant": ta["metric"], "assistant_dev": ta["dev"],
                     "student": st["metric"], "student_dev": st["dev"], "candidate_seconds": round(cand_seconds, 1),
                     "seconds": ta["seconds"] + st["seconds"], "student_curve": st["curve"]})
        print(f"[seed {seed}] TA {s}: recovered {recovered:.4f}, tradeoff {rows[-1]['tradeoff']:.4f}, student "
              f"validation {st['metric']:.4f} dev {st['dev']:.4f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    # direct KD: the path's two stages and the assistant's recovery, at the same batch (the same rows seen)
    direct_steps = 2 * stage_steps + (2 if dry else round(60 * 32 / batch))
    direct = stage(prune_model(teacher, plan_for_sparsity(imp, STUDENT)).to(device).requires_grad_(True), teacher,
                   direct_steps, seed)
    print(f"[seed {seed}] direct KD: validation {direct['metric']:.4f} dev {direct['dev']:.4f} "
          f"({direct['seconds']:.0f}s)", flush=True)
    options = [*rows, {"sparsity": STUDENT, "student": direct["metric"], "student_dev": direct["dev"]}]
    by_tradeoff = max(range(len(rows)), key=lambda i: rows[i]["tradeoff"])
    by_exhaustive = max(range(len(options)), key=lambda i: options[i]["student"])  # chosen on validation
    best_dev = max(o["student_dev"] for o in options)
    # no search: the chain through the candidate nearest above the student against direct KD, on validation
    nearest = options[-2] if options[-2]["student"] >= direct["metric"] else options[-1]
    return {
        "seed": seed, "stage_steps": stage_steps, "batch": batch, "train_rows": len(train),
        "validation_rows": len(valid), "dev_rows": len(dev), "teacher": {"validation": t_valid, "dev": t_dev},
        "candidates": rows, "direct_kd": {k: direct[k] for k in ("metric", "dev", "seconds", "curve")},
        "lambda_pick": GRID[by_tradeoff], "exhaustive_pick": options[by_exhaustive]["sparsity"],
        "nearest_direct_pick": nearest["sparsity"],
        "regret_dev": {"lambda": best_dev - rows[by_tradeoff]["student_dev"],
                       "exhaustive": best_dev - options[by_exhaustive]["student_dev"],
                       "nearest_direct": best_dev - nearest["student_dev"]},
        "lambda_pick_minus_direct_dev": rows[by_tradeoff]["student_dev"] - direct["dev"],
        "spearman_tradeoff_student_dev": spearman([r["tradeoff"] for r in rows], [r["student_dev"] for r in rows]),
        "seconds": times | {"total": round(time.perf_counter() - t0, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", action="store_true", help="write benchmarks/gpu_pack/rte here (needs datasets)")
    ap.add_argument("--data", type=Path, default=RTE, help="RTE in GLUE form (for --pack)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny pack, 2 steps per stage, on the CPU")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=10.0, help="per chain stage (the reference code's 10)")
    ap.add_argument("--teacher-epochs", type=float, default=10.0)
    ap.add_argument("--device", default="cuda", help="cpu: the real pack on the CPU (a smoke run with tiny --epochs)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON written (default benchmarks/results/...)")
    args = ap.parse_args()
    if args.pack:
        make_pack(PACK, args.data, 128)
        return
    import torch

    if not args.dry_run and args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_study.py: no CUDA device here; run it on a GPU node, or with --dry-run")
    if not args.dry_run and not (PACK / "meta.json").is_file():
        sys.exit(f"benchmarks/gpu_study.py: no pack at {PACK}; make it with --pack where the data and the teacher "
                 "are, and carry it")
    pack = make_dry_pack(Path(tempfile.mkdtemp())) if args.dry_run else PACK
    device = torch.device("cpu" if args.dry_run else args.device)
    seeds = [run_seed(pack, s, device, args.epochs, args.teacher_epochs, args.dry_run)
             for s in range(1 if args.dry_run else args.seeds)]
    summary = {"lambda_regret_dev": sum(s["regret_dev"]["lambda"] for s in seeds) / len(seeds),
               "exhaustive_regret_dev": sum(s["regret_dev"]["exhaustive"] for s in seeds) / len(seeds),
               "nearest_direct_regret_dev": sum(s["regret_dev"]["nearest_direct"] for s in seeds) / len(seeds),
               "lambda_pick_minus_direct_dev": sum(s["lambda_pick_minus_direct_dev"] for s in seeds) / len(seeds),
               "same_pick": sum(s["lambda_pick"] == s["exhaustive_pick"] for s in seeds), "seeds": len(seeds)}
    print(json.dumps(summary), flush=True)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                   "cpu (dry run)" if args.dry_run else "cpu")
    body = {"device": device_name, "pack": read_meta(pack), "grid": list(GRID), "student_sparsity": STUDENT,
            "lam": LAM, "summary": summary, "per_seed": seeds}
    out = args.out or (Path(__file__).resolve().parent / "results" /
                       ("gpu_study.dryrun.json" if args.dry_run else "gpu_study.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
