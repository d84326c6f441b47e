"""Speed: Ray Train distillation throughput against a bare torch loop, Tune trial overhead, and CPU
forward latency of candidates against their parameter count (GPU and bf16 too when a GPU is present).

    python benchmarks/speed.py            # all-MiniLM-L6-v2 teacher, SST-2 rows (needs ../shared/data)
    python benchmarks/speed.py --quick    # a tiny random BERT, for the test suite (about a minute)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import teacher_and_data, write  # noqa: E402


def setup(quick: bool) -> dict[str, Any]:
    return teacher_and_data(quick, max_dev_samples=64, importance_rows=128)


def bare_loop(env: dict[str, Any], student: Any, steps: int, batch: int, device: str = "cpu",
              bf16: bool = False) -> float:
    """Samples per second of the same distillation step without Ray: the engine's loop, in this process."""
    from minidisc_ray.data import infinite, make_loader
    from minidisc_ray.engine import Loop, LoopSpec
    from minidisc_ray.training import kd_loss_fn

    teacher = env["teacher"].to(device).eval()
    student = student.to(device).train()
    data = infinite(make_loader(env["train"], env["tokenizer"], batch, shuffle=True, seed=0))
    spec = LoopSpec(steps=steps + 1, lr=1e-4, warmup_ratio=0.0, precision="bf16" if bf16 else "fp32")
    loop = Loop(student, spec, kd_loss_fn(teacher))
    loop.step(data)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step(data)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import ray

    from minidisc_ray.chain.runner import StageSpec, run_stage
    from minidisc_ray.config import DistillConfig, RayConfig, RecoveryConfig
    from minidisc_ray.families import count_params
    from minidisc_ray.modelio.blobs import model_blob
    from minidisc_ray.pruning import plan_for_sparsity, prune_model
    from minidisc_ray.ray_env import ensure_ray
    from minidisc_ray.training import forward_latency_ms

    torch.manual_seed(0)
    env = setup(args.quick)
    steps = 10 if args.quick else 40
    batch = 32
    student = prune_model(env["teacher"], plan_for_sparsity(env["importance"], 0.7))
    results: dict[str, Any] = {"model": "tiny-bert" if args.quick else "all-MiniLM-L6-v2", "student_sparsity": 0.7,
                               "batch": batch, "steps": steps, "max_length": 64}

    # 1. bare torch loop (2 threads, as a Ray worker with 2 CPUs gets)
    torch.set_num_threads(2)
    results["bare_samples_per_s"] = bare_loop(env, prune_model(env["teacher"], plan_for_sparsity(env["importance"],
                                                                                                  0.7)), steps, batch)
    # 2. the same step inside one Ray Train worker
    ensure_ray(RayConfig(num_cpus=2))
    # the bare loop again with Ray's processes up but idle: what sharing 2 cores with them costs by itself
    results["bare_samples_per_s_ray_up"] = bare_loop(env, prune_model(env["teacher"], plan_for_sparsity(
        env["importance"], 0.7)), steps, batch)
    dc = DistillConfig(steps=steps, batch_size=batch, eval_every=steps, patience=10, num_workers=1,
                       cpus_per_worker=2, warmup_ratio=0.0)
    t0 = time.perf_counter()
    res = run_stage(StageSpec("speed", model_blob(env["teacher"]), model_blob(student), env["tokenizer"],
                              env["train"].with_format(None).data.table, env["dev"].with_format(None).data.table,
                              "accuracy", False, dc, 0), storage_path=str(Path("/tmp/minidisc-speed").resolve()))
    stage_wall = time.perf_counter() - t0
    in_loop = res.history[-1]["seconds"]  # steps + the one evaluation, checkpoint and report
    in_steps = res.history[-1]["train_seconds"]  # optimiser steps only, as the bare loop times them
    first = res.history[-1]["first_step_seconds"]  # warm-up, excluded on both sides
    results["ray_train_samples_per_s_in_loop"] = (steps - 1) * batch / (in_steps - first)
    results["ray_train_first_step_s"] = first
    results["ray_train_eval_and_report_s"] = in_loop - in_steps
    results["ray_train_stage_wall_s"] = stage_wall
    results["ray_train_fixed_cost_s"] = stage_wall - in_loop
    results["ray_over_bare_ratio"] = results["ray_train_samples_per_s_in_loop"] / results["bare_samples_per_s"]
    results["ray_over_bare_ray_up_ratio"] = (results["ray_train_samples_per_s_in_loop"]
                                             / results["bare_samples_per_s_ray_up"])

    # 3. Tune trial overhead: 4 candidates one after another; overhead = wall - in-trial compute
    from ray import tune

    from minidisc_ray.search.trial import SearchPayload, candidate_trial

    prunable, _ = count_params(env["teacher"])
    payload = SearchPayload(model_blob(env["teacher"]), env["tokenizer"], env["importance"],
                            env["train"].with_format(None).data.table, env["dev"].with_format(None).data.table,
                            "accuracy", False, prunable, (0, 0), 0.2, RecoveryConfig(steps=steps // 2), 0.9, 0)
    grid = [0.5, 0.7] if args.quick else [0.5, 0.6, 0.7, 0.8]
    t0 = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(candidate_trial, payload=payload), {"cpu": 2}),
                       param_space={"sparsity": tune.grid_search(grid)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                       run_config=tune.RunConfig(name="speed-overhead", storage_path="/tmp/minidisc-speed"))
    grid_results = tuner.fit()
    fit_wall = time.perf_counter() - t0
    compute = sum(r.metrics["seconds"] for r in grid_results)
    results["tune_trials"] = len(grid)
    results["tune_fit_wall_s"] = fit_wall
    results["tune_compute_s"] = compute
    results["tune_overhead_per_trial_s"] = (fit_wall - compute) / len(grid)
    ray.shutdown()

    # 4. latency against parameters
    probe = next(iter(__import__("minidisc_ray.data", fromlist=["make_loader"]).make_loader(
        env["train"].select(range(32)), env["tokenizer"], 32)))
    latency = []
    for s in [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]:
        m = prune_model(env["teacher"], plan_for_sparsity(env["importance"], s))
        p, total = count_params(m)
        latency.append({"sparsity": s, "prunable": p, "params": total,
                        "latency_ms_batch32": forward_latency_ms(m, probe, 5 if args.quick else 20)})
    results["cpu_latency"] = latency
    if torch.cuda.is_available():
        results["gpu_samples_per_s_fp32"] = bare_loop(env, prune_model(env["teacher"], plan_for_sparsity(
            env["importance"], 0.7)), steps, batch, device="cuda")
        results["gpu_samples_per_s_bf16"] = bare_loop(env, prune_model(env["teacher"], plan_for_sparsity(
            env["importance"], 0.7)), steps, batch, device="cuda", bf16=True)
    for k, v in results.items():
        if not isinstance(v, list):
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    out = write("speed", results, args.quick)
    plot(latency, out.with_suffix(".png"))


def plot(latency: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["prunable"] / 1e6 for r in latency], [r["latency_ms_batch32"] for r in latency], "o-")
    for r in latency:
        ax.annotate(f"s={r['sparsity']}", (r["prunable"] / 1e6, r["latency_ms_batch32"]), fontsize=7)
    ax.set_xlabel("prunable (encoder) parameters, millions")
    ax.set_ylabel("CPU forward latency, ms (batch 32)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
