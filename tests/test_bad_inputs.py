"""Bad input of every class the hardening issue found: one line naming the field, exit 2, nothing written.

Each case runs the real CLI (in process where no Ray is involved, in a subprocess where Ray would start),
checks the single ``minidisc: error:`` line, the exit code, that no output appeared and that nothing the
user owned was touched.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from minidisc_ray.cli import main

from .conftest import REPO, _cli, _one_line, _Planted, sentiment_rows, snapshot, write_csv

DEFAULT = str(REPO / "search_spaces" / "default.yaml")


# ---------------------------------------------------------------- data is never lost


@pytest.mark.parametrize("where", ["cwd", "foreign"])
def test_prune_refuses_a_directory_it_did_not_write(capsys, tmp_path: Path, teacher, monkeypatch,  # type: ignore[no-untyped-def]
                                                    where: str) -> None:
    teacher_dir, _ = teacher
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("a,b\n")
    before = snapshot(mine)
    if where == "cwd":
        monkeypatch.chdir(mine)
        target = "."
    else:
        target = str(mine)
    rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", "0.5", "--output", target,
                   "--samples", "8")
    _one_line(rc, err, "--output", "did not write")
    assert snapshot(mine) == before, "nothing the user owned was changed"


def test_prune_output_that_is_a_file_or_under_a_file(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, _ = teacher
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for target, needle in ((afile, "this is a file"), (afile / "sub", "is a file")):
        rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", "0.5", "--output", str(target))
        _one_line(rc, err, "--output", needle)
    assert afile.read_text() == "keep me"


def test_prune_replaces_its_own_model_directory_atomically(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, _ = teacher
    out = tmp_path / "half"
    for s in ("0.5", "0.7"):
        rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", s, "--output", str(out),
                       "--samples", "8")
        assert rc == 0, err
    assert json.loads((out / "minidisc.json").read_text())["sparsity"] == 0.7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half.")], "no temporary sibling is left"


def test_run_refuses_a_foreign_output_directory_before_any_work(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.txt").write_text("mine")
    t0 = time.perf_counter()
    rc, err = _cli(capsys, "run", DEFAULT, "--output", str(mine))
    _one_line(rc, err, "--output", "did not write")
    assert time.perf_counter() - t0 < 10, "refused before loading anything"
    assert snapshot(mine) == {"report.txt": b"mine"}
    afile = tmp_path / "f"
    afile.write_text("x")
    rc, err = _cli(capsys, "search", DEFAULT, "--output", str(afile))
    _one_line(rc, err, "--output", "this is a file")


# ---------------------------------------------------------------- config values


@pytest.mark.parametrize(("override", "field"), [
    ("pruning.grid=0.5", "pruning.grid"),
    ("pruning.grid=null", "pruning.grid"),
    ("seed=-1", "seed"),
    ("distill.eval_every=0", "distill.eval_every"),
    ("finetune.eval_every=0", "finetune.eval_every"),
    ("search.trial_cpus=-1", "search.trial_cpus"),
    ("ray.num_cpus=0", "ray.num_cpus"),
    ("pruning.lam=inf", "pruning.lam"),
    ("distill.lr=.inf", "distill.lr"),
    ("recovery.lr=nan", "recovery.lr"),
    ("recovery.temperature=0", "recovery.temperature"),
    ("distill.hard_label_weight=2", "distill.hard_label_weight"),
    ("ray.address=http://head:8265", "ray.address"),
    ("ray.address=nohost", "ray.address"),
    ("teacher.trust_remote_code=true", "teacher.trust_remote_code"),
    ("pruning.assistants=0", "pruning.assistants"),
    ("pruning.tradeoff=scaled", "pruning.tradeoff"),
])
def test_config_value_errors(capsys, tmp_path: Path, override: str, field: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    for command in ("validate", "run"):
        rc, err = _cli(capsys, command, DEFAULT, "--set", override, "--output", str(out))
        _one_line(rc, err, f"{field}:")
    assert not out.exists()


def test_trust_remote_code_needs_the_command_line_and_says_what_runs(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, _ = teacher
    (teacher_dir / "modeling_custom.py").write_text("print('hello')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {{model: {teacher_dir}, trust_remote_code: true}}\n")
    rc, err = _cli(capsys, "validate", str(cfg))
    _one_line(rc, err, "teacher.trust_remote_code", "--trust-remote-code")
    rc = main(["validate", str(cfg), "--trust-remote-code", "--set", f"task.data={tmp_path}"])
    err = capsys.readouterr().err
    assert "will run the Python files of" in err
    assert "modeling_custom.py (sha256 " in err


def test_unreachable_cluster_is_one_line_within_seconds(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "search", DEFAULT, "--set",
                           "ray.address=127.0.0.1:1", "--output", str(tmp_path / "o"), "--set",
                           "task.max_train_samples=50"], capture_output=True, text=True, timeout=300)
    _one_line(proc.returncode, proc.stderr, "ray.address", "nothing answers")
    assert time.perf_counter() - t0 < 120
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_resources_the_cluster_cannot_give_are_refused_before_work(tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    cfg = {"task": {"data": str(data), "text_column": "text", "max_length": 32},
           "teacher": {"model": str(teacher_dir), "finetune": "never"}, "ray": {"num_cpus": 1},
           "search": {"trial_gpus": 4}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "run", str(path), "--output",
                           str(tmp_path / "o"), "--set", "distill.cpus_per_worker=1"],
                          capture_output=True, text=True, timeout=300)
    _one_line(proc.returncode, proc.stderr, "search.trial_gpus", "0 GPUs")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- files that are not what they claim


def test_corrupt_or_truncated_model_files(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    weights = teacher_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data))
    _one_line(rc, err, "--model", "corrupt")
    record = teacher_dir / "minidisc.json"
    record.write_text(record.read_text()[:20])
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir))
    _one_line(rc, err, "--model", "minidisc.json is not valid JSON")


def test_pickled_weights_are_never_loaded(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    marker = tmp_path / "PWNED"
    (teacher_dir / "model.safetensors").unlink()
    with open(teacher_dir / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Planted(str(marker)), fh)
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data))
    _one_line(rc, err, "--model", "pickled weights are never loaded")
    (teacher_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"bert.pooler.dense.weight": "pytorch_model.bin"}}))
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data))
    _one_line(rc, err, "--model", "only safetensors")
    assert not marker.exists(), "the planted pickle ran"


def test_missing_model_directory_says_so(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, err = _cli(capsys, "eval", "--model", str(tmp_path / "nope"))
    _one_line(rc, err, "--model", "no such model directory")


# ---------------------------------------------------------------- data


def test_labels_that_mix_kinds_or_skip_ids(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, _ = teacher
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.tsv").write_text("text\tlabel\n" + "".join(f"good film {i}\t{i % 2}\n" for i in range(20)))
    (mixed / "dev.tsv").write_text("text\tlabel\n" + "".join(f"bad film {i}\tpos\n" for i in range(6)))
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(mixed))
    _one_line(rc, err, "task.label_column", "mix numbers and strings")
    gaps = write_csv(tmp_path / "gaps.csv", [(f"text {i}", str(0 if i % 2 else 7)) for i in range(30)])
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(gaps))
    _one_line(rc, err, "task.label_column", "[0, 7]", "0..K-1")


def test_undecodable_text_names_the_encoding_and_eval_takes_the_suggested_set(  # type: ignore[no-untyped-def]
        capsys, tmp_path: Path, teacher) -> None:
    teacher_dir, _ = teacher
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("text,label\n" + "".join(f"caf\xe9 cr\xe8me {i},{'pos' if i % 2 else 'neg'}\n"
                                                for i in range(30))).encode("latin-1"))
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(latin))
    line = _one_line(rc, err, "task.encoding", "--set task.encoding=latin-1")
    fix = re.search(r"--set (\S+)", line).group(1)  # type: ignore[union-attr]
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(latin), "--set", fix)
    assert rc == 0, err
    other = write_csv(tmp_path / "other.csv", sentiment_rows(20), header="body,label")
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(other))
    line = _one_line(rc, err, "task.text_column", "--set task.text_column=COLUMN")
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(other), "--set", "task.text_column=body")
    assert rc == 0, err


def test_max_length_beyond_the_model_is_refused_before_tokenising(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data), "--set", "task.max_length=100000")
    _one_line(rc, err, "task.max_length", "at most 128")


def test_prune_samples_and_compare_strategies(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, _ = teacher
    rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", "0.5", "--output",
                   str(tmp_path / "o"), "--samples", "0")
    _one_line(rc, err, "--samples")
    for spec in (",", "grid,grid", "grid,nope"):
        rc, err = _cli(capsys, "compare", DEFAULT, "--strategies", spec, "--output", str(tmp_path / "c"))
        _one_line(rc, err, "--strategies")
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "c").exists()
    for flag, value in (("--seeds", "0"), ("--candidates", "1")):
        rc, err = _cli(capsys, "study", DEFAULT, flag, value, "--output", str(tmp_path / "s"))
        _one_line(rc, err, flag)
    assert not (tmp_path / "s").exists()


def test_plain_http_token_warning() -> None:
    from minidisc_ray.jobs import warn_plain_http

    assert warn_plain_http("http://10.1.2.3:8265", "secret") is True
    assert warn_plain_http("https://head.example:8265", "secret") is False
    assert warn_plain_http("http://127.0.0.1:8265", "secret") is False
    assert warn_plain_http("http://10.1.2.3:8265", None) is False


def test_claiming_a_run_directory_removes_only_our_stale_temporaries(tmp_path: Path) -> None:
    from minidisc_ray.outputs import claim_run_dir

    run = tmp_path / "run"
    (run / ".student.tmp-ab12cd34").mkdir(parents=True)  # an interrupted save_model_dir of ours
    (run / ".report.json.tmp-x1y2z3w4").write_text("half")  # an interrupted atomic_write_text of ours
    (run / "search.json.tmp").write_text("half")  # what older versions left
    (run / "notes.tmp").write_text("mine")
    (run / ".cache.tmp-mine").mkdir()
    claim_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [".cache.tmp-mine", "minidisc-job.json", "minidisc-run.json",
                                                     "notes.tmp"]
