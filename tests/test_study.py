"""``minidisc study``: its statistics (exact lambda ranges, held-out regret, bootstrap intervals), the
scale-aware tradeoff, and a whole study on real Ray Tune with a tiny teacher, rerun from its records."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from minidisc_ray.config import config_from_dict
from minidisc_ray.errors import UserInputError
from minidisc_ray.metrics import chance_metric
from minidisc_ray.search.replay import bisection_order, optuna_order
from minidisc_ray.stats import spearman
from minidisc_ray.study.analyse import analyse
from minidisc_ray.study.records import SeedRecord, pick_candidates
from minidisc_ray.study.replay import strategy_picks
from minidisc_ray.tradeoff import Tradeoff, best_index, lambda_range, lambda_tradeoff

from .conftest import make_tokenizer, save_tiny_teacher
from .test_search_ray import tiny_config


def test_lambda_range_by_hand_and_against_brute_force() -> None:
    # 0.7 beats 0.5 once lam >= (0.85 - 0.84) / 0.2 = 0.05, and loses to 0.9 once lam >= 0.04 / 0.2 = 0.2
    lo, hi = lambda_range([0.85, 0.84, 0.80], [0.5, 0.7, 0.9], 1)  # type: ignore[misc]
    assert math.isclose(lo, 0.05)
    assert math.isclose(hi, 0.2)
    assert lambda_range([0.85, 0.84, 0.80], [0.5, 0.7, 0.9], 0) == pytest.approx([0.0, 0.05])
    assert lambda_range([0.80, 0.70, 0.80], [0.5, 0.7, 0.9], 1) is None  # under the chord: no lambda picks it
    rng = random.Random(3)
    lams = np.linspace(0.0, 2.0, 801)
    for _ in range(200):
        k = rng.randint(2, 7)
        sp = sorted(rng.sample([x / 20 for x in range(6, 20)], k))
        metrics = [rng.uniform(0.6, 0.9) for _ in range(k)]
        for target in range(k):
            rg = lambda_range(metrics, sp, target)
            for lam in lams:
                picked = best_index([lambda_tradeoff(m, s, float(lam)) for m, s in zip(metrics, sp, strict=True)])
                inside = rg is not None and rg[0] + 1e-9 < lam < rg[1] - 1e-9
                outside = rg is None or lam < rg[0] - 1e-9 or lam > rg[1] + 1e-9
                if inside:
                    assert picked == target, (metrics, sp, target, rg, lam)
                if outside:
                    assert picked != target, (metrics, sp, target, rg, lam)


def test_pick_candidates_spreads_over_the_grid_and_keeps_both_ends() -> None:
    grid = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert pick_candidates(grid, 5, 0.9) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert pick_candidates(grid, 3, 0.9) == [0.5, 0.7, 0.9]
    assert pick_candidates(grid, None, 0.9) == grid
    assert pick_candidates(list(reversed(grid)), 20, 0.9) == grid
    with pytest.raises(UserInputError, match="--candidates"):
        pick_candidates(grid, 1, 0.9)


def test_spearman_matches_scipy_and_is_nan_for_a_constant_side() -> None:
    from scipy import stats

    x, y = [0.1, 0.4, 0.2, 0.9, 0.5], [3.0, 1.0, 2.0, 5.0, 4.0]
    assert math.isclose(spearman(x, y), stats.spearmanr(x, y)[0])
    assert spearman([1, 2, 3], [5, 6, 7]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_retained_tradeoff_scales_by_the_teacher_skill_over_chance() -> None:
    paper = Tradeoff(0.2, "paper", 0.86, 0.51)
    retained = Tradeoff(0.2, "retained", 0.86, 0.51)
    assert paper(0.84, 0.5) == pytest.approx(0.84 + 0.1)
    assert retained(0.84, 0.5) == pytest.approx((0.84 - 0.51) / 0.35 + 0.1)
    # 1.5 points of accuracy are worth 0.015 in the paper's form and 0.043 in the retained one
    assert retained.scaled(0.84) - retained.scaled(0.825) == pytest.approx(0.015 / 0.35)
    assert retained.scaled(0.86) == pytest.approx(1.0)
    assert retained.scaled(0.51) == pytest.approx(0.0)
    assert Tradeoff(0.2, "retained", 0.5, 0.5).scaled(0.6) == pytest.approx(0.1)  # no skill to scale by
    assert math.isnan(retained(math.nan, 0.5))
    with pytest.raises(ValueError, match="form"):
        Tradeoff(0.2, "bogus")


def test_chance_metric_is_the_majority_class_answer() -> None:
    train, dev = np.array([0, 0, 1, 0]), np.array([0, 1, 1, 1])
    assert chance_metric(train, dev, "accuracy", 2) == pytest.approx(0.25)
    assert chance_metric(train, dev, "f1", 2) == 0.0  # the constant answer is the negative class
    assert chance_metric(np.array([1, 1, 0]), dev, "f1", 2) == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert chance_metric(train, dev, "matthews_correlation", 2) == 0.0
    assert chance_metric(np.array([2, 2, 1]), np.array([2, 0, 1, 2]), "accuracy", 3) == pytest.approx(0.5)


def test_replays_answer_the_argmax_of_unimodal_curves() -> None:
    curve = [0.80, 0.83, 0.86, 0.88, 0.87, 0.85, 0.82, 0.81]
    order, answer = bisection_order(curve, 1)
    assert answer == 3
    assert len(set(order)) <= math.ceil(math.log(len(curve), (1 + 5 ** 0.5) / 2)) + 2
    order, pick = optuna_order(curve, seed=0, budget=6)
    assert len(order) == 6
    assert pick == max(set(order), key=lambda i: curve[i])


def _record(seed: int, student: list[float], metric: list[float]) -> SeedRecord:
    k = len(student)
    return SeedRecord(seed=seed, metric=metric, actual=[0.5, 0.7, 0.9][:k], student=student,
                      assistant=[0.8, 0.8, None][:k],
                      eval_cpu=[10.0] * k, chain_cpu=[100.0, 80.0, 40.0][:k], direct=0.70, direct_cpu=90.0,
                      sandwich=metric, sandwich_cpu=25.0)


def test_analysis_when_the_tradeoff_misleads() -> None:
    # the search's scores favour 0.9 (lam x sparsity dominates); the students are best through 0.7
    metric = [0.84, 0.83, 0.82]
    recs = [_record(0, [0.75, 0.78, 0.72], metric), _record(1, [0.76, 0.79, 0.71], metric),
            _record(2, [0.74, 0.77, 0.73], metric)]
    d = analyse(recs, [0.5, 0.7, 0.9], 0.2, 0.86, 0.5, 1, 6, 0)
    assert d["best_student_sparsity"] == 0.7
    paper = d["strategies"]["paper"]
    for name in ("grid", "bisection", "optuna", "sandwich"):
        assert paper[name]["picks"] == [0.9, 0.9, 0.9], name
        # held-out regret: mean student at 0.7 minus at 0.9 over the two other seeds, here 6 points every time
        assert paper[name]["regret"]["mean"] == pytest.approx(0.06)
    assert paper["exhaustive"]["picks"] == [0.7, 0.7, 0.7]
    assert paper["exhaustive"]["regret"]["mean"] == 0.0
    assert paper["exhaustive"]["cost_vs_exhaustive"] == 1.0
    # grid: 3 evaluations of 10 CPU-s + the chain through 0.9 (40) against three chains (220)
    assert paper["grid"]["cpu_seconds"] == pytest.approx(70.0)
    assert paper["grid"]["cost_vs_exhaustive"] == pytest.approx(70 / 220)
    assert paper["sandwich"]["cpu_seconds"] == pytest.approx(25.0 + 40.0)
    # 0.84 + 0.5 lam, 0.83 + 0.7 lam and 0.82 + 0.9 lam meet at lam = 0.05: no lambda puts 0.7 alone on top
    assert d["lambda_range_picking_best"]["paper"] is None
    assert d["correlation"]["paper"]["spearman"] == pytest.approx(-0.5)
    assert d["direct_kd"]["best_assistant_minus_direct"]["mean"] == pytest.approx(0.78 - 0.70)
    assert d["direct_kd"]["bisection_pick_minus_direct"]["mean"] == pytest.approx(0.72 - 0.70)
    lo, hi = d["direct_kd"]["best_assistant_minus_direct"]["interval"]
    assert lo <= 0.08 <= hi


def test_exhaustive_pick_is_judged_on_the_seeds_it_was_not_picked_on() -> None:
    # seed 0's noise makes 0.5 look best there; over the other seeds 0.7 is better by 2 points
    metric = [0.85, 0.80, 0.70]
    recs = [_record(0, [0.80, 0.77, 0.70], metric), _record(1, [0.75, 0.77, 0.70], metric),
            _record(2, [0.75, 0.77, 0.70], metric)]
    d = analyse(recs, [0.5, 0.7, 0.9], 0.2, 0.86, 0.5, 1, 6, 0)
    ex = d["strategies"]["paper"]["exhaustive"]
    assert ex["picks"] == [0.5, 0.7, 0.7]
    # seed 0's pick (0.5) against seeds 1-2: 0.77 - 0.75; seeds 1-2 pick 0.7, which the other two seeds
    # (seed 0 among them) put 0.005 below 0.5
    assert ex["regret"]["per_seed"] == pytest.approx([0.02, 0.005, 0.005])
    picks = strategy_picks(recs[0], Tradeoff(0.2), 1, 6, 0)
    assert picks["grid"]["pick"] == 0
    assert picks["exhaustive"]["pick"] == 0


def test_two_assistant_chains_are_scheduled_per_seed_and_compared_with_one() -> None:
    from minidisc_ray.config import Config
    from minidisc_ray.study.analyse import compare_two
    from minidisc_ray.study.run import _two_assistant_units

    grid = [0.5, 0.6, 0.7, 0.8, 0.9]
    # seed 0: the tradeoff peaks at 0.6, then 0.7 is the best below; seed 1 peaks at the student's own 0.9
    a = SeedRecord(0, [0.85, 0.84, 0.80, 0.75, 0.70], grid, [0.78, 0.80, 0.79, 0.78, 0.75], [0.8] * 4 + [None],
                   [1.0] * 5, [2.0] * 5, 0.74, 3.0, None, 0.0)
    b = SeedRecord(1, [0.70, 0.71, 0.72, 0.73, 0.75], grid, [0.78, 0.80, 0.79, 0.78, 0.75], [0.8] * 4 + [None],
                   [1.0] * 5, [2.0] * 5, 0.74, 3.0, None, 0.0)
    units = _two_assistant_units([a, b], grid, Tradeoff(0.2), Config())
    assert units == [{"kind": "two", "seed": 0, "sparsities": [0.6, 0.7]}]
    cmp = compare_two([a, b], grid, [{**units[0], "metric": 0.81, "link_metrics": [0.8, 0.79, 0.81]}])
    assert cmp["two_minus_one"]["mean"] == pytest.approx(0.81 - 0.80)
    assert cmp["seeds_without_room"] == 1


def test_study_trials_without_ray_path_direct_and_two_assistants(sst2_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The three kinds of study trial, run in this process on a tiny teacher: the chain's budget is what
    each stage trains, and a candidate at the student's sparsity has no TA."""
    from minidisc_ray.config import DistillConfig, TaskConfig
    from minidisc_ray.data import load_task, tokenize_task
    from minidisc_ray.study.trials import StudyPayload, run_unit

    from .conftest import tiny_search_payload

    data = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=120, max_dev_samples=40), seed=0)
    train, dev, _ = tokenize_task(data, tokenizer, 32, use_cache=False)
    payload = tiny_search_payload(train, dev, tokenizer, recovery_steps=2)
    dc = DistillConfig(steps=6, batch_size=8, eval_every=3, patience=50)
    sp = StudyPayload(payload, dc, [0.5, 0.9], 32, 16, 1)
    path = run_unit(sp, {"kind": "path", "sparsity": 0.5, "seed": 3})
    assert path["assistant_steps"] == 6
    assert path["student_steps"] == 6
    assert path["assistant_metric"] is not None
    assert path["cpu_seconds"] == pytest.approx(path["candidate_cpu_seconds"] + path["assistant_cpu_seconds"]
                                                + path["student_cpu_seconds"])
    assert run_unit(sp, {"kind": "path", "sparsity": 0.5, "seed": 3})["metric"] == path["metric"], "seeded"
    no_ta = run_unit(sp, {"kind": "path", "sparsity": 0.9, "seed": 3})
    # "no assistant" is direct KD at the TA path's total steps (6 + 6), not one stage's 6: the same run as
    # the direct-KD arm, to the last digit
    assert no_ta["assistant_metric"] is None
    assert no_ta["assistant_steps"] == 0
    assert no_ta["student_steps"] == 12
    assert no_ta["student_params"] == path["student_params"]
    direct = run_unit(sp, {"kind": "direct", "seed": 3})
    assert direct["steps_run"] == 12
    assert direct["params"] == path["student_params"]
    assert no_ta["metric"] == direct["metric"]
    two = run_unit(sp, {"kind": "two", "seed": 3, "sparsities": [0.5, 0.7]})
    assert two["steps_run"] == 12
    assert len(two["link_metrics"]) == 3
    assert two["metric"] == two["link_metrics"][-1]
    assert sp.key({"kind": "two", "seed": 3, "sparsities": [0.5, 0.7]}) != sp.key(
        {"kind": "two", "seed": 3, "sparsities": [0.5, 0.8]})


