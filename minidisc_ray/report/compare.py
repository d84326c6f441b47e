"""``minidisc compare``'s report: ``compare.{json,md,png}`` (each strategy's pick, evaluations and cost, and their
lambda-tradeoff curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minidisc_ray.outputs import atomic_write_text, write_json
from minidisc_ray.report.figures import UNIT_SPARSITY, figure, label


def compare_markdown(data: dict[str, Any]) -> str:
    lines = ["| strategy | chosen assistant (unit sparsity) | evaluations | evaluations to reach the grid's pick "
             "| CPU s (cost) "
             "| reused from the record | wall s here |", "|---|---|---|---|---|---|---|"]
    for name, r in data["strategies"].items():
        lines.append(f"| {name} | {r['chosen_sparsity']} | {r['evaluations']} | {r.get('evaluations_to_truth')} | "
                     f"{r['cpu_seconds']:.1f} | {r.get('reused', 0)} | {r['seconds']:.1f} |")
    return f"# Strategy comparison (lambda = {data['lam']})\n\n" + "\n".join(lines) + "\n"


def plot_compare(data: dict[str, Any], path: Path) -> None:
    """Lambda-tradeoff against unit sparsity for every strategy, each strategy's pick circled."""
    markers = "osD^vP*X"
    with figure(path, size=(7, 4.2)) as (_, ax):
        for k, (name, r) in enumerate(data["strategies"].items()):
            pts = sorted((c["sparsity"], c["tradeoff"]) for c in r["candidates"]
                         if not c.get("failed") and c.get("tradeoff") is not None)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-" if name == "grid" else ":",
                    alpha=0.8, label=f"{name} ({r['evaluations']} eval.)")
            if r["chosen_sparsity"] is not None and r.get("chosen") and r["chosen"].get("tradeoff") is not None:
                ax.scatter([r["chosen_sparsity"]], [r["chosen"]["tradeoff"]], s=180, facecolors="none",
                           edgecolors=f"C{k}", linewidths=2)
        label(ax, f"assistant {UNIT_SPARSITY}", f"metric + {data['lam']} x parameter sparsity",
              "Lambda-tradeoff of assistant candidates; circles: each strategy's pick", legend_size=8)


def write_compare(data: dict[str, Any], out: Path) -> None:
    """``compare.json``, ``compare.md`` and ``compare.png``."""
    write_json(out / "compare.json", data)
    atomic_write_text(out / "compare.md", compare_markdown(data))
    plot_compare(data, out / "compare.png")
