"""Helpers shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

COMMITTED = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("MINIDISC_BENCH_RESULTS", COMMITTED))  # tests redirect output to a temp dir


def machine() -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    for mod in ("ray", "transformers", "optuna", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def write(name: str, data: dict[str, Any], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps({"machine": machine(), "quick": quick, **data}, indent=1, default=float))
    print(f"wrote {path}")
    return path
