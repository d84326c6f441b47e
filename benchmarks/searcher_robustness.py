"""Does the bisection searcher return the exact lambda-argmax on real, non-unimodal curves?

    python benchmarks/searcher_robustness.py [extra search.json ...]

Replays every recorded real lambda curve (``benchmarks/results/sst2_grid_curve.json``: the SST-2 grid
search of all-MiniLM-L6-v2, K = 9; any ``search.json`` of a grid run given on the command line) and all
its leave-one-out and leave-two-out variants through ``SandwichBisectionSearcher`` with 1 and 2 points
per round, and counts exact answers and evaluations. Random unimodal curves (200 per K) check the
evaluation bound ``ceil(log_1.618 K) + 2``. Pure Python, seconds. Writes
``benchmarks/results/searcher_robustness.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import COMMITTED, write  # noqa: E402
from searcher_efficiency import make_curve, run_bisection  # noqa: E402


def real_curves(extra: list[str]) -> dict[str, list[float]]:
    out = {}
    for path in [str(COMMITTED / "sst2_grid_curve.json"), *extra]:
        data = json.loads(Path(path).read_text())
        cands = sorted((c for c in data["candidates"] if not c.get("failed")), key=lambda c: c["sparsity"])
        out[Path(path).name] = [float(c["tradeoff"]) for c in cands]
    return out


def variants(curve: list[float]) -> list[tuple[str, list[float]]]:
    out = [("full", curve)]
    out += [(f"without {i}", [v for j, v in enumerate(curve) if j != i]) for i in range(len(curve))]
    out += [(f"without {i},{j}", [v for k, v in enumerate(curve) if k not in (i, j)])
            for i, j in itertools.combinations(range(len(curve)), 2)]
    return out


def replay(curve: list[float], points: int) -> tuple[bool, int]:
    order = run_bisection(curve, 0, points)
    found = max(set(order), key=lambda i: (curve[i], i))
    return curve[found] == max(curve), len(set(order))


def main() -> None:
    result: dict[str, Any] = {"real": [], "unimodal": []}
    for name, curve in real_curves(sys.argv[1:]).items():
        for points in (1, 2):
            runs = [(tag, *replay(v, points)) for tag, v in variants(curve)]
            exact = sum(ok for _, ok, _ in runs)
            result["real"].append({"curve": name, "K": len(curve), "points_per_round": points, "variants": len(runs),
                                   "exact": exact, "exact_share": exact / len(runs),
                                   "mean_evaluations": sum(n for *_, n in runs) / len(runs),
                                   "misses": [tag for tag, ok, _ in runs if not ok]})
            print(result["real"][-1])
    rng = random.Random(0)
    for points in (1, 2):
        for k in (4, 6, 8, 9, 12, 16, 32, 64):
            bound = math.ceil(math.log(k) / math.log((1 + 5 ** 0.5) / 2)) + 2
            counts, wrong = [], 0
            for _ in range(200):
                c = make_curve("unimodal", k, rng)
                ok, n = replay(c, points)
                counts.append(n)
                wrong += not ok
            result["unimodal"].append({"K": k, "points_per_round": points, "bound": bound,
                                       "max_evaluations": max(counts), "mean_evaluations": sum(counts) / len(counts),
                                       "wrong": wrong, "curves": 200})
            print(result["unimodal"][-1])
    write("searcher_robustness", {**result, "command": "python benchmarks/searcher_robustness.py "
                                  + " ".join(sys.argv[1:])}, quick=False)


if __name__ == "__main__":
    main()
