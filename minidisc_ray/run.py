"""``minidisc run``: the whole job, config -> teacher -> candidates -> report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from minidisc_ray.config import Config
from minidisc_ray.families import count_params
from minidisc_ray.pipeline import importance_of, log, prepare
from minidisc_ray.pruning import plan_for_sparsity, prune_model
from minidisc_ray.training import evaluate


def run_job(cfg: Config, output_dir: str | Path, command: str = "") -> dict[str, Any]:
    out = Path(output_dir)
    t0 = time.perf_counter()
    prep = prepare(cfg, out)
    imp = importance_of(prep)
    candidates = []
    for s in sorted(cfg.pruning.grid):
        pruned = prune_model(prep.teacher, plan_for_sparsity(imp, s))
        prunable, total = count_params(pruned)
        m = evaluate(pruned, prep.dev_loader(), prep.task.metric)
        candidates.append({"sparsity": s, "params": total, "prunable": prunable, "metric": m["metric"]})
        log(f"[prune] s={s:.2f} prunable {prunable} metric before recovery {m['metric']:.4f}")
    report = {"teacher": {"sparsity": 0.0, "params": prep.total, "metric": prep.teacher_metrics["metric"]},
              "assistant": None, "student": None, "candidates": candidates, "command": command,
              "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
