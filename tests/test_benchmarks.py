"""Every benchmark script runs in --quick mode and writes its JSON (with the machine) and PNG."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


def _run(script: str, tmp_path: Path, timeout: int, data: Path | None = None) -> dict:
    env = {**os.environ, "MINIDISC_BENCH_RESULTS": str(tmp_path)}
    if data is not None:
        env["MINIDISC_SST2_DIR"] = str(data)  # the tests' own SST-2-shaped data, not ../shared
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick"], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script.removesuffix(".py")
    assert (tmp_path / f"{name}.quick.png").stat().st_size > 5000
    data = json.loads((tmp_path / f"{name}.quick.json").read_text())
    assert data["quick"] is True
    assert data["machine"]["cpu_cores"] >= 1
    assert data["machine"]["torch"]
    return data


def test_searcher_efficiency_quick(tmp_path: Path) -> None:
    data = _run("searcher_efficiency.py", tmp_path, 300)
    rows = {(r["curve"], r["K"], r["strategy"]): r for r in data["rows"]}
    for k in (8, 16):
        bisection = rows[("unimodal", k, "bisection")]
        assert bisection["found_exact"] == bisection["seeds"]
        assert bisection["worst_evals_to_argmax"] <= data["golden_bound"][str(k)]
        assert rows[("unimodal", k, "grid")]["median_total_evals"] == k
    assert ("sst2-real", 9, "optuna-tpe") in rows


@pytest.mark.ray
@pytest.mark.benchmark
def test_speed_quick(tmp_path: Path, sst2_dir: Path) -> None:
    data = _run("speed.py", tmp_path, 600, sst2_dir)
    assert data["bare_samples_per_s"] > 0
    assert data["ray_train_samples_per_s_in_loop"] > 0
    assert data["tune_overhead_per_trial_s"] > 0
    lat = data["cpu_latency"]
    assert [r["prunable"] for r in lat] == sorted((r["prunable"] for r in lat), reverse=True)


@pytest.mark.ray
@pytest.mark.benchmark
def test_scheduling_quick(tmp_path: Path, sst2_dir: Path) -> None:
    data = _run("scheduling_sst2.py", tmp_path, 600, sst2_dir)
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {"exhaustive", "bisection", "sandwich", "direct-kd"}
    assert rows["exhaustive"]["regret"] == 0.0
    assert rows["exhaustive"]["evaluations"] == len(data["budget"]["grid"])
    assert rows["bisection"]["evaluations"] <= rows["exhaustive"]["evaluations"]
    rho = data["spearman_tradeoff_vs_student"]["rho"]
    assert math.isnan(rho) or -1.0 <= rho <= 1.0  # NaN when a tiny random model's students all tie


@pytest.mark.ray
@pytest.mark.benchmark
def test_memory_quick(tmp_path: Path, sst2_dir: Path) -> None:
    data = _run("memory.py", tmp_path, 600, sst2_dir)
    trial, stage = data["rows"]
    for row in (trial, stage):
        assert row["rss_growth_mb"] > 0
        assert row["teacher_mb"] > row["candidate_mb"] > 0
        assert row["ratio_to_teacher_plus_candidate"] == pytest.approx(
            row["rss_growth_mb"] / (row["teacher_mb"] + row["candidate_mb"]))
    names = [p["after"] for p in data["trial_phases_mb"]]
    assert names[0].startswith("teacher rebuilt")
    assert len(names) == 4



@pytest.mark.benchmark
def test_memory_against_plan_quick(tmp_path: Path, sst2_dir: Path) -> None:
    """Each case in a fresh process, under both malloc settings, beside the plan's CPU column."""
    env = {**os.environ, "MINIDISC_BENCH_RESULTS": str(tmp_path), "MINIDISC_SST2_DIR": str(sst2_dir)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--against-plan", "--quick"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "memory_plan.quick.json").read_text())
    assert [(r["model"], r["role"]) for r in data["rows"]] == [("tiny-bert", "trial"), ("tiny-bert", "stage"),
                                                               ("tiny-llama", "trial"), ("tiny-llama", "stage")]
    for r in data["rows"]:
        assert r["measured_mb_returns_freed"] > 0
        assert r["plan_mb"]["total"] == pytest.approx(
            sum(v for k, v in r["plan_mb"].items() if k != "total"))
        assert r["plan_error"] == pytest.approx(r["plan_mb"]["total"] / r["measured_mb_returns_freed"] - 1)
        assert ("best_weights" in r["plan_mb"]) == (r["role"] == "stage")
    assert (tmp_path / "memory_plan.quick.png").stat().st_size > 5000

def _as_on_the_gpu_machine(script: str, *args: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """``benchmarks/SCRIPT ARGS`` run by ``benchmarks/gpu_env.py``: ray, datasets, optuna and pandas hidden, as
    the lent GPU machine lacks them."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_env.py"), str(REPO / "benchmarks" / script),
                           *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_the_gpu_machine_s_runner_hides_what_that_machine_lacks(tmp_path: Path) -> None:
    """The runner the GPU checks are tested through: a script importing datasets fails there as it would on the
    GPU machine, and find_spec answers None (what transformers' availability checks read)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib.util\nprint('spec', importlib.util.find_spec('optuna'))\nimport datasets\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_env.py"), str(probe)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert "spec None" in proc.stdout
    assert "No module named 'datasets' (hidden: the GPU machine lacks it)" in proc.stderr


def test_gpu_check_validates_itself_in_a_dry_run_without_ray_or_datasets(tmp_path: Path) -> None:
    """``benchmarks/gpu.py --dry-run`` as on the GPU machine (ray, datasets, optuna hidden): the GPU check's code
    path on the CPU with tiny random models of the three chains' families, writing the record a GPU run writes:
    throughput, FLOP/s and MFU against a nominal peak, the plan's memory."""
    env = {**os.environ, "MINIDISC_BENCH_RESULTS": str(tmp_path)}
    proc = _as_on_the_gpu_machine("gpu.py", "--dry-run", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.dryrun.json").read_text())
    assert data["device"] == "cpu (dry run)"
    assert set(data["stages"]) == {"minilm", "smollm2", "llama1b"}
    for row in data["stages"].values():
        assert row["samples_per_s"] > 0
        assert row["tokens_per_s"] > 0
        assert 0 < row["mfu"]
        assert row["trained_params"] < row["teacher_params"]
        assert row["plan_gib"] > 0
        items = row["plan_items_gib"]
        assert abs(sum(v for k, v in items.items() if k != "total") - items["total"]) < 1e-3
    no_gpu = _as_on_the_gpu_machine("gpu.py", env=env, timeout=120)
    assert no_gpu.returncode != 0
    assert "no CUDA device here" in no_gpu.stderr


def test_the_paper_budget_gpu_study_runs_its_dry_run_without_ray_or_datasets(tmp_path: Path) -> None:
    """``benchmarks/gpu_study.py --dry-run`` as on the GPU machine: a tiny packed teacher and rows, every stage of
    the slice for 2 steps on the CPU; the record names each candidate's tradeoff and students (validation and
    held-out dev), direct KD, both picks and their regrets on the dev rows."""
    out = tmp_path / "study.json"
    proc = _as_on_the_gpu_machine("gpu_study.py", "--dry-run", "--out", str(out), env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (seed,) = data["per_seed"]
    assert [c["sparsity"] for c in seed["candidates"]] == data["grid"]
    assert seed["train_rows"] + seed["validation_rows"] == 96 and seed["dev_rows"] == 32
    for c in seed["candidates"]:
        assert c["tradeoff"] == pytest.approx(c["recovered"] + data["lam"] * c["param_sparsity"])
        assert 0 <= c["student_dev"] <= 1 and 0 <= c["student"] <= 1
    options = [c["student_dev"] for c in seed["candidates"]] + [seed["direct_kd"]["dev"]]
    lam_pick = data["grid"].index(seed["lambda_pick"])
    assert seed["regret_dev"]["lambda"] == pytest.approx(max(options) - seed["candidates"][lam_pick]["student_dev"])
    assert seed["regret_dev"]["exhaustive"] >= 0
    no_gpu = _as_on_the_gpu_machine("gpu_study.py", env=dict(os.environ), timeout=120)
    assert no_gpu.returncode != 0 and "no CUDA device here" in no_gpu.stderr


@pytest.mark.benchmark
def test_axes_quick(tmp_path: Path) -> None:
    """``benchmarks/axes.py --quick``: every axis set at both budgets on a tiny encoder and decoder, with a chain per
    axis set; a shape within budget removes at least the budget, and the stock-loaded export gives the same logits."""
    data = _run("axes.py", tmp_path, 600)
    for name, res in data["models"].items():
        rows = res["candidates"]
        assert {(r["axes"], r["budget"]) for r in rows} == {(a, b) for a in data["axis_sets"] for b in data["budgets"]}
        for r in rows:
            if r["meets_budget"]:
                assert r["removed"] >= r["budget"] - 1e-9, (name, r)
            assert r["latency_ms"] > 0 and 0 <= r["metric_recovered"] <= 1
        assert all(r["meets_budget"] for r in rows if r["axes"] == "all"), name
        assert {c["axes"] for c in res["chains"]} == set(data["axis_sets"])
    export = data["models"]["smollm2"]["export_hf"]
    assert export["class"] == "LlamaForCausalLM" and export["max_abs_logit_diff"] < 1e-4


@pytest.mark.benchmark
def test_student_score_quick(tmp_path: Path) -> None:
    """``benchmarks/student_score.py --quick``: the score of every candidate of a made-up study, and each
    predictor judged by Spearman and held-out regret."""
    data = _run("student_score.py", tmp_path, 600)
    res = data["studies"]["made-up"]
    assert [c["sparsity"] for c in res["candidates"]] == [0.5, 0.7, 0.9]
    assert all(0 <= c["stability"] <= 1 and -1 <= c["alignment"] <= 1 for c in res["candidates"])
    judged = res["judged"]
    assert {"lambda-tradeoff", "student alignment", "student stability"} <= set(judged)
    assert all(j["regret"]["mean"] >= 0 for j in judged.values())
