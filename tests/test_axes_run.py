"""A whole ``minidisc run`` with ``pruning.axes: [heads, ffn, hidden, depth]`` on real Ray: every grid point and
the student take a shape chosen within their budget of the teacher's parameters, the chain distils through
them, and the student is a smaller model in every axis that records which teacher layers and channels it kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import make_tokenizer, save_tiny_teacher
from .test_search_ray import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_run_on_every_axis_keeps_each_model_within_its_budget(tmp_path: Path, sst2_dir: Path) -> None:
    teacher = save_tiny_teacher(tmp_path / "teacher", make_tokenizer(tmp_path / "tok"), seed=4)
    out = tmp_path / "run"
    cfg = tiny_config(teacher, out, sst2_dir, pruning={"grid": [0.3, 0.5, 0.7], "importance_samples": 64,
                                                       "student_sparsity": 0.8, "axes": ["heads", "ffn", "hidden",
                                                                                         "depth"],
                                                       "min_hidden": 0.25},
                      distill={"steps": 40, "batch_size": 16, "eval_every": 20}, ray={"num_cpus": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("[shapes] ") == 5, done.stderr  # four budgets and the summary line
    report = json.loads((out / "report.json").read_text())
    total = report["teacher"]["params"]
    chosen = report["search"]["chosen_sparsity"]
    assert report["assistant"]["params"] <= (1 - chosen) * total
    assert report["student"]["params"] <= (1 - 0.8) * total
    assert report["baseline_direct_kd"]["params"] <= (1 - 0.8) * total
    from minidisc_ray.axes import hidden_width
    from minidisc_ray.modelio.load import load_model_dir

    assistant = load_model_dir(str(out / "assistant")).model
    assert hidden_width(assistant) < 32 or assistant.config.num_hidden_layers < 2, "a cut on hidden or depth"
    cut = assistant.config.minidisc_cut  # relative to the teacher it was cut from: what its stage's loss compared
    assert set(cut) == {"layers", "hidden"} and (cut["hidden"] or cut["layers"])
    assert load_model_dir(str(out / "student")).model.num_parameters() == report["student"]["params"]
