"""What a failure made a job do twice, as the report and ``search.json`` say it: stage steps trained again after a
restart (from the stage's events) and trials Tune started again (from the search's events)."""

from __future__ import annotations

import json
from pathlib import Path

from minidisc_ray.chain.runner import _attempts
from minidisc_ray.search.summary import trials_started_again


def _write(path: Path, events: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return str(path)


def test_steps_trained_again_count_from_the_last_reported_step_to_the_resumed_checkpoint(tmp_path: Path) -> None:
    events = _write(tmp_path / "train_events.jsonl", [
        {"event": "start", "stage": "student", "run_id": "r1", "start_step": 0},
        {"event": "eval", "stage": "student", "run_id": "r1", "step": 50},
        {"event": "progress", "stage": "student", "run_id": "r1", "step": 73},
        {"event": "progress", "stage": "assistant", "run_id": "r1", "step": 400},  # another stage
        # the node of rank 0 is lost; Ray Train restarts the group from the checkpoint of step 50
        {"event": "start", "stage": "student", "run_id": "r1", "start_step": 50},
        {"event": "progress", "stage": "student", "run_id": "r1", "step": 90},
        # and again, from step 80's checkpoint
        {"event": "start", "stage": "student", "run_id": "r1", "start_step": 80},
        {"event": "start", "stage": "student", "run_id": "r0", "start_step": 0},  # an earlier job's
    ])
    assert _attempts(events, "student", "r1") == (3, (73 - 50) + (90 - 80))
    assert _attempts(events, "assistant", "r1") == (1, 0)
    assert _attempts(None, "student", "r1") == (1, 0)


def test_trials_started_again_counts_second_starts_of_one_trial_id_since_the_experiment_began(
        tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    events = _write(tmp_path / "trial_events.jsonl", [
        {"event": "start", "trial_id": "a", "time": 5.0},  # before this experiment: an earlier search's
        {"event": "start", "trial_id": "a", "time": 10.0},
        {"event": "finish", "trial_id": "a", "time": 11.0},
        {"event": "start", "trial_id": "b", "time": 12.0},
        {"event": "start", "trial_id": "b", "time": 20.0},  # its node was lost: Tune ran it again
        {"event": "start", "trial_id": "b", "time": 30.0},  # and once more
        {"event": "start", "trial_id": "c", "time": 13.0},
    ])
    assert trials_started_again(events, since=10.0, what="search") == 2
    assert "[search] 2 trial(s) ran again after a failure" in capsys.readouterr().err
    assert trials_started_again(events, since=0.0, what="search") == 3
    assert trials_started_again(None, since=0.0, what="search") == 0