@pytest.mark.ray
def test_study_on_ray_tune_then_rerun_from_its_records(ray_session, tmp_path: Path, sst2_dir: Path) -> None:  # type: ignore[no-untyped-def]

    from minidisc_ray.study.run import run_study

    tok = make_tokenizer(tmp_path / "tok")
    teacher = save_tiny_teacher(tmp_path / "teacher", tok, seed=11)
    out = tmp_path / "study"
    raw = tiny_config(teacher, out, sst2_dir, recovery={"steps": 3, "batch_size": 16},
                      distill={"steps": 6, "batch_size": 16, "eval_every": 3, "patience": 10},
                      ray={"num_cpus": 2})
    cfg = config_from_dict(raw)
    data = run_study(cfg, out, seeds=2, candidates=3, command="minidisc study tiny.yaml --seeds 2")
    grid = [0.5, 0.7, 0.9]
    assert data["grid"] == grid
    assert data["seeds"] == 2
    for name in ("study.json", "study.md", "study.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["strategies"] == json.loads(json.dumps(data["strategies"]))
    assert set(on_disk["strategies"]["paper"]) == {"bisection", "grid", "optuna", "sandwich", "exhaustive", "halving",
                                                    "auto", "auto + direct KD", "halving (stage arms)",
                                                    "auto (stage arms)", "nearest assistant + direct KD"}
    assert set(on_disk["strategies"]["retained"]) == {"bisection", "grid", "optuna", "sandwich", "auto",
                                                      "auto + direct KD", "auto (stage arms)"}
    assert on_disk["halving_replay"] == "arms"
    side = on_disk["student_side"]  # each path trial scored its recovered candidate from the student's side
    assert set(side["predictors"]) == {"lambda-tradeoff", "student alignment", "student stability",
                                       "lambda-tradeoff + student alignment (mean rank)",
                                       "lambda-tradeoff + student stability (mean rank)"}
    for p in side["predictors"].values():
        assert -1.0 <= p["spearman"] <= 1.0 or math.isnan(p["spearman"])
        assert len(p["picks"]) == 2 and p["regret"]["mean"] >= 0
    assert all(0.0 <= x <= 1.0 for x in side["values"]["stability"])
    assert "Predictors of the student" in (out / "study.md").read_text()
    halving = on_disk["strategies"]["paper"]["halving"]  # replayed on the recorded halving arms
    assert halving["cost_vs_exhaustive"] > 0
    assert halving["minus_direct"] is not None
    records = [json.loads(p.read_text())["result"] for p in (out / "evaluations").glob("*.json")]
    # paths, sandwich, halving arms, per seed; direct KD is the path at the student's own sparsity (0.9), not trained
    # a second time
    assert len(records) == 2 * 3 + 2 + 2 * 3
    arms = [r for r in records if r["kind"] == "arm"]
    # each arm's student evaluated at the halving rungs (6 steps, a ninth, x3: [1, 2, 6]) and every eval_every (3)
    assert all([s for s, _ in r["arm_curve"]] == [1, 2, 3, 6] for r in arms)
    assert all(r["first_link_cpu_seconds"] > 0 and r["student_link_cpu_seconds"] > 0 for r in arms)
    paths = [r for r in records if r["kind"] == "path"]
    for r in paths:
        # no assistant (0.9): direct KD at the TA path's total steps, 6 + 6
        assert r["assistant_steps"] == (6 if r["sparsity"] < 0.9 else 0)
        assert r["student_steps"] == (6 if r["sparsity"] < 0.9 else 12)
        assert (r["assistant_metric"] is None) == (r["sparsity"] == 0.9)
    assert not [r for r in records if r["kind"] == "direct"]
    no_ta = {r["seed"]: r for r in paths if r["sparsity"] == 0.9}
    assert [no_ta[seed]["student_steps"] for seed in (1, 2)] == [12, 12], "direct KD: the TA path's two stages' steps"
    # picks read the validation rows carved from train; students and direct KD are judged on the held-out dev rows
    assert on_disk["judged_on"] == "held-out dev"
    assert "which no choice saw" in (out / "study.md").read_text()
    assert all(0.0 <= r["student_held_out_metric"] <= 1.0 for r in paths)
    assert on_disk["direct_kd"]["mean"] == pytest.approx(
        np.mean([no_ta[seed]["student_held_out_metric"] for seed in (1, 2)]))
    # the reported picks follow from the recorded per-seed values
    for k, seed in enumerate((1, 2)):
        mine = sorted((r for r in paths if r["seed"] == seed), key=lambda r: r["sparsity"])
        tradeoffs = [lambda_tradeoff(r["candidate_metric"], r["param_sparsity"], 0.2) for r in mine]
        assert data["strategies"]["paper"]["grid"]["picks"][k] == grid[best_index(tradeoffs)]  # type: ignore[index]
        students = [r["metric"] for r in mine]
        assert data["strategies"]["paper"]["exhaustive"]["picks"][k] == grid[best_index(students)]  # type: ignore[index]
        for c, r in zip(data["candidates"], mine, strict=True):  # exhaustive picks on validation; judged held out
            assert c["student_metric"]["per_seed"][k] == r["student_held_out_metric"]
    md = (out / "study.md").read_text()
    assert "minidisc study tiny.yaml --seeds 2" in md
    assert "Spearman" in md
    assert "| exhaustive |" in md
    rows = data["data"]["dev_rows"]
    assert f"On {rows:,} dev rows one row is {100 / rows:.2f} points of accuracy" in md
    assert f"moves in steps of {100 / rows:.2f}" in md  # two seeds: one held out per pick

    def written() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (out / "evaluations").glob("*.json")}

    before = written()
    again = run_study(cfg, out, seeds=2, candidates=3, command="again")
    assert written() == before, "nothing was trained again"
    assert again["candidates"] == data["candidates"]
    assert again["strategies"] == data["strategies"]
    assert data["trials_recorded_before"] == 0
    assert again["trials_recorded_before"] == again["trials"] == data["trials"]
    assert again["trial_seconds"] == data["trial_seconds"] > 0  # the trials' times, not the rerun's


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_rerun_trains_no_recorded_two_assistant_chain_again(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, sst2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-assistant phase (its trials planned from the first phase's records) is recorded and reused on a
    rerun like the first phase. On this untrained teacher every tradeoff picks the student's own sparsity,
    which leaves no room for two assistants, so the chain is planned here."""
    import minidisc_ray.study.run as study_mod
    from minidisc_ray.study.run import run_study

    tok = make_tokenizer(tmp_path / "tok")
    teacher = save_tiny_teacher(tmp_path / "teacher", tok, seed=11)
    out = tmp_path / "study"
    cfg = config_from_dict(tiny_config(teacher, out, sst2_dir, recovery={"steps": 3, "batch_size": 16},
                                       distill={"steps": 6, "batch_size": 16, "eval_every": 3, "patience": 10},
                                       ray={"num_cpus": 2}))

    def written() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (out / "evaluations").glob("*.json")}

    monkeypatch.setattr(study_mod, "_two_assistant_units",
                        lambda *a: [{"kind": "two", "seed": 1, "sparsities": [0.5, 0.7]}])
    first = run_study(cfg, out, seeds=1, candidates=3, assistants=2, sandwich=False, command="two")
    with_two = written()
    assert len(first["two_assistants"]["chains"]) == 1
    assert len(with_two) == 3 + 3 + 1  # paths (0.9's is direct KD), arms, two
    run_study(cfg, out, seeds=1, candidates=3, assistants=2, sandwich=False, command="two again")
    assert written() == with_two, "a recorded trial (the two-assistant chain among them) was trained again"


def test_halving_and_auto_replay_from_recorded_curves_and_the_crossing_is_their_weakness() -> None:
    """Three candidates 0.5, 0.7 and 0.9 (the student's own: "no assistant", direct KD for 2 x 40 steps);
    student curves evaluated at steps 20 and 40 of a 40-step stage; reduction 3 keeps one arm of three."""
    from minidisc_ray.strategies import ReplaySettings, get_strategy

    curves = [[[20, 0.70], [40, 0.80]],   # 0.5: slow starter, best at the end
              [[20, 0.74], [40, 0.76]],   # 0.7: ahead at the first rung
              [[20, 0.60], [40, 0.66], [60, 0.69], [80, 0.75]]]  # direct KD: its step 60 is rung 20
    rec = SeedRecord(0, [0.84, 0.83, 0.82], [0.5, 0.7, 0.9], [0.80, 0.76, 0.75], [0.8, 0.8, None],
                     [10.0] * 3, [100.0, 80.0, 40.0], 0.75, 40.0, None, 0.0, student_cpu=[40.0, 30.0, 40.0],
                     curves=curves)
    settings = ReplaySettings(1, 6, 0, Tradeoff(0.2), stage_steps=40, reduction=3, shortlist=1, no_assistant=2,
                              bisection_order=bisection_order)
    h = get_strategy("halving").replay(rec, [0.0, 0.0, 0.0], settings)
    assert h is not None
    assert h["rungs"] == [20, 40]
    # rung 20: 0.74 (0.7) > 0.70 (0.5) > 0.69 (direct at 40 + 20): only 0.7 goes on, so the crossing costs the
    # best arm (0.5 ends at 0.80)
    assert h["pick"] == 1
    assert h["best"] == 0, "the best arm (0.5) was stopped at the first rung"
    assert h["best_to_last_rung"] is False, "the best arm (0.5) was stopped at the first rung"
    # pairs (0.5, 0.7) cross: 0.70 < 0.74 at rung 20, 0.80 > 0.76 at the end; 0.5 vs direct and 0.7 vs direct keep
    # their order (0.70 > 0.69 and 0.80 > 0.75; 0.74 > 0.69 and 0.76 > 0.75)
    assert h["crossings"] == {"pairs": 3, "crossed": 1}
    # 0.5: its assistant stage (60) + half its student stage (20); 0.7: 50 + 30; direct KD: 40 x 60/80
    assert h["cpu"] == pytest.approx(80.0 + 80.0 + 30.0)
    two = get_strategy("halving").replay(rec, [0.0] * 3, ReplaySettings(stage_steps=40, reduction=2, no_assistant=2))
    assert two is not None, "keeping two of three, the slow starter survives and wins"
    assert two["pick"] == 0, "keeping two of three, the slow starter survives and wins"
    # auto: the bisection's evaluations, then halving between its top candidate below the student and no assistant
    tradeoff = [0.84 + 0.2 * 0.5, 0.83 + 0.2 * 0.7, 0.82 + 0.2 * 0.9]
    a = get_strategy("auto").replay(rec, tradeoff, settings)
    assert a is not None
    assert a["arms"] == [1, 2]
    assert a["pick"] == 1
    assert a["cpu"] == pytest.approx(30.0 + (50.0 + 30.0) + 30.0), "3 evaluations, 0.7 to the end, direct KD to rung 1"
    assert get_strategy("halving").replay(_record(0, [0.7, 0.7, 0.7], [0.8] * 3), [0.0] * 3, settings) is None, \
        "a study recorded without curves cannot replay halving"
    d = analyse([rec, rec], [0.5, 0.7, 0.9], 0.2, 0.86, 0.5, 1, 6, 0,
                halving={"stage_steps": 40, "reduction": 3, "shortlist": 1, "no_assistant": 2})
    assert d["strategies"]["paper"]["halving"]["picks"] == [0.7, 0.7]
    assert d["strategies"]["paper"]["halving"]["halving_round"] == {"best_arm_to_last_rung": 0, "seeds": 2,
                                                                    "pairs": 6, "crossed": 2}
    assert "halving" not in d["strategies"]["retained"]
    assert "auto" in d["strategies"]["retained"]
    assert d["strategies"]["paper"]["halving"]["minus_direct"]["mean"] == pytest.approx(0.76 - 0.75)


def test_successive_halving_replays_the_recorded_arms_and_pays_the_chain_of_its_pick() -> None:
    """The halving arms as minidisc study records them (what ArmRun trains, evaluated at every rung): rungs 10
    and 30 of a 30-step student link; the round ends when one arm is left; the pick is judged by its full chain."""
    from minidisc_ray.strategies import ReplaySettings, get_strategy
    from minidisc_ray.strategies.trial_distillation import replay_successive

    rec = SeedRecord(0, [0.84, 0.83, 0.82], [0.5, 0.7, 0.9], [0.80, 0.76, 0.75], [0.8, 0.8, None],
                     [10.0] * 3, [100.0, 80.0, 40.0], 0.75, 40.0, None, 0.0,
                     arm_curves=[[[10, 0.70], [30, 0.80]], [[10, 0.74], [30, 0.76]], [[10, 0.60], [30, 0.75]]],
                     arm_first_cpu=[5.0] * 3, arm_link_cpu=[30.0] * 3, arm_eval_cpu=[1.0] * 3)
    three = ReplaySettings(reduction=3, no_assistant=2, rungs=[10, 30])
    h = replay_successive(rec, [0, 1, 2], three, free={0, 1})
    assert h is not None, "0.7 leads at rung 10, the only one kept"
    assert h["pick"] == 1, "0.7 leads at rung 10, the only one kept"
    assert h["rung_reached"] == 10, "0.7 leads at rung 10, the only one kept"
    # rung 10 for three arms (0.5 and 0.7 start from kept candidates, no assistant pays its first link), then
    # the chain through 0.7
    assert h["cpu"] == pytest.approx((10 + 1) * 2 + (5 + 10 + 1) + 80.0)
    assert h["best"] == 0
    assert h["best_to_last_rung"] is False
    assert h["crossings"] == {"pairs": 3, "crossed": 1}
    two = replay_successive(rec, [0, 1, 2], ReplaySettings(reduction=2, no_assistant=2, rungs=[10, 30]), free=set())
    assert two is not None
    assert two["pick"] == 0
    assert two["best_to_last_rung"] is True
    # rung 10: three arms with their first links; rung 30: 0.7 and 0.5 from their kept first links; chain through 0.5
    assert two["cpu"] == pytest.approx(3 * (5 + 10 + 1) + 2 * (30 + 1) + 100.0)
    # the halving strategy uses the recorded arms when there are any (first links paid: no lambda search before it)
    assert get_strategy("halving").replay(rec, [0.0] * 3, three)["cpu"] == pytest.approx(3 * 16 + 80.0)
    # with the chains' student curves recorded too, the study adds halving and auto as if each arm's first link
    # were the whole teacher -> assistant stage (the earlier replay), as rows of their own
    rec.curves = [[[10, 0.70], [30, 0.80]], [[10, 0.74], [30, 0.76]], [[10, 0.60], [30, 0.66], [40, 0.69], [60, 0.75]]]
    rec.student_cpu = [40.0, 30.0, 40.0]
    d = analyse([rec, rec], [0.5, 0.7, 0.9], 0.2, 0.86, 0.5, 1, 6, 0,
                halving={"stage_steps": 30, "reduction": 3, "shortlist": 1, "no_assistant": 2, "rungs": [10, 30]})
    paper = d["strategies"]["paper"]
    assert d["halving_replay"] == "arms"
    assert paper["halving"]["picks"] == [0.7, 0.7]
    assert {"halving (stage arms)", "auto (stage arms)"} <= set(paper)
    assert paper["halving (stage arms)"]["cpu_seconds"] != paper["halving"]["cpu_seconds"]
    assert "halving (stage arms)" not in d["strategies"]["retained"]
    # auto, then its chain's student or direct KD's (0.75 here), the better: what keeping student/ or
    # direct_kd_student/ of minidisc run gives; it pays the baseline's run when auto picked an assistant
    checked, plain = paper["auto + direct KD"], paper["auto"]
    assert plain["picks"] == [0.7, 0.7]  # 0.7's student 0.76 beats 0.75
    assert checked["picks"] == [0.7, 0.7]
    assert checked["cpu_seconds"] == pytest.approx(plain["cpu_seconds"] + 40.0)
    rec.direct = 0.77  # now direct KD's student is the better one: no assistant, at the same cost
    d2 = analyse([rec, rec], [0.5, 0.7, 0.9], 0.2, 0.86, 0.5, 1, 6, 0,
                 halving={"stage_steps": 30, "reduction": 3, "shortlist": 1, "no_assistant": 2, "rungs": [10, 30]})
    assert d2["strategies"]["paper"]["auto + direct KD"]["picks"] == [0.9, 0.9]
    assert "halving_round" not in d2["strategies"]["paper"]["auto + direct KD"]
    # no search at all: the chain through the candidate nearest above the student (0.7) against direct KD, the
    # better on the rows that select (direct KD's 0.77 over 0.7's 0.76); it costs 0.7's chain and the direct run
    near = d2["strategies"]["paper"]["nearest assistant + direct KD"]
    assert near["picks"] == [0.9, 0.9] and near["evaluations"] == 0
    assert near["cpu_seconds"] == pytest.approx(rec.chain_cpu[1] + rec.direct_cpu)
    assert "nearest assistant + direct KD" not in d2["strategies"]["retained"], "its pick needs no tradeoff"
    assert d["strategies"]["paper"]["nearest assistant + direct KD"]["picks"] == [0.7, 0.7]  # 0.76 over 0.75
    rec.direct = 0.75
    # auto's arms priced as parts of the chain's own stages (no record holds such arms' students): a third of
    # 0.5's teacher -> assistant stage (60 CPU-s) and of its student stage (40), a third of no assistant's direct
    # run (40), after a 30 CPU-s lambda search; then the winner finishes: 0.5 its stage and a whole student stage,
    # or no assistant the rest of its run
    from minidisc_ray.study.replay import partial_stage_cost

    lo, hi = partial_stage_cost(rec, [0, 2], 2, 30.0, 1 / 3, 1 / 3)  # type: ignore[misc]
    spent = 30 + 60 / 3 + 40 / 3 + 40 / 3
    assert (lo, hi) == (pytest.approx(spent + 40 * 2 / 3), pytest.approx(spent + 60 * 2 / 3 + 40))
    # in the study: auto's shortlist of one is 0.7 (the better paper tradeoff below the student), with no assistant
    (third,) = [p for p in d["partial_stage_arms"] if p["assistant_fraction"] == pytest.approx(1 / 3)]
    cost = partial_stage_cost(rec, [1, 2], 2, 30.0, 1 / 3, 1 / 3)
    assert cost is not None
    ex = paper["exhaustive"]["cpu_seconds"]
    assert third["cost_vs_exhaustive"] == [pytest.approx(cost[0] / ex), pytest.approx(cost[1] / ex)]
    from minidisc_ray.report import partial_stage_lines

    assert partial_stage_lines(d)[0].startswith("- priced, not replayed: auto with arms that run 0.33 of the chain's")
