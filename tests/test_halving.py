"""Trial distillation with early stopping: the halving strategy on a real Tune scheduler, and auto (the lambda
search's shortlist plus "no assistant"), with per-rung evidence against the dev set's noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from minidisc_ray.report import evidence_lines
from minidisc_ray.search.arms import rungs_for
from minidisc_ray.search.halving import shortlist, summarise
from minidisc_ray.stats import dev_noise, pack_rows, paired_noise, unpack_rows

from .conftest import make_tokenizer


def test_rungs_noise_summary_and_shortlist() -> None:
    assert rungs_for(90, 1 / 9, 3) == [10, 30, 90]
    assert rungs_for(100, 1 / 9, 3) == [11, 33, 100]
    assert rungs_for(120, 1 / 9, 3) == [13, 40, 120]
    assert rungs_for(9, 1 / 9, 3) == [1, 3, 9]
    assert rungs_for(100, 0.5, 3) == [100]
    assert rungs_for(5, 1.0, 3) == [5]
    assert dev_noise("accuracy", 0.8, 100) == pytest.approx(math.sqrt(2 * 0.16 / 100))
    assert dev_noise("matthews_correlation", 0.5, 100) is None
    rows = [{"arm": 0.5, "rung": 1, "student_metric": 0.70}, {"arm": 0.9, "rung": 1, "student_metric": 0.72},
            {"arm": 0.7, "rung": 1, "student_metric": 0.60},
            {"arm": 0.5, "rung": 2, "student_metric": 0.80}, {"arm": 0.9, "rung": 2, "student_metric": 0.74}]
    h = summarise(rows, [10, 30], "accuracy", 400, 0.9)
    assert h["chosen_sparsity"] == 0.5
    assert h["rungs"][0]["winner"] == "no assistant"
    top = h["rungs"][1]
    assert top["winner"] == "assistant 0.5"
    assert top["margin"] == pytest.approx(0.06)
    assert top["noise"] == pytest.approx(math.sqrt(2 * 0.8 * 0.2 / 400))
    assert top["beyond_noise"] is True
    lines = evidence_lines(h, "accuracy")
    assert "assistant 0.5 won by 6.0 pt over no assistant, noise 2.8 pt (beyond it)" in lines[1]
    assert lines[-1] == ("how sure: assistant 0.5 led no assistant at rung 2, the last where two arms met, by 2.1 "
                         "times the noise")
    # paired: the two students are compared on the rows where they differ, not as independent models
    import numpy as np

    a = (np.arange(401) < 320).astype(np.int8)
    b = a.copy()
    b[:13], b[330:341] = 0, 1  # they disagree on 24 of 401 rows, 13 for a and 11 for b (401: packing pads)
    assert np.array_equal(unpack_rows(pack_rows(a)), a)
    assert pack_rows(a).startswith("401:")
    se, disagree = paired_noise(a, b)
    d = a.astype(float) - b
    assert disagree == 24
    assert se == pytest.approx(np.std(d, ddof=1) / math.sqrt(401))
    assert se < dev_noise("accuracy", float(a.mean()), 401) / 2
    paired = [{"arm": 0.5, "rung": 1, "student_metric": float(a.mean()), "dev_correct": pack_rows(a)},
              {"arm": 0.9, "rung": 1, "student_metric": float(b.mean()), "dev_correct": pack_rows(b)},
              {"arm": 0.7, "rung": 1, "student_metric": 0.1}]
    h = summarise(paired, [10], "accuracy", 401, 0.9)
    r = h["rungs"][0]
    assert r["noise_kind"] == "paired"
    assert r["disagree"] == 24
    assert r["noise"] == pytest.approx(se)
    assert r["margin"] == pytest.approx(abs(a.mean() - b.mean()))
    assert f"(paired: they disagree on 24 of 401 rows that select; {'beyond' if r['beyond_noise'] else 'within'} it)" \
        in evidence_lines(h, "accuracy")[0]
    assert r["beyond_noise"] is False  # 2 rows of 401 against a 1.2-point noise
    assert r["margin"] < r["noise"]
    assert evidence_lines(h, "accuracy")[-1].startswith("how sure: not separated; at rung 1, the last where two "
                                                        "arms met, assistant 0.5's lead over no assistant")
    paired[1].pop("dev_correct")  # a rung recorded before rows were kept: the unpaired bound
    assert summarise(paired, [10], "accuracy", 401, 0.9)["rungs"][0]["noise_kind"] == "unpaired"
    search = {"candidates": [{"sparsity": s, "tradeoff": t} for s, t in ((0.5, 0.8), (0.6, 0.9), (0.7, 0.85),
                                                                         (0.9, 0.99))] + [{"sparsity": 0.8,
                                                                                           "failed": True}]}
    assert shortlist(search, 0.9, 2) == [0.6, 0.7]


def test_an_arm_trains_the_same_from_the_kept_candidate_as_from_its_own_first_link(
        tmp_path: Path, sst2_dir: Path) -> None:
    """The lambda search's recovered candidate (kept as safetensors, its SHA-256 recorded) is the halving arm's
    first link: loaded, the arm's student trains exactly as when the arm recovers the candidate itself; a file
    that is not the recorded one (edited, planted) is not loaded: the arm trains its first link again."""
    import torch

    from minidisc_ray.candidates import score_candidate
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, tokenize_task
    from minidisc_ray.search.arms import ArmRun, HalvingPayload

    from .conftest import tiny_search_payload

    tokenizer = make_tokenizer(tmp_path / "tok")
    data = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=120, max_dev_samples=40), seed=0)
    train, dev, _ = tokenize_task(data, tokenizer, 32, use_cache=False)
    payload = tiny_search_payload(train, dev, tokenizer, recovery_steps=4)
    kept = tmp_path / "cand.safetensors"
    scored = score_candidate(payload, 0.5, keep=str(kept))
    assert kept.is_file()
    assert len(scored["recovered_sha256"]) == 64

    def arm(recovered: dict[float, tuple[str, str]]) -> ArmRun:
        run = ArmRun(HalvingPayload(payload, [2, 5], lr=1e-3, batch_size=8, importance_samples=16,
                                    importance_batch=8, recovered=recovered), 0.5)
        result = run.advance(1)
        assert result is not None
        rows = unpack_rows(result["dev_correct"])  # each dev row's correctness, for the paired noise
        assert len(rows) == 40
        assert float(rows.mean()) == pytest.approx(result["student_metric"])
        return run

    trained, loaded = arm({}), arm({0.5: (str(kept), scored["recovered_sha256"])})
    assert (trained.first_link, loaded.first_link) == ("trained", "reused")
    assert loaded.first_cpu_seconds < trained.first_cpu_seconds
    for (name, a), b in zip(trained.student.state_dict().items(), loaded.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs between the loaded and the trained first link"
    planted = tmp_path / "planted.safetensors"
    planted.write_bytes(kept.read_bytes()[:-8] + b"\0" * 8)
    assert arm({0.5: (str(planted), scored["recovered_sha256"])}).first_link == "trained"
    assert arm({0.5: (str(tmp_path / "absent.safetensors"), scored["recovered_sha256"])}).first_link == "trained"
    # a pickle planted in OUTPUT/recovered, even one whose digest the record named, is never unpickled
    from minidisc_ray.modelio.fingerprint import file_sha256

    from .test_checkpoint_trust import _plant

    pickled, marker = tmp_path / "pickled.safetensors", tmp_path / "unpickled"
    _plant(pickled, marker)
    assert arm({0.5: (str(pickled), file_sha256(pickled))}).first_link == "trained"
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_auto_runs_the_lambda_search_then_halving_and_reruns_from_the_record(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:

    from minidisc_ray.config import config_from_dict
    from minidisc_ray.search.driver import run_search

    from .test_search_ray import tiny_config

    out = tmp_path / "run"
    raw = tiny_config(teacher_dir, out, sst2_dir, pruning={"grid": [0.3, 0.5, 0.7, 0.9], "importance_samples": 64,
                                                           "student_sparsity": 0.9},
                      search={"strategy": "auto", "max_concurrent_trials": 1, "shortlist": 2, "halving_steps": 9,
                              "halving_min_fraction": 1 / 9, "halving_reduction": 2},
                      distill={"batch_size": 8}, ray={"num_cpus": 2})
    cfg = config_from_dict(raw)
    summary = run_search(cfg, out)
    h = summary["halving"]
    assert summary["strategy"] == "auto"
    assert summary["lambda_pick"] in (0.3, 0.5, 0.7, 0.9)
    assert 0.9 in h["arms"], "the shortlist of two and no assistant"
    assert len(h["arms"]) == 3, "the shortlist of two and no assistant"
    assert set(h["arms"][:-1]) <= {0.3, 0.5, 0.7}
    # synchronous successive halving: 3 arms at rung 1, the best 2 at rung 2, then one is left and the round ends
    assert h["scheduler"] == "successive"
    assert [r["student_steps"] for r in h["rungs"]] == [1, 2]
    assert [len(r["arms"]) for r in h["rungs"]] == [3, 2]
    assert {a["sparsity"] for a in h["rungs"][1]["arms"]} == {a["sparsity"] for a in h["rungs"][0]["arms"][:2]}
    # every arm starts from the candidate the lambda search recovered (0.9 is on the grid: it was evaluated too)
    assert h["first_links_loaded"] == sorted(h["arms"])
    assert len(list((out / "recovered").glob("*.safetensors"))) == summary["lambda_search"]["evaluations"]
    assert summary["chosen_sparsity"] == h["rungs"][-1]["arms"][0]["sparsity"]
    assert all(t["rungs_reached"] >= 1 for t in h["trials"])
    assert h["rungs"][0]["noise"] is not None
    assert h["rungs"][0]["margin"] >= 0
    assert h["rungs"][0]["noise_kind"] == "paired"  # per-row correctness kept
    assert h["rungs"][0]["rows"] == 30  # the validation rows (0.1 of the 300 training rows), not the 120 dev rows
    written = json.loads((out / "search.json").read_text())
    assert written["chosen_sparsity"] == summary["chosen_sparsity"]
    events = out / "trial_events.jsonl"
    trained = [e for e in map(json.loads, events.read_text().splitlines()) if e.get("event") == "rung"]
    assert len(trained) == sum(t["rungs_reached"] for t in h["trials"])

    again = run_search(cfg, out)  # everything recorded: no rung is trained again, same pick
    after = [e for e in map(json.loads, events.read_text().splitlines()) if e.get("event") == "rung"]
    assert len(after) == len(trained), "a recorded rung was trained again"
    assert again["chosen_sparsity"] == summary["chosen_sparsity"]
    assert again["halving"]["rungs"][0]["noise"] == h["rungs"][0]["noise"], "the record keeps the rows"

    # Optuna on the same objective, with its pruner, in the RDB study: the rungs halving recorded are
    # reported from the record (same keys), arms it never ran are trained in Ray actors
    import optuna

    raw["search"].update(strategy="optuna-kd", optuna_trials=4, optuna_pruner="successive-halving")
    kd = run_search(config_from_dict(raw), out)
    assert kd["strategy"] == "optuna-kd"
    assert kd["chosen_sparsity"] in (0.3, 0.5, 0.7, 0.9)
    (summary_row,) = optuna.get_all_study_summaries(f"sqlite:///{out / 'optuna.db'}")
    study = optuna.load_study(study_name=kd["halving"]["study"], storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(set(t.intermediate_values) <= {1, 2, 4, 9} and 1 in t.intermediate_values for t in trials)
    recorded = {(a["sparsity"], r["rung"]) for r in h["rungs"] for a in r["arms"]}
    for t in trials:  # a rung halving recorded gives Optuna the recorded value
        for step, value in t.intermediate_values.items():
            rung = [1, 2, 4, 9].index(step) + 1
            if (t.params["arm"], rung) in recorded:
                mine = next(a["metric"] for r in h["rungs"] if r["rung"] == rung for a in r["arms"]
                            if a["sparsity"] == t.params["arm"])
                assert value == mine


@pytest.mark.ray
def test_halving_on_tunes_asha_scheduler(ray_session, tmp_path: Path, teacher_dir: Path,  # type: ignore[no-untyped-def]
                                         sst2_dir: Path) -> None:
    """``search.halving_scheduler: asha``: one Tune experiment over every arm under AsyncHyperBandScheduler, each
    trial training rung after rung in one run (its first link its own: no lambda search kept one)."""
    from minidisc_ray.config import config_from_dict
    from minidisc_ray.search.driver import run_search

    from .test_search_ray import tiny_config

    out = tmp_path / "run"
    raw = tiny_config(teacher_dir, out, sst2_dir, pruning={"grid": [0.5, 0.9], "importance_samples": 64,
                                                           "student_sparsity": 0.9},
                      search={"strategy": "halving", "halving_scheduler": "asha", "max_concurrent_trials": 2,
                              "halving_steps": 4, "halving_min_fraction": 0.25, "halving_reduction": 2},
                      distill={"batch_size": 8}, ray={"num_cpus": 2})
    summary = run_search(config_from_dict(raw), out)
    h = summary["halving"]
    assert h["scheduler"] == "asha"
    assert h["arms"] == [0.5, 0.9]
    assert h["first_links_loaded"] == []
    assert [r["student_steps"] for r in h["rungs"]][:1] == [1]
    assert len(h["rungs"][0]["arms"]) == 2
    assert summary["chosen_sparsity"] == h["rungs"][-1]["arms"][0]["sparsity"]
    assert not (out / "recovered").exists(), "under ASHA an arm trains all its rungs in one trial: nothing is kept"
    events = [json.loads(x) for x in (out / "trial_events.jsonl").read_text().splitlines() if '"rung"' in x]
    assert len(events) == sum(t["rungs_reached"] for t in h["trials"]) >= 2


def test_the_run_report_says_which_of_its_two_students_to_keep() -> None:
    """minidisc run exports the assistant path's student and, by default, the direct-KD baseline beside it: the
    report names the better on dev and whether the gap is beyond the dev set's noise bound."""
    from minidisc_ray.report import keep_line

    r = {"metric_name": "accuracy", "data": {"dev_rows": 800}, "assistants": [{"sparsity": 0.6}],
         "student": {"metric": 0.7375}, "baseline_direct_kd": {"metric": 0.70}}
    line = keep_line(r)
    assert line is not None
    assert line.startswith("Which student to keep: **student/** (the assistant path), 3.75 pt")
    assert f"beyond the dev set's noise bound of {100 * dev_noise('accuracy', 0.7375, 800):.1f} pt" in line
    r["baseline_direct_kd"] = {"metric": 0.745}
    assert "**direct_kd_student/** (direct KD, no assistant), 0.75 pt above the other on dev; the gap is within" in (
        keep_line(r) or "")
    r["baseline_direct_kd"] = {"metric": 0.7375}
    assert (keep_line(r) or "").startswith("Which student to keep: either")
    assert keep_line({**r, "baseline_direct_kd": None}) is None  # no baseline (or no assistant): nothing to choose
    assert keep_line({**r, "assistants": []}) is None


