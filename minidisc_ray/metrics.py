"""GLUE task metrics (accuracy, F1, Matthews correlation, Pearson/Spearman) as plain numpy."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(((preds == 1) & (labels == 1)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when undefined."""
    classes = np.union1d(preds, labels)
    index = {c: i for i, c in enumerate(classes)}
    c = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, t in zip(preds, labels, strict=True):
        c[index[t], index[p]] += 1
    t_sum, p_sum = c.sum(axis=1), c.sum(axis=0)
    n, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return 0.0 if denom == 0 else float(cov_ytyp / denom)


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(fn(a, b)[0])


def task_metrics(logits: np.ndarray, labels: np.ndarray, metric: str) -> dict[str, float]:
    """All metrics GLUE reports for a task whose selection metric is ``metric``.

    Args:
        logits: model outputs, shape (N, num_labels); (N, 1) for regression.
        labels: gold labels (class ids, or floats for regression).
        metric: the selection metric; its value is also returned under the key ``"metric"``.
    """
    out: dict[str, float] = {}
    if metric in ("pearson", "spearman", "pearson_spearman"):
        scores = logits.reshape(-1).astype(np.float64)
        gold = labels.astype(np.float64)
        out["pearson"] = _corr(stats.pearsonr, scores, gold)
        out["spearman"] = _corr(stats.spearmanr, scores, gold)
        out["pearson_spearman"] = (out["pearson"] + out["spearman"]) / 2
    else:
        preds = logits.argmax(axis=-1)
        gold = labels.astype(np.int64)
        out["accuracy"] = accuracy(preds, gold)
        if logits.shape[-1] == 2:
            out["f1"] = f1_binary(preds, gold)
        out["matthews_correlation"] = matthews_corrcoef(preds, gold)
    out["metric"] = out[metric]
    return out
