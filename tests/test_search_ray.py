"""Search on real Ray Tune: a simulated three-node cluster, strategy comparison, and resume after a kill."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from minidisc_ray.config import config_from_dict

pytestmark = [pytest.mark.ray]

GRID = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]


def tiny_config(teacher: Path, out: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "seed": 1, "output_dir": str(out),
        "task": {"data": str(data), "max_train_samples": 300, "max_dev_samples": 120, "max_length": 32},
        "teacher": {"model": str(teacher), "finetune": "never"},
        "pruning": {"grid": GRID, "importance_samples": 64, "student_sparsity": 0.9},
        "recovery": {"steps": 4, "batch_size": 16},
        "search": {"strategy": "bisection", "max_concurrent_trials": 2, "points_per_round": 2,
                   "optuna_trials": 4, "sweep": False},  # the gap sweep's exactness is a unit test's job
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.update({section: values})
    return cfg


def test_search_fans_out_over_cluster_nodes_and_compare(tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from minidisc_ray.search.driver import run_compare, run_search

    if ray.is_initialized():  # the test run's shared Ray (conftest.ray_session): this test joins a cluster of its own
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    try:
        # trials long enough (~150 steps) that the second node's worker is up before the first trial ends: with
        # 4-step trials Tune could reuse the first node's actor for every trial while the other one still started
        cfg = config_from_dict(tiny_config(teacher_dir, tmp_path / "run", sst2_dir, ray={"address": cluster.address},
                                           recovery={"steps": 150, "batch_size": 16}))
        summary = run_search(cfg, tmp_path / "run")
        assert len(summary["nodes"]) >= 2, summary["nodes"]
        assert summary["chosen_sparsity"] in GRID
        assert summary["evaluations"] < len(GRID), "the bisection converges before trying every candidate"
        written = json.loads((tmp_path / "run" / "search.json").read_text())
        assert written["chosen_sparsity"] == summary["chosen_sparsity"]
        best = max((c for c in written["candidates"]), key=lambda c: (c["tradeoff"], c["sparsity"]))
        assert best["sparsity"] == written["chosen_sparsity"]
        for c in written["candidates"]:
            assert set(c) >= {"sparsity", "params", "metric", "tradeoff", "seconds", "node"}
            assert math.isclose(c["tradeoff"], c["metric"] + 0.2 * c["param_sparsity"])
        assert Path(written["experiment_path"]).is_dir()

        names = ["bisection", "grid", "optuna", "sandwich", "exhaustive"]
        five = GRID[::2]  # every strategy on five candidates (the search above had nine)
        cfg = config_from_dict(tiny_config(teacher_dir, tmp_path / "cmp", sst2_dir, ray={"address": cluster.address},
                                           pruning={"grid": five, "importance_samples": 64, "student_sparsity": 0.9}))
        data = run_compare(cfg, tmp_path / "cmp", names)
        assert list(data["strategies"]) == names
        strategies = data["strategies"]
        assert strategies["grid"]["evaluations"] == len(five)
        assert strategies["optuna"]["evaluations"] == 4
        assert strategies["sandwich"]["evaluations"] == 1
        assert len(strategies["sandwich"]["candidates"]) == len(five)
        assert all("student_metric" in c for c in strategies["exhaustive"]["candidates"])
        grid_curve = {c["sparsity"]: c["tradeoff"] for c in strategies["grid"]["candidates"]}
        assert strategies["grid"]["chosen_sparsity"] == max(sorted(grid_curve), key=lambda s: grid_curve[s])
        for r in strategies.values():
            assert set(r) >= {"chosen_sparsity", "evaluations", "seconds", "candidates"}
            for c in r["candidates"]:
                assert set(c) >= {"sparsity", "params", "metric", "tradeoff"}
        assert (tmp_path / "cmp" / "compare.md").read_text().count("\n|") == len(names) + 2  # header, rule, rows
        assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    finally:
        ray.shutdown()
        cluster.shutdown()


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _recorded(out: Path) -> set[float]:
    """Sparsities whose evaluation the project has recorded in OUTPUT/evaluations."""
    return {json.loads(p.read_text())["result"]["sparsity"] for p in (out / "evaluations").glob("*.json")}


def _study_trials(out: Path) -> list[Any]:
    import optuna

    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{out / 'optuna.db'}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{out / 'optuna.db'}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.slow
def test_rerun_after_driver_is_killed_computes_no_recorded_evaluation_again(tmp_path: Path, teacher_dir: Path,
                                                                            sst2_dir: Path) -> None:
    """A killed Optuna search resumes its RDB study (history kept, budget counted over both runs) and
    computes no recorded evaluation again."""
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    # ~3 s per trial, so the kill lands while a trial runs, not after the search has ended
    cfg = tiny_config(teacher_dir, out, sst2_dir, recovery={"steps": 300, "batch_size": 16},
                      search={"strategy": "optuna", "optuna_trials": 4, "max_concurrent_trials": 1},
                      ray={"num_cpus": 1})
    cfg_path.write_text("# Run: minidisc search cfg.yaml\n" + yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "minidisc_ray.cli", "search", str(cfg_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    events_path = out / "trial_events.jsonl"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_fh, env=env, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and len(_recorded(out)) < 2:
            time.sleep(0.2)
            assert proc.poll() is None, "the search ended before it could be interrupted"
        # SIGTERM to the driver alone, as Kubernetes and `ray job stop` send it: it ends like Ctrl-C
        proc.send_signal(signal.SIGTERM)
        t_term = time.time()
        proc.wait(timeout=60)
    err = log.read_text()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("minidisc: terminated (SIGTERM)"), err[-2000:]
    assert time.time() - t_term < 30
    assert "Traceback" not in err
    assert "SIGABRT" not in err
    assert "*** " not in err
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left of the group (there should be nothing)
    killed_at = time.time()
    recorded = _recorded(out)
    assert len(recorded) >= 2
    assert not (out / "search.json").exists()
    completed_before = len(_study_trials(out))
    assert 1 <= completed_before < 4

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "finished evaluation(s) recorded" in rerun.stderr
    assert f"resumes with {completed_before} completed trial(s) of 4" in rerun.stderr
    assert len(_study_trials(out)) == 4, "the study's history counts toward the budget"
    after = [e for e in _events(events_path) if e["time"] > killed_at]
    started_again = {e["sparsity"] for e in after if e["event"] == "start"}
    assert not recorded & started_again, f"recorded evaluations were computed again: {recorded & started_again}"
    assert recorded <= {e["sparsity"] for e in after if e["event"] == "reused"}
    summary = json.loads((out / "search.json").read_text())
    assert summary["chosen_sparsity"] in GRID
    assert summary["reused"] >= len(recorded & {c["sparsity"] for c in summary["candidates"]})
    finishes = [e["sparsity"] for e in _events(events_path) if e["event"] == "finish"]
    assert len(finishes) == len(set(finishes)), "every candidate was computed at most once over both runs"
    assert not list(Path(summary["experiment_path"]).parent.glob("*/tuner.pkl.restored")), "nothing was restored"


def test_all_trials_failing_stops_the_search_with_one_line(tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    cfg = tiny_config(teacher_dir, tmp_path / "run", sst2_dir, pruning={"grid": [0.5]},
                      search={"strategy": "grid", "max_concurrent_trials": 1}, ray={"num_cpus": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("# Run: minidisc search cfg.yaml\n" + yaml.safe_dump(cfg))
    env = {**os.environ, "MINIDISC_TEST_FAIL_TRIALS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "search", str(cfg_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("minidisc: error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(errors) == 1, errors
    assert "every one of the 1 grid trial(s) failed" in errors[0], errors
    # Tune's ERROR traceback of the failed trial stays in Ray's logs; the terminal gets minidisc's line
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Trial task failed" not in proc.stderr, proc.stderr[-2000:]
    assert "[search] trial s=0.5 failed" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "search.json").exists()


def test_a_candidate_trial_on_two_fsdp_workers_is_scored_like_a_one_worker_trial(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    """``search.trial_workers: 2``: the Tune trial runs the candidate's recovery as a 2-worker TorchTrainer
    (FSDP2, gloo), each worker on half of every batch; its score matches the same candidate recovered in one
    process on whole batches (the gradient of the mean over the batch either way)."""
    from minidisc_ray.candidates import SearchPayload, score_candidate
    from minidisc_ray.modelio.load import load_model_dir, save_model_dir
    from minidisc_ray.pipeline import prepare
    from minidisc_ray.search.driver import run_search

    # without dropout the two recoveries see the same batches and the same gradients (dropout would draw
    # different masks for a half batch than for the whole one: the same training in distribution only)
    model, tok, _, _ = load_model_dir(str(teacher_dir))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    teacher_dir = save_model_dir(model, tok, tmp_path / "teacher")
    raw = tiny_config(teacher_dir, tmp_path / "one", sst2_dir, pruning={"grid": [0.5], "student_sparsity": 0.9},
                      recovery={"steps": 6, "batch_size": 16}, search={"strategy": "grid", "max_concurrent_trials": 1})
    single = score_candidate(SearchPayload.from_prepared(prepare(config_from_dict(raw), tmp_path / "one")), 0.5)
    raw["output_dir"] = str(tmp_path / "two")
    raw["search"].update(trial_workers=2, trial_cpus=2)
    summary = run_search(config_from_dict(raw), tmp_path / "two")
    (row,) = summary["candidates"]
    assert row["sparsity"] == 0.5
    assert row["params"] == single["params"]
    (record,) = [json.loads(p.read_text())["result"] for p in (tmp_path / "two" / "evaluations").glob("*.json")]
    got, want = record["recovery_loss"], single["recovery_loss"]
    assert abs(got - want) < 2e-3 * abs(want), (got, want)
    assert abs(row["metric"] - single["metric"]) <= 1 / 120 + 1e-9, (row["metric"], single["metric"])
    bad = {**raw, "search": {**raw["search"], "trial_workers": 3}}
    with pytest.raises(Exception, match="recovery.batch_size"):
        config_from_dict(bad)


@pytest.mark.slow
def test_a_two_worker_trial_with_the_teacher_sharded_scores_as_with_it_replicated(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    """``teacher.placement: sharded`` with ``search.trial_workers: 2``: each worker of the trial reads its shard
    of the teacher and of the candidate from the teacher's safetensors (nothing of the teacher goes to the object
    store) and the candidate is evaluated sharded; the recorded evaluation is the replicated 2-worker trial's
    (the same candidate, the same batches, the same FSDP training)."""
    from minidisc_ray.modelio.load import load_model_dir, save_model_dir
    from minidisc_ray.pipeline import prepare
    from minidisc_ray.search.driver import run_search, search_payload

    model, tok, _, _ = load_model_dir(str(teacher_dir))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    teacher_dir = save_model_dir(model, tok, tmp_path / "teacher")
    records = {}
    for placement in ("replicated", "sharded"):
        raw = tiny_config(teacher_dir, tmp_path / placement, sst2_dir, pruning={"grid": [0.6], "student_sparsity": 0.9},
                          recovery={"steps": 6, "batch_size": 16},
                          search={"strategy": "grid", "max_concurrent_trials": 1, "trial_workers": 2, "trial_cpus": 2})
        raw["teacher"]["placement"] = placement
        cfg = config_from_dict(raw)
        if placement == "sharded":
            payload = search_payload(prepare(cfg, tmp_path / placement), None)  # its teacher pass is reused
            assert payload.teacher_blob is None
            assert payload.teacher_dir == str(Path(teacher_dir).resolve())
        summary = run_search(cfg, tmp_path / placement)
        (row,) = summary["candidates"]
        (record,) = [json.loads(p.read_text())["result"] for p in (tmp_path / placement / "evaluations").glob("*.json")]
        records[placement] = {**record, "row": row}
    a, b = records["replicated"], records["sharded"]
    print({k: (a[k], b[k]) for k in ("recovery_loss", "metric", "params", "prunable")})
    assert b["recovery_loss"] == pytest.approx(a["recovery_loss"], rel=1e-5)
    assert (b["metric"], b["params"], b["prunable"]) == (a["metric"], a["params"], a["prunable"])
    assert b["row"]["tradeoff"] == a["row"]["tradeoff"]
    # the strategies whose trials hold the teacher whole in one process are refused, with the fix
    with pytest.raises(Exception, match="search.trial_workers: 1"):
        config_from_dict({**raw, "search": {**raw["search"], "strategy": "halving"}})
    # the sharded pass's record is signed: an edited one is not believed, the pass runs again and rewrites it
    kept = tmp_path / "sharded" / "teacher_pass.json"
    honest = json.loads(kept.read_text())
    kept.write_text(json.dumps({**honest, "metrics": {**honest["metrics"], "metric": 0.99}}))
    again = prepare(cfg, tmp_path / "sharded")
    assert again.teacher_metrics["metric"] == honest["metrics"]["metric"]
    assert json.loads(kept.read_text())["metrics"] == honest["metrics"]
