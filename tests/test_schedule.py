"""One schedule: ``minidisc run``, a study trial and an exhaustive candidate plan the same links and budgets,
and "no assistant" is direct KD at the TA path's total steps everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from minidisc_ray.errors import UserInputError
from minidisc_ray.schedule import plan_schedule, run_in_process


def test_plan_schedule_links_and_budgets() -> None:
    one = plan_schedule([0.6], 0.9, 100)
    assert [(x.stage, x.source, x.unit_sparsity, x.steps, x.cut_from) for x in one.links()] == [
        ("teacher_to_assistant", "teacher", 0.6, 100, "teacher"),
        ("assistant_to_student", "assistant", 0.9, 100, "source"),
        ("direct_kd", "teacher", 0.9, 200, "teacher")]
    assert [x.directory for x in one.links()] == ["assistant", "student", "direct_kd_student"]
    none = plan_schedule([], 0.9, 100)
    assert [(x.stage, x.steps) for x in none.links()] == [("teacher_to_student", 200)]
    assert none.direct
    assert plan_schedule([], 0.9, 100, planned_assistants=2).total_steps == 300
    two = plan_schedule([0.5, 0.7], 0.9, 100)
    assert [x.stage for x in two.path] == ["teacher_to_assistant", "assistant_to_assistant_2",
                                           "assistant_2_to_student"]
    assert two.baseline is not None
    assert two.baseline.steps == 300
    shared = plan_schedule([0.5, 0.7], 0.9, 100, total=200)
    assert [x.steps for x in shared.path] == [67, 67, 66]
    assert shared.total_steps == 200
    assert plan_schedule([0.6], 0.9, 100, baseline=False).baseline is None
    for bad in ([0.9], [0.7, 0.6], [0.6, 0.6], [-0.1]):
        with pytest.raises(ValueError):
            plan_schedule(bad, 0.9, 100)


def test_run_in_process_follows_the_links_and_drops_finished_sources() -> None:
    trained: list[tuple[str, str, int]] = []

    def cut(link, source):  # type: ignore[no-untyped-def]
        return f"{link.name}<{source}"

    def train(link, student, source):  # type: ignore[no-untyped-def]
        trained.append((student, source, link.steps))
        return {"metric": link.steps}

    out = run_in_process(plan_schedule([0.5, 0.7], 0.9, 10), "T", cut, train)
    assert list(out) == ["teacher_to_assistant", "assistant_to_assistant_2", "assistant_2_to_student", "direct_kd"]
    assert trained == [("assistant<T", "T", 10), ("assistant_2<assistant<T", "assistant<T", 10),
                       ("student<assistant_2<assistant<T", "assistant_2<assistant<T", 10), ("direct_kd<T", "T", 30)]


def test_study_exhaustive_and_run_plan_the_same_links(sst2_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The same inputs (student 0.9; an assistant at 0.5, or none) through the three places: the steps each
    link trains are the schedule's, with the chain's budget (study, run) or the recovery budget (exhaustive)."""
    from minidisc_ray.candidates import score_candidate
    from minidisc_ray.config import DistillConfig, TaskConfig
    from minidisc_ray.data import load_task, tokenize_task
    from minidisc_ray.study.trials import StudyPayload, run_unit

    from .conftest import tiny_search_payload

    data = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=80, max_dev_samples=24), seed=0)
    train, dev, _ = tokenize_task(data, tokenizer, 32, use_cache=False)
    payload = tiny_search_payload(train, dev, tokenizer, recovery_steps=3)
    dc = DistillConfig(steps=4, batch_size=8, eval_every=2, patience=50)
    sp = StudyPayload(payload, dc, [0.5, 0.9], 32, 16, 1)
    for assistants, s in (([0.5], 0.5), ([], 0.9)):
        plan = plan_schedule(assistants, 0.9, dc.steps)
        study = run_unit(sp, {"kind": "path", "sparsity": s, "seed": 0})
        assert (study["assistant_steps"], study["student_steps"]) == \
            (0 if plan.direct else plan.path[0].steps, plan.path[-1].steps)
        rec_plan = plan_schedule(assistants, 0.9, payload.recovery.steps)
        ex = score_candidate(payload, s, exhaustive=True)
        assert (ex["assistant_steps"], ex["student_steps"]) == \
            (0 if rec_plan.direct else rec_plan.path[0].steps, rec_plan.path[-1].steps)
    # minidisc run trains plan_schedule(...)'s links: its no-assistant student at the path's total steps
    assert plan_schedule([], 0.9, dc.steps).path[0].steps == 2 * dc.steps == \
        run_unit(sp, {"kind": "direct", "seed": 0})["steps_run"]


def test_every_configurable_strategy_is_a_registered_object_and_chooses_like_the_searcher() -> None:
    from minidisc_ray.strategies import REGISTRY, Strategy, get_strategy, register

    assert list(REGISTRY) == ["bisection", "grid", "optuna", "sandwich", "exhaustive", "halving", "optuna-kd", "auto"]
    rows = [{"sparsity": 0.7, "tradeoff": 0.80, "student_metric": 0.61}, {"sparsity": 0.5, "tradeoff": 0.80,
            "student_metric": 0.66}, {"sparsity": 0.6, "failed": True}, {"sparsity": 0.8, "tradeoff": float("nan")}]
    assert get_strategy("bisection").choose(rows)["sparsity"] == 0.7  # a tie goes to the sparser candidate
    assert get_strategy("exhaustive").choose(rows)["sparsity"] == 0.5  # on the student's metric
    with pytest.raises(UserInputError, match="search.strategy.*use one of bisection"):
        get_strategy("bayes")

    @register
    class Smallest(Strategy):  # a new strategy is a class in its own module; nothing else changes
        name = "smallest-test"

        def choose(self, rows):  # type: ignore[no-untyped-def]
            return max((r for r in rows if not r.get("failed")), key=lambda r: r["sparsity"])

    try:
        assert get_strategy("smallest-test").choose(rows)["sparsity"] == 0.8
    finally:
        del REGISTRY["smallest-test"]
