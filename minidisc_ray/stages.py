"""A chain stage's model directory: export (save, reload, evaluate, sign) and reuse on a rerun.

A finished stage leaves ``OUTPUT/<link directory>/`` with the weights, the tokenizer, the pruning plan,
a model card and ``minidisc.json``: the stage's key and summary, its metric and sizes, and the fingerprint
of the weights, signed (:func:`records.sign`). A rerun with the same key reuses the directory instead of
distilling again, after checking the signature and the weights. No Ray here: :class:`chain.runner.ChainRunner`
runs the stages on Ray Train and calls these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from minidisc_ray.families import count_params, unit_widths
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.modelio.locate import read_record
from minidisc_ray.pipeline import Prepared, task_record
from minidisc_ray.pruning import PruningPlan, param_sparsity
from minidisc_ray.records import sign, tensor_fingerprint, verify, warn_record
from minidisc_ray.report import model_card
from minidisc_ray.training import evaluate

_SIGNED = ("stage", "metric", "params", "sparsity", "param_sparsity", "weights")


def shape_plan(model: nn.Module, unit_sparsity: float) -> PruningPlan:
    """The plan that describes ``model``'s layer widths (how a pruned model directory is rebuilt)."""
    heads, neurons = unit_widths(model)
    return PruningPlan.prefix(heads, neurons, unit_sparsity)


def export_stage(prep: Prepared, model: nn.Module, out: Path, role: str, unit_sparsity: float, command: str,
                 assistant: str | None, stage: dict[str, Any]) -> dict[str, Any]:
    """Save ``model`` as a model directory, evaluate it on the rows that select (and on the held-out dev rows, where
    the job keeps them back) and sign its record; returns its summary.

    The record keeps the stage's key and summary, so a later run with the same inputs reuses the
    directory instead of distilling again.
    """
    prunable, total = count_params(model)
    record: dict[str, Any] = {"role": role, "teacher": prep.teacher_dir, "assistant": assistant,
                              "sparsity": unit_sparsity, "param_sparsity": param_sparsity(prunable, prep.prunable),
                              "params": {"prunable": prunable, "total": total},
                              "task": task_record(prep.task, prep.cfg.task),
                              "metric_name": prep.task.metric, "metric": float("nan"), "command": command,
                              "stage": stage}
    metrics = evaluate(model, prep.dev_loader(), prep.task.metric)
    record.update(metric=metrics["metric"], metrics=metrics, weights=tensor_fingerprint(model.state_dict()))
    held_out = prep.held_out_metrics(model)
    if held_out is not None:  # "metric" is then the validation split's (what chose the weights)
        record["held_out"] = held_out
    record["mac"] = sign(signed_part(record))
    save_model_dir(model, prep.tokenizer, out, plan=shape_plan(model, unit_sparsity), record=record,
                   card=model_card(role, record, command), field=f"--output ({out.name}/)")
    return summary_of(record, out)


def summary_of(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """A stage's line in ``report.json``."""
    return {"sparsity": record["sparsity"], "param_sparsity": record["param_sparsity"],
            "params": record["params"]["total"], "prunable": record["params"]["prunable"],
            "metric": record["metric"], "path": str(out),
            **({"held_out_metric": record["held_out"]["metric"]} if record.get("held_out") else {})}


def signed_part(record: dict[str, Any]) -> dict[str, Any]:
    """What a stage's record vouches for (as JSON will read it back): its key and summary, metric, sizes and
    the fingerprint of the weights beside it."""
    signed = {k: record.get(k) for k in _SIGNED}
    if "held_out" in record:  # kept back from selection; records written before it existed verify as they were
        signed["held_out"] = record["held_out"]
    return json.loads(json.dumps(signed, default=str))


def finished_stage(out: Path, key: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]] | None:
    """(model, summary, stage info) of a stage a previous run finished with the same key.

    The record must carry a valid signature (:func:`records.sign`) over its summary and the weights'
    fingerprint, and the weights must match it; anything else is ignored with one warning and distilled again.
    """
    record = read_record(out, f"--output ({out.name}/)") if out.is_dir() else {}
    stage = record.get("stage")
    if not isinstance(stage, dict) or stage.get("key") != key:
        return None
    if not verify(signed_part(record), record.get("mac")):
        warn_record(out / "minidisc.json", "its signature does not match (edited, or written under another key)")
        return None
    model, *_ = load_model_dir(str(out), field=f"--output ({out.name}/)")
    if tensor_fingerprint(model.state_dict()) != record.get("weights"):
        warn_record(out / "model.safetensors", "the weights are not the ones the record vouches for")
        return None
    info = {k: v for k, v in stage.items() if k != "key"}
    info["reused"] = True
    return model, summary_of(record, out), info
