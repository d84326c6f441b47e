"""Helpers shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# SST-2 in GLUE form: ../shared/data/glue/SST-2, or any directory of that shape named by MINIDISC_SST2_DIR
SST2 = Path(os.environ.get("MINIDISC_SST2_DIR")
            or Path(os.environ.get("MINIDISC_SHARED", REPO.parent / "shared")) / "data" / "glue" / "SST-2")
COMMITTED = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("MINIDISC_BENCH_RESULTS", COMMITTED))  # tests redirect output to a temp dir

from minidisc_ray.records import machine  # noqa: E402

__all__ = ["COMMITTED", "REPO", "RESULTS", "SST2", "machine", "save_figure", "teacher_and_data", "write"]


def write(name: str, data: dict[str, Any], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    # how the file was produced, always: the script and its arguments as run, and the machine
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "?", *sys.argv[1:]])
    path.write_text(json.dumps({"machine": machine(), "quick": quick, "command": command, **data}, indent=1,
                               default=float))
    print(f"wrote {path}")
    return path


def save_figure(fig: Any, name: str, quick: bool) -> Path:
    """Write a benchmark's figure beside its JSON (``NAME.png``, or ``NAME.quick.png``)."""
    fig.tight_layout()
    path = RESULTS / (f"{name}.quick.png" if quick else f"{name}.png")
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")
    return path


def teacher_and_data(quick: bool, max_dev_samples: int, importance_rows: int) -> dict[str, Any]:
    """The benchmarks' teacher (all-MiniLM-L6-v2, or a tiny random BERT with ``quick``), SST-2 rows
    tokenised to 64 tokens, and the teacher's importance over ``importance_rows`` of them."""
    import tempfile

    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, make_loader, tokenize_task
    from minidisc_ray.modelio.load import load_model_dir
    from minidisc_ray.pruning import compute_importance

    if quick:
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_tokenizer, tiny_bert

        tokenizer = make_tokenizer(Path(tempfile.mkdtemp()))
        teacher = tiny_bert(layers=2, heads=4, hidden=64, ffn=256)
    else:
        teacher, tokenizer, _, _ = load_model_dir("minilm", num_labels=2)
    task = load_task(TaskConfig(data=str(SST2), max_train_samples=2000, max_dev_samples=max_dev_samples,
                                max_length=64))
    train, dev, _ = tokenize_task(task, tokenizer, 64)
    imp = compute_importance(teacher, make_loader(train.select(range(importance_rows)), tokenizer, 32))
    return {"teacher": teacher, "tokenizer": tokenizer, "train": train, "dev": dev, "importance": imp, "task": task}
