"""The Ray Tune trainables: a few lines around :mod:`minidisc_ray.candidates`.

One trial = one teacher-assistant candidate (``candidate_trial``) or the whole sandwich
(``sandwich_trial``). The teacher, its importance and the tokenised data come in a
:class:`~minidisc_ray.candidates.SearchPayload` whose large parts are Ray object references put once
per job. A trial whose evaluation the project has already recorded reports the record instead of
training again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from minidisc_ray.candidates import SearchPayload, sandwich_scores, score_candidate
from minidisc_ray.ray_env import resolved
from minidisc_ray.ray_train import node_id
from minidisc_ray.search.train_trial import score_on_workers

__all__ = ["SearchPayload", "candidate_trial", "sandwich_trial", "score_candidate"]


def _event(payload: SearchPayload, **fields: Any) -> None:
    """Append a line to the search's event log (when its directory is visible from this node)."""
    if payload.events_path and Path(payload.events_path).parent.is_dir():
        with open(payload.events_path, "a") as fh:
            fh.write(json.dumps({**fields, "pid": os.getpid(), "time": time.time()}) + "\n")


def _device() -> torch.device:
    """The GPU Ray gave this trial (``search.trial_gpus``), else the CPU."""
    try:
        if ray.get_gpu_ids() and torch.cuda.is_available():
            return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU(s)
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    return torch.device("cpu")


def _threads() -> None:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
    except Exception:  # noqa: BLE001 - outside Ray keep torch's default
        pass


def _reuse(payload: SearchPayload, key: str, **event: Any) -> dict[str, Any] | None:
    """A finished evaluation's recorded result, re-scored with this search's lambda (None: not recorded)."""
    done = payload.finished.get(key)
    if done is None:
        return None
    _event(payload, event="reused", **event)
    result = {**done, "reused": True, "eval_key": key, "node": node_id(), "finished_at": time.time()}
    if "param_sparsity" in result and "metric" in result:
        result["tradeoff"] = payload.score(result["metric"], result["param_sparsity"])
    return result


def candidate_trial(config: dict[str, Any], payload: SearchPayload) -> None:
    """Ray Tune function trainable for one TA candidate (``config["sparsity"]``)."""
    _threads()
    s = float(config["sparsity"])
    if payload.trial_workers == 1:  # a worker group resolves the payload itself, on its own nodes
        payload = resolved(payload)
    exhaustive = bool(config.get("exhaustive", False))
    key = payload.evaluation_key("exhaustive" if exhaustive else "candidate", s)
    trial_id = tune.get_context().get_trial_id()
    reused = _reuse(payload, key, sparsity=s, trial_id=trial_id)
    if reused is not None:
        tune.report(reused)
        return
    _event(payload, event="start", sparsity=s, trial_id=trial_id, node=node_id())
    if os.environ.get("MINIDISC_TEST_FAIL_TRIALS"):  # fault injection for the tests of failure handling
        raise RuntimeError("injected trial failure (MINIDISC_TEST_FAIL_TRIALS is set)")
    if payload.trial_workers > 1 and not exhaustive:  # a candidate larger than one device: FSDP over a worker group

        result = score_on_workers(payload, s, payload.trial_workers, payload.trial_cpus, payload.trial_gpus)
    else:
        # auto keeps the recovered candidates its halving round starts from (where this trial can see them)
        keep = None if exhaustive else payload.recovered_path(s)
        result = score_candidate(payload, s, exhaustive=exhaustive, device=_device(), keep=keep)
    result.update(node=node_id(), finished_at=time.time(), eval_key=key)
    if exhaustive:  # its candidate half is exactly the candidate trial's evaluation: record it for that too
        result["candidate_key"] = payload.evaluation_key("candidate", s)
    _event(payload, event="finish", sparsity=s, trial_id=trial_id)
    tune.report(result)


def sandwich_trial(config: dict[str, Any], payload: SearchPayload) -> None:
    """Ray Tune function trainable of the sandwich strategy (one trial trains and scores every width)."""
    _threads()
    payload = resolved(payload)
    grid = sorted(float(s) for s in config["grid"])
    key = payload.evaluation_key("sandwich", grid)
    reused = _reuse(payload, key, sparsity=None, trial_id=tune.get_context().get_trial_id())
    if reused is not None:
        cands = json.loads(reused["candidates"])
        for c in cands:
            c["tradeoff"] = payload.score(c["metric"], c["param_sparsity"])
        best = max(cands, key=lambda c: (c["tradeoff"], c["sparsity"]))
        tune.report({**reused, "candidates": json.dumps(cands), "tradeoff": best["tradeoff"],
                     "sparsity": best["sparsity"]})
        return
    result = sandwich_scores(payload, grid, _device())
    best = result["best"]
    tune.report({"candidates": json.dumps(result["candidates"]), "tradeoff": best["tradeoff"],
                 "sparsity": best["sparsity"], "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                 "node": node_id(), "finished_at": time.time(), "eval_key": key, "metric": best["metric"]})
