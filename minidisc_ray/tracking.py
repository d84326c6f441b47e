"""Experiment tracking with MLflow (``tracking.mlflow: true``).

One MLflow run per ``minidisc run`` (named by the run id) holds the flattened config as parameters, the
teacher's, assistant's and student's dev metrics, the report and the student's files as artifacts; a
nested run per chain stage holds its evaluation curve (loss and dev metric per step). The search trials
are logged by Ray Tune's own ``MLflowLoggerCallback`` into the same experiment, one run per trial,
tagged with the job's run id.

Nothing leaves the machine unless ``tracking.uri`` says so: the default store is SQLite under the output
directory (``OUTPUT/mlruns/mlflow.db``, artifacts in ``OUTPUT/mlruns/artifacts``), readable with
``mlflow ui --backend-store-uri sqlite:///OUTPUT/mlruns/mlflow.db``. Logging runs on the driver only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from minidisc_ray.config import Config
from minidisc_ray.errors import UserInputError


def tracking_uri(cfg: Config, out: Path) -> str:
    """``tracking.uri``, or the SQLite store under ``OUTPUT/mlruns``."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    root = (out / "mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_root(cfg: Config, out: Path) -> str | None:
    if cfg.tracking.uri:
        return None  # the server's own default
    path = (out / "mlruns" / "artifacts").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def _import_mlflow() -> Any:
    try:
        import mlflow  # deferred: the optional MLflow client (an install hint when missing)
    except ImportError:
        raise UserInputError("tracking.mlflow", True, "install MLflow: pip install mlflow-skinny (or mlflow), "
                             "or set tracking.mlflow: false") from None
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def experiment_id(cfg: Config, out: Path) -> tuple[str, str]:
    """(tracking URI, experiment id) of the job's experiment, created on first use."""
    mlflow = _import_mlflow()
    uri = tracking_uri(cfg, out)
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return uri, str(exp.experiment_id)
    return uri, str(client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(cfg, out)))


def tune_callback(cfg: Config, out: Path, run_id: str, strategy: str) -> Any:
    """Ray Tune's MLflow callback for the search trials (driver side), or None when tracking is off."""
    if not cfg.tracking.mlflow:
        return None

    uri, _ = experiment_id(cfg, out)
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.tracking.experiment, save_artifact=False,
                                tags={"minidisc.run_id": run_id, "minidisc.kind": f"search-trial/{strategy}"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class Tracker:
    """The job's MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, cfg: Config, out: Path, run_id: str, command: str) -> None:
        self.enabled = cfg.tracking.mlflow
        self.cfg, self.out, self.run_id = cfg, out, run_id
        self.mlflow_run_id: str | None = None
        if not self.enabled:
            return
        mlflow = _import_mlflow()
        self.uri, self.experiment = experiment_id(cfg, out)
        self.client = mlflow.tracking.MlflowClient(self.uri)
        run = self.client.create_run(self.experiment, run_name=f"minidisc-{run_id}",
                                     tags={"minidisc.run_id": run_id, "minidisc.kind": "job",
                                           "minidisc.command": command[:500]})
        self.mlflow_run_id = run.info.run_id
        params = _flatten(cfg.to_dict())
        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.mlflow_run_id, params=[mlflow.entities.Param(k, v[:500])
                                                               for k, v in items[i:i + 90]])
        self.client.log_text(self.mlflow_run_id, json.dumps(cfg.to_dict(), indent=1), "config.json")

    def stage(self, name: str, info: dict[str, Any]) -> None:
        """A nested run with a chain stage's evaluation curve."""
        if not self.enabled or self.mlflow_run_id is None:
            return
        from mlflow.entities import Metric  # deferred: optional MLflow, loaded by _import_mlflow when enabled

        run = self.client.create_run(self.experiment, run_name=f"{name}-{self.run_id}",
                                     tags={"mlflow.parentRunId": self.mlflow_run_id, "minidisc.run_id": self.run_id,
                                           "minidisc.kind": "chain-stage", "minidisc.stage": name})
        metrics = []
        for entry in info.get("history", []):
            for key in ("loss", "metric", "perplexity", "accuracy", "lm_score"):
                value = entry.get(key)
                if isinstance(value, (int, float)):
                    metrics.append(Metric(key, float(value), 0, int(entry["step"])))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run.info.run_id, metrics=metrics[i:i + 900])
        for key in ("seconds", "steps_run", "best_step", "best_metric"):
            if isinstance(info.get(key), (int, float)):
                self.client.log_metric(run.info.run_id, key, float(info[key]))
        self.client.set_terminated(run.info.run_id)

    def finish(self, report: dict[str, Any], student_dir: Path | None) -> None:
        if not self.enabled or self.mlflow_run_id is None:
            return
        rid = self.mlflow_run_id
        for role in ("teacher", "assistant", "student", "baseline_direct_kd"):
            entry = report.get(role)
            if entry:
                self.client.log_metric(rid, f"{role}.metric", float(entry["metric"]))
                self.client.log_metric(rid, f"{role}.params", float(entry["params"]))
        if report["search"].get("chosen_sparsity") is not None:
            self.client.log_metric(rid, "search.chosen_sparsity", float(report["search"]["chosen_sparsity"]))
        self.client.log_metric(rid, "seconds.total", float(report["seconds"]["total"]))
        for name in ("report.json", "report.md", "tradeoff.png", "metric_vs_params.png"):
            if (self.out / name).is_file():
                self.client.log_artifact(rid, str(self.out / name))
        if student_dir is not None and student_dir.is_dir():
            self.client.log_artifacts(rid, str(student_dir), artifact_path="student")
        self.client.set_terminated(rid)

    def failed(self) -> None:
        if self.enabled and self.mlflow_run_id is not None:
            self.client.set_terminated(self.mlflow_run_id, status="FAILED")
