"""The plotting helpers every report figure is drawn with (:func:`figure`, :func:`label`; benchmarks use them
too) and the two sparsity axis labels.

Sparsity labels: ``sparsity`` in a row is the *unit* sparsity (fraction of attention heads and FFN neurons
removed, what the grid and the CLI name); ``param_sparsity`` is the *parameter* sparsity (fraction of the
teacher's prunable parameters removed, what the tradeoff scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib itself is imported when a figure is drawn (see figure)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

UNIT_SPARSITY = "unit sparsity (heads and FFN neurons removed)"
PARAM_SPARSITY = "parameter sparsity (prunable parameters removed)"


@contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (6.5, 4.0), dpi: int = 120,
           sharey: bool = False) -> Iterator[tuple[Figure, Any]]:
    """``with figure(path, 2) as (fig, (a, b)):`` draw; the figure is laid out, saved and closed on exit
    (headless: the Agg backend). The second item is an ``Axes``, or an array of them when ``ncols`` > 1."""
    import matplotlib  # deferred: plotting only, a second of start-up for every process that imports reports

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib above

    fig, axes = plt.subplots(1, ncols, figsize=size, sharey=sharey)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def label(ax: Axes, xlabel: str, ylabel: str, title: str, legend_size: float | None = None) -> None:
    """Axis labels, title, a light grid and the legend: every plot's finish."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**({"fontsize": legend_size} if legend_size else {}))