def test_the_chain_goes_on_from_the_candidates_the_search_recovered(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    """``minidisc run`` with auto: the chain's links from the teacher (the assistant, or the student with no
    assistant, and the direct-KD baseline) load the recovered candidate the round kept, whose SHA-256 the report
    names, and run the recovery's steps fewer; the matched baseline still gets the path's whole budget."""
    from minidisc_ray.config import config_from_dict
    from minidisc_ray.modelio.fingerprint import file_sha256
    from minidisc_ray.run import run_job

    from .test_search_ray import tiny_config

    out = tmp_path / "run"
    raw = tiny_config(teacher_dir, out, sst2_dir, pruning={"grid": [0.5, 0.7, 0.9], "importance_samples": 64,
                                                           "student_sparsity": 0.9},
                      recovery={"steps": 4, "batch_size": 8},
                      search={"strategy": "auto", "max_concurrent_trials": 1, "shortlist": 1, "halving_steps": 4,
                              "halving_min_fraction": 0.5, "halving_reduction": 2},
                      distill={"steps": 10, "batch_size": 8, "eval_every": 5, "patience": 10}, ray={"num_cpus": 2})
    report = run_job(config_from_dict(raw), out, command="minidisc run auto.yaml")
    stages = report["distill"]
    reused = {k: v["started_from"] for k, v in stages.items() if v.get("started_from")}
    assert reused, stages
    for name, u in reused.items():
        assert u["steps"] == 4 and u["recovery_steps"] == 4
        assert Path(u["recovered_candidate"]).parent == (out / "recovered").resolve()
        assert file_sha256(u["recovered_candidate"]) == u["sha256"]
        planned = {"teacher_to_assistant": 10, "teacher_to_student": 20}  # no assistant: the path's two stages
        if name in planned:
            assert stages[name]["steps_run"] <= planned[name] - 4, name
    if report["search"]["chosen_sparsity"] < 0.9:  # an assistant, then the student from it (a fresh cut)
        assert set(reused) == {"teacher_to_assistant", "direct_kd"} & set(stages), stages.keys()
        assert "assistant_to_student" not in reused
        path_steps = stages["teacher_to_assistant"]["steps_run"] + 4 + stages["assistant_to_student"]["steps_run"]
        assert stages["direct_kd"]["steps_run"] + 4 == path_steps, "the matched baseline's budget"
    md = (out / "report.md").read_text()
    assert "Reused from the search:" in md and "started from the candidate the search recovered" in md


def test_the_assistant_goes_on_from_the_candidate_the_search_recovered(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    """``minidisc run`` with a lambda strategy whose grid holds only assistants (``grid``: 0.5, 0.7; the student
    0.9): the pick is an assistant, and its link from the teacher loads the candidate the search recovered (every
    strategy's candidate trials keep them) and runs the recovery's steps fewer; the student is cut fresh from the
    assistant; the direct-KD baseline, whose sparsity no trial recovered, starts from a fresh cut and gets the
    path's whole budget, the reused steps included."""
    from minidisc_ray.config import config_from_dict
    from minidisc_ray.modelio.fingerprint import file_sha256
    from minidisc_ray.run import run_job

    from .test_search_ray import tiny_config

    out = tmp_path / "run"
    raw = tiny_config(teacher_dir, out, sst2_dir, pruning={"grid": [0.5, 0.7], "importance_samples": 64,
                                                           "student_sparsity": 0.9},
                      recovery={"steps": 4, "batch_size": 8}, search={"strategy": "grid", "max_concurrent_trials": 1},
                      distill={"steps": 10, "batch_size": 8, "eval_every": 5, "patience": 10}, ray={"num_cpus": 2})
    report = run_job(config_from_dict(raw), out, command="minidisc run grid.yaml")
    stages = report["distill"]
    assert report["search"]["chosen_sparsity"] in (0.5, 0.7)
    assert list(stages) == ["teacher_to_assistant", "assistant_to_student", "direct_kd"]
    reused = {k: v["started_from"] for k, v in stages.items() if v.get("started_from")}
    assert list(reused) == ["teacher_to_assistant"]
    u = reused["teacher_to_assistant"]
    assert u["steps"] == 4 and u["recovery_steps"] == 4
    assert file_sha256(u["recovered_candidate"]) == u["sha256"]
    assert Path(u["recovered_candidate"]).parent == (out / "recovered").resolve()
    assert len(list((out / "recovered").glob("*.safetensors"))) == 2, "each of the two candidates, recovered once"
    assert stages["teacher_to_assistant"]["steps_run"] <= 10 - 4
    path_steps = stages["teacher_to_assistant"]["steps_run"] + 4 + stages["assistant_to_student"]["steps_run"]
    assert stages["direct_kd"]["steps_run"] == path_steps, "the matched baseline's budget counts the reused steps"
    md = (out / "report.md").read_text()
    assert "The teacher_to_assistant started from the candidate the search recovered" in md
    assert "Reused from the search: 4 training steps in all." in md
