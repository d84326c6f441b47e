"""The project's own record of finished work, so that nothing finished is computed twice.

Candidate evaluations (and exhaustive/sandwich trials) are written by the search driver as soon as their
result reaches it, one JSON file per evaluation under ``OUTPUT/evaluations/``, named by a key over
everything that determines the result: the teacher's weights, the tokenised data, the sparsity, the
recovery budget, the importance sample and the seed. A rerun, a resumed search or a second strategy in
``minidisc compare`` finds the record and reports it instead of training again. Records are plain JSON:
nothing in an output directory is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from minidisc_ray.outputs import atomic_write_text


def digest(*parts: Any) -> str:
    """A stable hex key over JSON-serialisable parts (dataclasses become dicts)."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.asdict(x)
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tensor_fingerprint(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (the identity of a set of weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


class EvaluationStore:
    """Finished evaluations as ``DIR/KEY.json``; reads tolerate a missing or damaged directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        try:
            record = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        result = record.get("result")
        if not isinstance(result, dict) or not _finite(result.get("metric")):
            return None
        return result

    def put(self, key: str, result: dict[str, Any]) -> None:
        atomic_write_text(self.path(key), json.dumps({"key": key, "result": result}, default=float) + "\n")

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0


def machine() -> dict[str, Any]:
    """Where a result was measured: cores, memory, GPU, platform and the versions that matter."""
    import os
    import platform
    import sys
    import time

    import numpy

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


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
