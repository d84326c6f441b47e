"""Task metrics as plain numpy: GLUE's (accuracy, F1, Matthews correlation, Pearson/Spearman) and the
language-modelling score (perplexity mapped to a higher-is-better number for the lambda-tradeoff)."""

from __future__ import annotations

import math

import numpy as np


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
        from scipy import stats  # here, not at the top: 0.7 s of every Ray worker's start-up otherwise

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


def chance_metric(train_labels: np.ndarray, dev_labels: np.ndarray, metric: str, num_labels: int) -> float:
    """The dev metric of always answering the training split's most frequent class (what a model with no
    skill scores): majority-class accuracy, F1 of the constant answer, 0 for correlations."""
    if num_labels <= 1 or metric in ("pearson", "spearman", "pearson_spearman", "matthews_correlation"):
        return 0.0
    majority = int(np.bincount(train_labels.astype(np.int64), minlength=num_labels).argmax())
    logits = np.zeros((len(dev_labels), num_labels))
    logits[:, majority] = 1.0
    return task_metrics(logits, dev_labels, metric)["metric"]


LM_METRIC = "lm_score"


def lm_score(perplexity: float, vocab_size: int) -> float:
    """Perplexity as a higher-is-better score for the lambda-tradeoff: ``1 - ln(ppl) / ln(V)``.

    ``ln(ppl)`` is the mean next-token cross-entropy in nats and ``ln(V)`` is that of a uniform guess over
    the vocabulary, so the score is the fraction of the uniform guess's uncertainty the model removes:
    1 for a perfect model (ppl 1), 0 for the uniform guess (ppl V), negative for worse. On this scale a
    doubling of perplexity costs ``ln 2 / ln V`` (0.064 for a 49,152-token vocabulary), so
    ``metric + lam * sparsity`` weighs perplexity against size as it weighs accuracy for classification.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    if not perplexity >= 1.0:  # also catches NaN
        return math.nan if math.isnan(perplexity) else 1.0
    return 1.0 - math.log(perplexity) / math.log(vocab_size)


def perplexity_of_score(score: float, vocab_size: int) -> float:
    """The perplexity an :func:`lm_score` stands for: ``V ** (1 - score)``."""
    return float(vocab_size ** (1.0 - score))


def lm_metrics(nll_sum: float, tokens: int, vocab_size: int) -> dict[str, float]:
    """Mean next-token NLL (nats), perplexity and :func:`lm_score` from summed token NLLs."""
    nll = nll_sum / max(1, tokens)
    ppl = math.exp(min(nll, 700.0))
    score = lm_score(ppl, vocab_size)
    return {"nll": nll, "perplexity": ppl, LM_METRIC: score, "tokens": float(tokens), "metric": score}
