"""The Tune function trainables of the halving round: :func:`halving_trial` (one arm trained rung after rung, under
Tune's ASHA or HyperBand scheduler) and :func:`rung_trial` (one arm trained to one rung, for synchronous successive
halving)."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from minidisc_ray.ray_env import resolved
from minidisc_ray.ray_train import node_id
from minidisc_ray.search.arms import ArmRun, HalvingPayload
from minidisc_ray.search.trial import _event, _threads


def halving_trial(config: dict[str, Any], payload: HalvingPayload) -> None:
    """Ray Tune function trainable of one arm: reports ``student_metric`` at every rung (recorded rungs from
    the record); the scheduler decides whether it goes on."""
    _threads()
    run = ArmRun(resolved(payload), float(config["arm"]))
    base = {"arm": run.arm, "sparsity": run.arm, "node": node_id()}
    _event(payload.search, event="start", arm=run.arm, trial_id=tune.get_context().get_trial_id(), node=base["node"])
    recorded = run.recorded()
    for i, rec in enumerate(recorded):  # recorded rungs first: the scheduler may stop the arm on them
        tune.report({**base, **rec, "rung": i + 1, "reused": True, "finished_at": time.time()})
    if recorded and len(recorded) < len(payload.rungs):
        run.advance(len(recorded) - 1, evaluate_it=False)  # the recorded rungs: trained through, not evaluated
    for i in range(len(recorded), len(payload.rungs)):
        result = run.advance(i)
        if result is None:
            continue
        _event(payload.search, event="rung", arm=run.arm, rung=i + 1, metric=result["student_metric"])
        tune.report({**base, **result, "rung": i + 1, "eval_key": payload.rung_key(run.arm, i),
                     "finished_at": time.time()})


def rung_trial(config: dict[str, Any], payload: HalvingPayload) -> None:
    """Ray Tune function trainable of successive halving (``search.halving_scheduler: successive``): one arm
    trained from its start to one rung (``config["rung"]``, 0-based), evaluated and reported once; a
    recorded rung is reported from the record."""
    _threads()
    run = ArmRun(resolved(payload), float(config["arm"]))
    i = int(config["rung"])
    base = {"arm": run.arm, "sparsity": run.arm, "node": node_id(), "rung": i + 1}
    rec = run.recorded_rung(i)
    if rec is not None:
        tune.report({**base, **rec, "reused": True, "finished_at": time.time()})
        return
    _event(payload.search, event="start", arm=run.arm, rung=i + 1, trial_id=tune.get_context().get_trial_id(),
           node=base["node"])
    result = run.advance(i)
    assert result is not None
    _event(payload.search, event="rung", arm=run.arm, rung=i + 1, metric=result["student_metric"],
           first_link=result["first_link"])
    tune.report({**base, **result, "eval_key": payload.rung_key(run.arm, i), "finished_at": time.time()})
