"""Scheduling cost and quality on SST-2: MiniDisc (bisection) vs exhaustive trial distillation vs the
sandwich one-trial schedule vs direct KD without a TA.

Every strategy runs on the same prepared teacher, candidate grid and recovery budget. The exhaustive
strategy distils a student through every candidate TA, which gives, for each candidate, the student
accuracy it leads to; a strategy's student accuracy is the one through the TA it chose, and its
regret is the best exhaustive student minus that. Direct KD distils the student from the teacher with
the same student steps. Also reported: the Spearman correlation between each candidate's
lambda-tradeoff and the accuracy of the student distilled through it (MiniDisc's central claim).

    python benchmarks/scheduling_sst2.py            # fine-tuned MiniLM teacher, SST-2 subset (~15 min, 2 cores)
    python benchmarks/scheduling_sst2.py --quick    # a tiny random BERT (about a minute)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SST2, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--teacher", default=None, help="an already fine-tuned teacher directory (skips fine-tuning)")
    args = ap.parse_args()
    from scipy import stats

    from minidisc_ray.config import load_config
    from minidisc_ray.pipeline import prepare
    from minidisc_ray.ray_env import ensure_ray, resolved
    from minidisc_ray.search.driver import run_strategy, search_payload
    from minidisc_ray.search.trial import score_candidate

    work = Path(args.output or tempfile.mkdtemp(prefix="minidisc-sched-"))
    overrides = [f"task.data={SST2}", "task.max_train_samples=8000"]
    if args.teacher:
        overrides += [f"teacher.model={args.teacher}", "teacher.finetune=never"]
    if args.quick:
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_tokenizer, save_tiny_teacher

        teacher = save_tiny_teacher(work / "tiny-teacher", make_tokenizer(work / "tok"), seed=3)
        overrides += [f"teacher.model={teacher}", "teacher.finetune=never", "task.max_train_samples=300",
                      "task.max_dev_samples=100", "task.max_length=32", "recovery.steps=3",
                      "pruning.grid=[0.5,0.7,0.8,0.9]", "pruning.importance_samples=64"]
    cfg = load_config(REPO / "search_spaces" / "sst2-minilm.yaml", overrides)
    ensure_ray(cfg.ray)
    prep = prepare(cfg, work / "run")
    payload = search_payload(prep, None)
    # each strategy in its own directory: no strategy reuses another's recorded evaluations, so wall times are real
    runs = {s: run_strategy(prep, payload, work / "run" / s, s) for s in ("exhaustive", "bisection", "sandwich")}
    student_by_ta = {c["sparsity"]: c["student_metric"] for c in runs["exhaustive"]["candidates"]
                     if "student_metric" in c}
    tradeoff_by_ta = {c["sparsity"]: c["tradeoff"] for c in runs["exhaustive"]["candidates"] if "tradeoff" in c}
    best_student = max(student_by_ta.values())
    direct = score_candidate(resolved(payload), cfg.pruning.student_sparsity)
    rows = []
    for name, r in runs.items():
        ta = r["chosen_sparsity"]
        acc = student_by_ta.get(ta)
        rows.append({"strategy": name, "chosen_ta": ta, "evaluations": r["evaluations"],
                     "scheduling_cpu_s": r["cpu_seconds"], "scheduling_wall_s": r["seconds"],
                     "student_accuracy": acc, "regret": None if acc is None else best_student - acc})
    rows.append({"strategy": "direct-kd", "chosen_ta": None, "evaluations": 0, "scheduling_cpu_s": 0.0,
                 "scheduling_wall_s": 0.0, "student_accuracy": direct["metric"],
                 "regret": best_student - direct["metric"]})
    common = sorted(set(student_by_ta) & set(tradeoff_by_ta))
    rho, p = stats.spearmanr([tradeoff_by_ta[s] for s in common], [student_by_ta[s] for s in common])
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    print(f"Spearman(tradeoff, student accuracy) = {rho:.3f} (p = {p:.3f}, {len(common)} candidates)")
    out = write("scheduling_sst2", {
        "rows": rows, "spearman_tradeoff_vs_student": {"rho": float(rho), "p": float(p), "n": len(common)},
        "per_candidate": [{"sparsity": s, "tradeoff": tradeoff_by_ta[s], "student_accuracy": student_by_ta[s]}
                          for s in common],
        "budget": {"recovery_steps": cfg.recovery.steps, "student_steps": cfg.recovery.steps,
                   "train_rows": len(prep.train), "dev_rows": len(prep.dev), "grid": list(cfg.pruning.grid),
                   "lam": cfg.pruning.lam, "student_sparsity": cfg.pruning.student_sparsity},
        "teacher_accuracy": prep.teacher_metrics["metric"]}, args.quick)
    plot(common, tradeoff_by_ta, student_by_ta, rows, float(rho), out.with_suffix(".png"))


def plot(common: list[float], tradeoff: dict[float, float], student: dict[float, float],
         rows: list[dict[str, Any]], rho: float, path: Path) -> None:
    from minidisc_ray.report import figure

    with figure(path, 2, size=(10, 3.8), dpi=110) as (_, (a, b)):
        a.scatter([tradeoff[s] for s in common], [student[s] for s in common])
        for s in common:
            a.annotate(f"{s:.2f}", (tradeoff[s], student[s]), fontsize=7)
        a.set_xlabel("assistant lambda-tradeoff")
        a.set_ylabel("accuracy of the student distilled through it")
        a.set_title(f"Spearman rho = {rho:.2f}")
        a.grid(alpha=0.3)
        names = [r["strategy"] for r in rows]
        b.bar(names, [r["scheduling_cpu_s"] for r in rows], color="C1")
        b.set_ylabel("scheduling CPU-seconds")
        for i, r in enumerate(rows):
            acc = r["student_accuracy"]
            b.annotate("" if acc is None else f"acc {acc:.3f}", (i, r["scheduling_cpu_s"]), ha="center", fontsize=8)
        b.set_title("Cost of choosing the assistant (student accuracy on top)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
