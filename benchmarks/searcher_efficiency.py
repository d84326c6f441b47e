"""Evaluations until the exact lambda-argmax is found: bisection vs Optuna TPE vs random vs grid.

Curves: synthetic unimodal, plateau and noisy curves for K = 8, 16, 32, 64, and the real lambda curve
recorded from the SST-2 grid search (benchmarks/results/sst2_grid_curve.json). Each strategy is
replayed against the curve (no training); 20 seeds each; median and worst over seeds. A strategy
"finds" the argmax at the evaluation that first scores the grid's argmax candidate.

    python benchmarks/searcher_efficiency.py            # full: 20 seeds, K up to 64
    python benchmarks/searcher_efficiency.py --quick    # 3 seeds, K up to 16 (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import COMMITTED, write  # noqa: E402

from minidisc_ray.search.replay import bisection_order, optuna_order  # noqa: E402
from minidisc_ray.tradeoff import best_index


def make_curve(kind: str, k: int, rng: random.Random) -> list[float]:
    peak = rng.randrange(k)
    if kind == "unimodal":
        up = sorted(rng.uniform(0.6, 0.9) for _ in range(peak + 1))
        down = sorted((rng.uniform(0.5, up[-1] - 1e-4) for _ in range(k - peak - 1)), reverse=True)
        return up + down
    if kind == "plateau":  # a flat top of width ~K/4 with tiny differences, steep sides
        width = max(1, k // 4)
        lo, hi = max(0, peak - width // 2), min(k, peak + width // 2 + 1)
        return [0.9 + rng.uniform(0, 1e-3) if lo <= i < hi else 0.9 - 0.01 * min(abs(i - lo), abs(i - hi + 1))
                for i in range(k)]
    if kind == "noisy":  # smooth bump plus measurement noise (sd 0.003 ~ one dev example in 300)
        return [0.9 - 0.3 * ((i - peak) / k) ** 2 + rng.gauss(0, 0.003) for i in range(k)]
    raise ValueError(kind)


def run_bisection(curve: list[float], seed: int, points: int) -> list[int]:
    return bisection_order(curve, points)[0]


def run_random(curve: list[float], seed: int) -> list[int]:
    order = list(range(len(curve)))
    random.Random(seed).shuffle(order)
    return order


def run_grid(curve: list[float], seed: int) -> list[int]:
    return list(range(len(curve)))


def run_optuna(curve: list[float], seed: int, budget: int | None = None, sampler: str = "tpe",
               integer: bool = False) -> list[int]:
    """What a user would run with Optuna over the same grid, stopping at the argmax or the budget."""
    return optuna_order(curve, seed, budget, sampler, integer, stop_at_best=True)[0]


def evals_to_find(order: list[int], curve: list[float]) -> float:
    target = best_index(curve)
    for n, i in enumerate(order, 1):
        if curve[i] == curve[target]:  # type: ignore[index]
            return n
    return math.inf


STRATEGIES: dict[str, Callable[[list[float], int], list[int]]] = {
    "bisection": lambda c, s: run_bisection(c, s, 1),
    "bisection-2/round": lambda c, s: run_bisection(c, s, 2),
    "optuna-tpe": run_optuna,
    "optuna-tpe-int": lambda c, s: run_optuna(c, s, integer=True),
    "optuna-random": lambda c, s: run_optuna(c, s, sampler="random"),
    "optuna-grid": lambda c, s: run_optuna(c, s, sampler="grid"),
    "random": run_random, "grid": run_grid,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=60, help="seeds per curve kind and K (medians also per block of 20)")
    args = ap.parse_args()
    seeds = 3 if args.quick else args.seeds
    ks = [8, 16] if args.quick else [8, 16, 32, 64]
    cases: list[tuple[str, int, Callable[[int], list[float]]]] = []
    for kind in ("unimodal", "plateau", "noisy"):
        for k in ks:
            cases.append((kind, k, lambda seed, kind=kind, k=k: make_curve(kind, k, random.Random(1000 * k + seed))))
    real = json.loads((COMMITTED / "sst2_grid_curve.json").read_text())
    real_curve = [c["tradeoff"] for c in sorted(real["candidates"], key=lambda c: c["sparsity"])]
    cases.append(("sst2-real", len(real_curve), lambda seed: real_curve))
    rows = []
    for kind, k, curve_of in cases:
        for name, fn in STRATEGIES.items():
            found, found_exact, total, regret = [], 0, [], []
            for seed in range(seeds):
                curve = curve_of(seed)
                order = fn(curve, seed)
                n = evals_to_find(order, curve)
                found.append(n)
                total.append(len(order))
                found_exact += math.isfinite(n)
                budget = len(run_bisection(curve, seed, 1))
                if name.startswith("optuna"):
                    kind_ = name.removeprefix("optuna-").removesuffix("-int")
                    order = run_optuna(curve, seed, budget=budget, sampler=kind_, integer=name.endswith("-int"))
                seen = order[:budget]
                regret.append(max(curve) - max(curve[i] for i in seen))
            finite = [f for f in found if math.isfinite(f)]
            blocks = [found[i:i + 20] for i in range(0, len(found), 20) if len(found[i:i + 20]) == 20]
            row_blocks = [statistics.median(b) for b in blocks]
            row = {"median_evals_per_block_of_20": row_blocks,
                   "curve": kind, "K": k, "strategy": name, "seeds": seeds, "found_exact": found_exact,
                   "median_evals_to_argmax": statistics.median(found) if finite else None,
                   "worst_evals_to_argmax": max(found) if finite and len(finite) == len(found) else None,
                   "median_total_evals": statistics.median(total),
                   "median_regret_at_bisection_budget": statistics.median(regret),
                   "worst_regret_at_bisection_budget": max(regret)}
            rows.append(row)
            print(f"{kind:10s} K={k:3d} {name:18s} found {found_exact}/{seeds}  median {row['median_evals_to_argmax']}"
                  f"  worst {row['worst_evals_to_argmax']}  total {row['median_total_evals']}"
                  f"  regret@bisection-budget median {row['median_regret_at_bisection_budget']:.4f}"
                  f" worst {row['worst_regret_at_bisection_budget']:.4f}")
    out = write("searcher_efficiency", {"rows": rows, "golden_bound": {str(k): math.ceil(math.log(k, (1 + 5 ** .5) / 2))
                                                                        + 2 for k in ks}}, args.quick)
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    from minidisc_ray.report import figure

    kinds = sorted({r["curve"] for r in rows if r["curve"] != "sst2-real"})
    with figure(path, len(kinds), size=(4.2 * len(kinds), 3.6), dpi=110, sharey=True) as (_, axes):
        for ax, kind in zip(axes, kinds, strict=True):
            for name in STRATEGIES:
                pts = sorted((r["K"], r["median_evals_to_argmax"]) for r in rows if r["curve"] == kind
                             and r["strategy"] == name and r["median_evals_to_argmax"] is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_title(f"{kind} curves")
            ax.set_xlabel("candidates K")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("median evaluations to the exact argmax")
        axes[0].legend(fontsize=8)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
