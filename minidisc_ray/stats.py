"""Statistics of dev-set evaluations: how far apart two models' dev metrics must be before the gap is more than
the dev set's sampling noise (:func:`dev_noise`, :func:`paired_noise`), and each dev row's correctness packed small
enough to travel in a Tune result (:func:`pack_rows`)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def dev_noise(metric: str, value: float, n: int) -> float | None:
    """Standard error of the difference of two models' dev metrics on the same ``n`` rows, as sampling noise
    of the dev set: ``sqrt(2 p (1 - p) / n)`` for accuracy-like metrics (binomial), ``sqrt(2) (1 - r^2) /
    sqrt(n - 1)`` for correlations; None where no simple formula holds (F1, MCC, lm_score)."""
    if n < 2 or not math.isfinite(value):
        return None
    if metric == "accuracy":
        p = min(max(value, 0.0), 1.0)
        return math.sqrt(2.0 * p * (1.0 - p) / n)
    if metric in ("pearson", "spearman", "pearson_spearman"):
        return math.sqrt(2.0) * (1.0 - value * value) / math.sqrt(n - 1)
    return None


def pack_rows(correct: npt.ArrayLike) -> str:
    """Per-row correctness (0/1 in the dev set's order) as ``"<rows>:<hex of the packed bits>"``: 872 rows take
    222 characters, small enough for a Tune result and a rung's record."""
    bits = np.asarray(correct, dtype=np.uint8)
    return f"{len(bits)}:{np.packbits(bits).tobytes().hex()}"


def unpack_rows(packed: str) -> np.ndarray:
    """The 0/1 vector :func:`pack_rows` packed (numpy int8)."""
    n, _, hexed = packed.partition(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[:int(n)].astype(np.int8)


def paired_noise(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[float, int]:
    """(standard error of the difference in accuracy, rows where the two disagree) of two models evaluated on the
    same rows (0/1 correctness each): the per-row differences' standard deviation over sqrt(rows). Students
    distilled from one teacher agree on most rows, so this is usually well below :func:`dev_noise`'s bound,
    which treats the two models' errors as independent."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return se, int(np.count_nonzero(d))


BOOTSTRAP = 2000


def spearman(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy import stats  # deferred: 0.7 s of every Ray worker's start-up otherwise

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b)[0])


def interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap replicates (NaN replicates left out); None when none is finite."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return None
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]
