"""Peak resident memory of one candidate trial and one chain stage, against the bytes of the models.

    python benchmarks/memory.py            # all-MiniLM-L6-v2 teacher, SST-2 rows (a few minutes, 2 cores)
    python benchmarks/memory.py --quick    # a tiny random BERT (about a minute)

Both run where they run in a job: the trial in a Ray worker reading the teacher from the object store
(``SearchPayload`` with object references), the stage in a Ray Train worker (``MINIDISC_MEMORY_PROBE=1``
makes the stage record its peak). The figure is the growth of the worker's resident memory (``VmRSS``,
touched object-store pages included) from before any model is built to the peak, next to:

* ``teacher_bytes + candidate_bytes``: the weights that must be resident;
The baseline is taken after imports and torch's one-time initialisation (kernels, thread pools, allocator:
``memprobe.warm_up_torch``), which every worker pays once whatever it trains; the absolute peak is
reported too.

* the training state the optimiser adds on top (gradients and AdamW's two moments: 3 x the trainable
  candidate), and for the stage the CPU copy of the best weights (1 x candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import teacher_and_data, write  # noqa: E402


def _bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ["MINIDISC_MEMORY_PROBE"] = "1"  # before Ray starts: its workers inherit it
    import ray
    import torch

    from minidisc_ray.candidates import SearchPayload
    from minidisc_ray.chain import run_stage
    from minidisc_ray.config import DistillConfig, RayConfig, RecoveryConfig
    from minidisc_ray.data import make_loader
    from minidisc_ray.families import count_params
    from minidisc_ray.modelio import model_blob
    from minidisc_ray.pruning import plan_for_sparsity, prune_model
    from minidisc_ray.ray_env import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="minidisc-memory-"))
    env = teacher_and_data(args.quick, max_dev_samples=200, importance_rows=64)
    teacher, tokenizer, train, dev, imp = (env[k] for k in ("teacher", "tokenizer", "train", "dev", "importance"))
    steps = 10 if args.quick else 30
    trial_s, stage_s = 0.5, 0.9
    candidate = prune_model(teacher, plan_for_sparsity(imp, trial_s))
    student = prune_model(teacher, plan_for_sparsity(imp, stage_s))
    teacher_b, cand_b, student_b = _bytes(teacher), _bytes(candidate), _bytes(student)

    ensure_ray(RayConfig(num_cpus=2))
    prunable, _ = count_params(teacher)
    payload = SearchPayload(ray.put(model_blob(teacher)), tokenizer, imp, ray.put(train.with_format(None).data.table),
                            ray.put(dev.with_format(None).data.table), "accuracy", False, prunable, (0, 0), 0.2,
                            RecoveryConfig(steps=steps, batch_size=32), 0.9, 0)

    @ray.remote(num_cpus=2)
    class Probe:
        def ready(self) -> bool:
            import minidisc_ray.candidates  # noqa: F401 - imports before the baseline
            from minidisc_ray.memprobe import rss_bytes, warm_up_torch

            torch.set_num_threads(2)
            warm_up_torch()  # the runtime's one-time memory is not the trial's
            return rss_bytes()

        def trial(self, payload: SearchPayload, sparsity: float) -> dict[str, Any]:
            from minidisc_ray.candidates import score_candidate
            from minidisc_ray.memprobe import PeakRSS
            from minidisc_ray.ray_env import resolved

            torch.set_num_threads(2)
            with PeakRSS() as probe:  # the object-store reads count, as when score_candidate made them
                result = score_candidate(resolved(payload), sparsity)
            return {"rss_start": probe.start, "rss_peak": probe.peak, "seconds": result["seconds"]}

        def phases(self, payload: SearchPayload, sparsity: float, steps: int) -> list[tuple[str, float]]:
            """Where a trial's memory goes: RSS growth after each phase of ``score_candidate``'s work."""
            from minidisc_ray.data import infinite
            from minidisc_ray.engine import Loop, LoopSpec
            from minidisc_ray.memprobe import rss_bytes
            from minidisc_ray.pruning import plan_for_sparsity, prune_model
            from minidisc_ray.ray_env import resolved
            from minidisc_ray.training import kd_loss_fn

            r0 = rss_bytes()
            out: list[tuple[str, float]] = []

            def mark(name: str) -> None:
                out.append((name, (rss_bytes() - r0) / 2**20))

            payload = resolved(payload)
            teacher = payload.teacher()
            mark("teacher rebuilt over the object store (pages not yet read)")
            cand = prune_model(teacher, plan_for_sparsity(payload.importance, sparsity))
            mark("candidate sliced (teacher pages read + candidate weights)")
            data = infinite(make_loader(payload.dataset("train"), payload.tokenizer, 32, shuffle=True, seed=0))
            loop = Loop(cand, LoopSpec(steps=steps, lr=1e-4), kd_loss_fn(teacher))
            loop.step(data)
            mark("after 1 step (+ gradients, activations)")
            for _ in range(steps - 1):
                loop.step(data)
            mark(f"after {steps} steps (+ AdamW moments)")
            return out

    actor = Probe.remote()  # type: ignore[attr-defined]
    worker_baseline = ray.get(actor.ready.remote())
    trial = ray.get(actor.trial.remote(payload, trial_s))
    ray.kill(actor)
    second = Probe.remote()  # type: ignore[attr-defined]
    ray.get(second.ready.remote())
    phases = ray.get(second.phases.remote(payload, trial_s, steps))
    ray.kill(second)

    events = work / "events.jsonl"
    dc = DistillConfig(steps=steps, batch_size=32, eval_every=max(1, steps // 2), num_workers=1, cpus_per_worker=2)
    run_stage("memory", payload.teacher_blob, model_blob(student), tokenizer, payload.train_table, payload.dev_table,
              "accuracy", False, dc, 0, str(work / "train"), events_path=str(events), run_id="memory")
    stage = next(e for e in (json.loads(x) for x in events.read_text().splitlines()) if e["event"] == "memory")
    ray.shutdown()

    def row(name: str, probe: dict[str, Any], model_b: int, extra_copies: int) -> dict[str, Any]:
        delta = probe["rss_peak"] - probe["rss_start"]
        weights = teacher_b + model_b
        training = weights + 3 * model_b + extra_copies * model_b
        return {"what": name, "rss_growth_mb": delta / 2**20, "teacher_mb": teacher_b / 2**20,
                "candidate_mb": model_b / 2**20, "ratio_to_teacher_plus_candidate": delta / weights,
                "weights_plus_training_state_mb": training / 2**20, "ratio_to_weights_plus_training_state":
                delta / training}

    rows = [row(f"candidate trial (s={trial_s}, {steps} recovery steps)", trial, cand_b, 0),
            row(f"chain stage (student s={stage_s}, {steps} steps, 1 worker)", stage, student_b, 1)]
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    for name, mb in phases:
        print(f"  trial phase: {name}: +{mb:.0f} MB")
    out = write("memory", {"model": "tiny-bert" if args.quick else "all-MiniLM-L6-v2", "rows": rows,
                           "trial_worker_rss_after_warm_up_mb": worker_baseline / 2**20,
                           "trial_worker_rss_peak_mb": trial["rss_peak"] / 2**20,
                           "trial_phases_mb": [{"after": name, "rss_growth_mb": mb} for name, mb in phases],
                           "batch": 32, "max_length": 64, "steps": steps,
                           "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
                           "note": "rss growth of the worker from before any model is built to its peak; "
                                   "training state = gradients + AdamW moments (3 x candidate), "
                                   "stage also keeps the best weights on the CPU (1 x candidate)"}, args.quick)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} in {time.process_time():.0f} CPU s")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from minidisc_ray.report import figure

    with figure(path, size=(7, 3.6)) as (_, ax):
        labels = [r["what"].split(" (")[0] for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["teacher_mb"] + r["candidate_mb"] for r in rows], 0.27,
               label="teacher + candidate weights")
        ax.bar(list(x), [r["weights_plus_training_state_mb"] for r in rows], 0.27, label="+ grads, AdamW moments")
        ax.bar([i + 0.27 for i in x], [r["rss_growth_mb"] for r in rows], 0.27, label="measured RSS growth")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("MB")
        ax.set_title("Peak memory of one trial and one stage")
        ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
