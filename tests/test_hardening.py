"""Hardening, round two: every class of fault the hostile-user review found, each with its test.

Code never runs from inputs or outputs (``package://`` imports nothing; records and checkpoints are
verified, see also ``test_checkpoint_trust.py``); outputs never replace inputs; ``plan`` materialises real
buffers; absurd inputs are refused in one line before anything is built or written.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidisc_ray.cli import main
from minidisc_ray.errors import UserInputError

from .conftest import REPO, _cli, _one_line, sentiment_rows, snapshot, tiny_bert, tiny_llama, write_csv

DEFAULT = str(REPO / "search_spaces" / "default.yaml")


# ---------------------------------------------------------------- package:// imports nothing, stays inside


def test_package_paths_import_nothing_and_stay_inside_the_package(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.data_paths import resolve_data_path

    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "trap"
    (pkg / "sub").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "sub" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (pkg / "sub" / "f.csv").write_text("text,label\na,0\n")
    (tmp_path / "secret.txt").write_text("private")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_data_path("package://trap.sub/f.csv") == pkg / "sub" / "f.csv"
    assert resolve_data_path("package://trap/sub/f.csv") == pkg / "sub" / "f.csv"
    assert not marker.exists(), "resolving a package file ran its code"
    assert "trap" not in sys.modules, "resolving a package file ran its code"
    for bad in ("package://trap/../../secret.txt", "package://trap//etc/passwd", "package://trap/",
                "package://../x/f.csv", "package://tr ap/f.csv"):
        with pytest.raises(UserInputError, match="task.data"):
            resolve_data_path(bad)
    (pkg / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UserInputError, match="leads out of package"):
        resolve_data_path("package://trap/link.txt")


def test_validate_on_a_dotted_package_imports_nothing(capsys, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "evil"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    rc, err = _cli(capsys, "validate", DEFAULT, "--set", "task.data=package://evil.x/f.csv")
    assert rc == 2
    assert "task.data" in err
    assert not marker.exists()


# ---------------------------------------------------------------- outputs never replace inputs


def test_prune_and_export_refuse_to_write_over_their_input(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    before = snapshot(teacher_dir)
    for target in (teacher_dir, teacher_dir / "inside", tmp_path):
        rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", "0.5", "--output", str(target),
                       "--samples", "8")
        _one_line(rc, err, "--output", "the input --teacher")
    rc, err = _cli(capsys, "export", str(teacher_dir), "--format", "hf", "--output", str(teacher_dir))
    _one_line(rc, err, "--output", "the input MODEL_DIR")
    assert snapshot(teacher_dir) == before, "the input model was not touched"


def test_plan_writes_only_a_new_file_or_its_own(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from .conftest import tiny_llama as _tl

    cfg = tmp_path / "config.json"
    _tl().config.to_json_file(cfg)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    rc, err = _cli(capsys, "plan", str(cfg), "--output", str(notes))
    _one_line(rc, err, "--output", "not a plan minidisc wrote")
    assert notes.read_text() == "mine"
    rc, err = _cli(capsys, "plan", str(cfg), "--output", str(cfg))
    _one_line(rc, err, "--output", "the input CONFIG")
    plan = tmp_path / "plan.json"
    for _ in range(2):  # a new file, then the plan it wrote itself
        rc, err = _cli(capsys, "plan", str(cfg), "--output", str(plan))
        assert rc == 0, err
    assert json.loads(plan.read_text())["written_by"] == "minidisc-plan"
    rc, err = _cli(capsys, "plan", str(cfg), "--output", str(notes / "under"))
    _one_line(rc, err, "--output", "is a file")


def test_tilde_means_home(capsys, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "config.json"
    tiny_llama().config.to_json_file(cfg)
    rc, err = _cli(capsys, "plan", str(cfg), "--output", "~/plan.json")
    assert rc == 0, err
    assert (tmp_path / "home" / "plan.json").is_file()
    assert not (tmp_path / "~").exists()


# ---------------------------------------------------------------- plan: real buffers, bounded architectures


def test_materialised_models_carry_the_real_buffers_and_forward_like_the_real_model() -> None:
    """``to_empty`` leaves buffers holding whatever memory held; ``materialise`` must give the model's own.
    Memory is dirtied first with a large allocation of 0x7f bytes, freed, so garbage would show."""
    from minidisc_ray.modelio.weights import empty_model
    from minidisc_ray.plan_shapes import materialise

    for real in (tiny_bert(), tiny_llama()):
        junk = torch.full((1 << 24,), 0x7F, dtype=torch.uint8)
        del junk
        meta = empty_model(real.config, kind="lm" if "CausalLM" in type(real).__name__ else "classification")
        copy = materialise(meta)
        want = dict(real.named_buffers())
        got = dict(copy.named_buffers())
        assert want.keys() == got.keys()
        assert want
        for name in want:
            assert torch.equal(want[name], got[name]), name
        copy.load_state_dict(real.state_dict())
        ids = torch.randint(5, 100, (2, 16))
        with torch.no_grad():
            assert torch.allclose(copy.eval()(input_ids=ids).logits, real.eval()(input_ids=ids).logits, atol=1e-6)


def _config_json(tmp_path: Path, name: str, **changes: object) -> Path:
    data = tiny_bert().config.to_dict()
    data.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("changes", "needle"), [
    ({"num_hidden_layers": 100_000}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_size": 30}, "not a multiple"),
    ({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
    ({"vocab_size": -5}, "vocab_size"),
])
def test_plan_refuses_absurd_or_foreign_architectures_in_one_line(capsys, tmp_path: Path, changes, needle) -> None:  # type: ignore[no-untyped-def]
    cfg = _config_json(tmp_path, "config.json", **changes)
    t0 = time.perf_counter()
    rc, err = _cli(capsys, "plan", str(cfg))
    _one_line(rc, err, "CONFIG", needle)
    assert time.perf_counter() - t0 < 5, "refused before building anything"


def test_plan_on_a_fake_gguf_and_eval_on_a_huge_model_dir_are_one_line(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(64))
    rc, err = _cli(capsys, "plan", str(fake))
    _one_line(rc, err, "CONFIG")
    teacher_dir, data = teacher
    cfg = json.loads((teacher_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_000
    (teacher_dir / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data))
    _one_line(rc, err, "--model", "num_hidden_layers")
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- YAML: alias bombs, duplicate sections


def test_yaml_alias_bomb_is_refused_quickly_and_in_bounded_memory(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("x-anchors:\n" + "\n".join("  " + ln for ln in levels) + "\ntask:\n  data: *a8\n")
    t0 = time.perf_counter()
    rc, err = _cli(capsys, "validate", str(bomb))
    line = _one_line(rc, err, "CONFIG", "expands to more than")
    assert time.perf_counter() - t0 < 5
    assert len(line) < 600


def test_duplicated_sections_and_keys_are_refused(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dup = tmp_path / "dup.yaml"
    dup.write_text("distill:\n  steps: 10\npruning:\n  lam: 0.2\ndistill:\n  lr: 0.001\n")
    rc, err = _cli(capsys, "validate", str(dup))
    _one_line(rc, err, "CONFIG", "'distill' is given twice (line 5)")
    dup.write_text("pruning:\n  lam: 0.2\n  lam: 0.3\n")
    rc, err = _cli(capsys, "validate", str(dup))
    _one_line(rc, err, "CONFIG", "'lam' is given twice")


def test_long_values_are_quoted_bounded() -> None:
    exc = UserInputError("task.data", ["x" * 10_000] * 10_000, "fix it")
    assert len(str(exc)) < 800


# ---------------------------------------------------------------- records are verified, never trusted blindly


def test_evaluation_records_edited_malformed_or_planted_are_ignored_with_one_warning(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.records import EvaluationStore

    store = EvaluationStore(tmp_path)
    good = {"sparsity": 0.5, "param_sparsity": 0.41, "metric": 0.5, "params": 1000, "prunable": 800,
            "seconds": 1.5, "cpu_seconds": 2.0}
    store.put("k1", good)
    assert store.get("k1") == good
    path = store.path("k1")
    record = json.loads(path.read_text())

    def planted(result: object, keep_mac: bool = True) -> dict[str, object] | None:
        path.write_text(json.dumps({**record, "result": result} if keep_mac else {"key": "k1", "result": result}))
        return store.get("k1")

    assert planted({**good, "metric": 0.999}) is None, "an edited metric is not believed"
    assert planted({**good, "seconds": "soon"}) is None
    assert planted({**good, "metric": float("nan")}) is None
    assert planted({**good, "metric": 0.999}, keep_mac=False) is None, "an unsigned record is not believed"
    assert planted({**good, "evil": "x"}) is None
    path.write_text("{not json")
    assert store.get("k1") is None
    err = capsys.readouterr().err
    assert err.count("minidisc: warning: ignoring") == 1, "one warning per record"
    store.put("k1", good)
    assert store.get("k1") == good
    # a halving rung's per-row correctness (stats.pack_rows): exactly its rows' bytes, hex
    from minidisc_ray.records import check_evaluation
    from minidisc_ray.stats import pack_rows

    rung = {"metric": 0.5, "sparsity": 0.5, "dev_correct": pack_rows([1, 0, 1, 1, 0, 0, 1, 0, 1])}
    store.put("k2", rung)
    assert store.get("k2") == rung
    for bad in ("9:ad", "9:ad80ff", "0:", "x:00", "9:AD80", 5, "9:ad8g"):
        assert check_evaluation({**rung, "dev_correct": bad}) is not None, bad


def test_study_records_written_before_the_assistant_rename_read_under_the_new_names(tmp_path: Path) -> None:
    from minidisc_ray.records import EvaluationStore

    store = EvaluationStore(tmp_path)
    old = {"kind": "path", "sparsity": 0.7, "metric": 0.6, "ta_metric": 0.7, "ta_steps": 80, "ta_cpu_seconds": 3.0,
           "ta_seconds": 2.0}
    store.put("k", old)  # signed as an earlier version wrote it
    got = store.get("k")
    assert got == {"kind": "path", "sparsity": 0.7, "metric": 0.6, "assistant_metric": 0.7, "assistant_steps": 80,
                   "assistant_cpu_seconds": 3.0, "assistant_seconds": 2.0}
    assert not any(k.startswith("ta_") for k in got)


def test_events_file_with_a_foreign_line_loses_nothing(tmp_path: Path) -> None:
    from minidisc_ray.chain.progress import StageProgress
    from minidisc_ray.records import read_jsonl

    events = tmp_path / "train_events.jsonl"
    lines = [json.dumps({"event": "start", "stage": "student", "run_id": "r"}), "garbage {",
             json.dumps({"event": "progress", "stage": "student", "run_id": "r", "step": "x", "time": 1, "loss": 1}),
             json.dumps({"event": "progress", "stage": "student", "run_id": "r", "step": 5, "time": 2.0, "loss": 0.5}),
             "[1, 2]"]
    events.write_text("\n".join(lines) + "\n")
    assert [e["event"] for e in read_jsonl(events)] == ["start", "progress", "progress"]
    progress = StageProgress(str(events), "student", "r", 10, "accuracy")
    printed = progress.poll()
    assert len(printed) == 1
    assert "5/10 steps" in printed[0]


def test_a_finished_stage_is_reused_only_when_its_signed_record_and_weights_match(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.modelio.load import save_model_dir
    from minidisc_ray.records import sign, tensor_fingerprint
    from minidisc_ray.stages import finished_stage, signed_part

    model = tiny_bert()
    record = {"role": "student", "sparsity": 0.9, "param_sparsity": 0.9, "params": {"prunable": 1, "total": 2},
              "metric": 0.7, "stage": {"key": "K", "seconds": 1.0, "steps_run": 3}}
    record["weights"] = tensor_fingerprint(model.state_dict())
    record["mac"] = sign(signed_part(record))
    out = tmp_path / "student"
    save_model_dir(model, tokenizer, out, record=record)
    assert finished_stage(out, "K") is not None
    edited = json.loads((out / "minidisc.json").read_text())
    edited["metric"] = 0.999
    (out / "minidisc.json").write_text(json.dumps(edited))
    assert finished_stage(out, "K") is None, "an edited metric is not reused"
    save_model_dir(tiny_bert(seed=3), tokenizer, out, record=record)  # other weights under the signed record
    assert finished_stage(out, "K") is None, "weights that are not the record's are not reused"


# ---------------------------------------------------------------- data: labels, cache by content, cache root


def test_non_finite_labels_are_refused_or_reported(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``inf`` is refused; ``nan`` (which the CSV reader reads as a missing value) is left out and said so."""
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task

    rows = [(f"text {i}", str(float(i % 2))) for i in range(40)]
    rows[7] = ("bad row", "inf")
    data = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserInputError, match="not finite"):
        load_task(TaskConfig(data=str(data), regression=True), 0)
    rows[7] = ("bad row", "nan")
    write_csv(data, rows)
    task = load_task(TaskConfig(data=str(data), regression=True), 0)
    assert len(task.train) + len(task.dev) == 39
    assert "1 train and 0 dev rows have no 'label' label" in capsys.readouterr().err or \
        "0 train and 1 dev rows have no 'label' label" in capsys.readouterr().err


def test_list_labels_are_refused(tmp_path: Path) -> None:
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"t {i}", "label": [i % 2]}) for i in range(30)) + "\n")
    with pytest.raises(UserInputError, match="list label|numbers and strings|label"):
        load_task(TaskConfig(data=str(data)), 0)


def test_rows_without_a_label_are_reported(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task

    rows = sentiment_rows(40)
    rows[3] = ("no label here", "")
    load_task(TaskConfig(data=str(write_csv(tmp_path / "d.csv", rows))), 0)
    assert "have no 'label' label" in capsys.readouterr().err


def test_tokenised_cache_is_keyed_by_content_not_size_and_mtime(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task, tokenize_task

    path = write_csv(tmp_path / "d.csv", sentiment_rows(40))
    cfg = TaskConfig(data=str(path), max_length=16)
    train1, _, cached = tokenize_task(load_task(cfg, 0), tokenizer, 16)
    assert not cached
    st = path.stat()
    text = path.read_text()
    flipped = text.replace(",pos\n", ",tmp\n").replace(",neg\n", ",pos\n").replace(",tmp\n", ",neg\n")
    assert len(flipped) == len(text)
    assert flipped != text
    path.write_text(flipped)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime, other labels
    train2, _, cached = tokenize_task(load_task(cfg, 0), tokenizer, 16)
    assert not cached, "edited labels were served from the cache"
    assert [int(x) for x in train1["labels"]] != [int(x) for x in train2["labels"]]


def test_cache_root_that_is_a_file_is_one_line(capsys, tmp_path: Path, teacher, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    afile = tmp_path / "cachefile"
    afile.write_text("x")
    monkeypatch.setenv("MINIDISC_CACHE", str(afile))
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir), "--data", str(data))
    _one_line(rc, err, "MINIDISC_CACHE", "is a file")


# ---------------------------------------------------------------- one line instead of a traceback


def test_argparse_errors_are_one_line_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["prune", "--sparsity", "x"], ["nonsense"], ["plan"], ["export", "d", "--format", "zip"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("minidisc: error:"), err


def test_small_faults_are_one_line(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    teacher_dir, data = teacher
    rc, err = _cli(capsys, "prune", "--teacher", str(teacher_dir), "--sparsity", "0.5", "--output",
                   str(tmp_path / "p"), "--seed", "-1")
    _one_line(rc, err, "--seed")
    record = json.loads((teacher_dir / "minidisc.json").read_text())
    record["task"] = "sst2"
    (teacher_dir / "minidisc.json").write_text(json.dumps(record))
    rc, err = _cli(capsys, "eval", "--model", str(teacher_dir))
    _one_line(rc, err, "--model", "'task' must be a JSON object")
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe\x00bad")
    rc, err = _cli(capsys, "jobs", "status", "raysubmit_x", "--token-file", str(token))
    _one_line(rc, err, "--token-file", "not UTF-8")


def test_bad_optuna_storage_is_refused_before_the_output_is_claimed(capsys, tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.search.driver import check_optuna_storage

    for url, needle in (("sqlite:////no/such/dir/x.db", "not a directory you can write"),
                        ("notaurl", "not a database URL"), ("sqlite://", "in-memory"),
                        ("postgresql://u@127.0.0.1:1/db", "cannot be reached")):
        with pytest.raises(UserInputError, match=needle):
            check_optuna_storage(url)
    assert not Path("/no/such/dir").exists()
    teacher_dir, data = teacher
    out = tmp_path / "run"
    rc, err = _cli(capsys, "search", DEFAULT, "--output", str(out), "--strategy", "optuna",
                   "--set", f"teacher.model={teacher_dir}", "--set", f"task.data={data}",
                   "--set", "search.optuna_storage=sqlite:////no/such/dir/x.db")
    _one_line(rc, err, "search.optuna_storage")
    assert not out.exists(), "nothing was written"


def test_a_write_that_fails_for_lack_of_space_is_one_line_and_leaves_nothing(tmp_path: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    """A file-size limit (RLIMIT_FSIZE) makes the weights' write fail as a full disk would."""
    teacher_dir, _ = teacher
    out = tmp_path / "pruned"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "prune", "--teacher", str(teacher_dir),
                           "--sparsity", "0.5", "--output", str(out), "--samples", "8"], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120, env={**os.environ, "MINIDISC_CACHE": str(tmp_path / "c")})
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("minidisc: error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]


def test_failed_trial_line_names_the_candidate() -> None:
    from minidisc_ray.ray_env import trial_failure_line

    class Trial:
        config = {"sparsity": 0.7}
        error_file = "/tmp/x/error.txt"
        trial_id = "abc"

    line = trial_failure_line(Trial(), retried=True)
    assert "s=0.7" in line
    assert "Tune retries it" in line
    assert "\n" not in line


def test_a_sharded_teacher_is_read_from_its_files_and_what_needs_it_whole_is_refused_in_one_line(
        tmp_path: Path, tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``teacher.placement: sharded``: the driver builds the teacher on the meta device from its files (names and
    shapes checked from the safetensors headers), so a backbone without a trained head cannot be fine-tuned here
    (one line, nothing written); a GGUF file cannot be read shard by shard (one line). The files' fingerprint is
    kept beside their sizes and times and reused until one of them changes."""
    from transformers import BertModel

    from minidisc_ray.config import config_from_dict
    from minidisc_ray.modelio.fingerprint import files_fingerprint
    from minidisc_ray.modelio.load import save_model_dir
    from minidisc_ray.modelio.sharded import load_model_meta
    from minidisc_ray.pipeline import prepare

    data = write_csv(tmp_path / "d.csv", sentiment_rows(40))
    headless = tmp_path / "backbone"
    BertModel(tiny_bert().config).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    model, _, _, head_missing = load_model_meta(str(headless), 2)
    assert head_missing
    assert all(p.is_meta for p in model.parameters())
    out = tmp_path / "out"
    raw = {"output_dir": str(out), "task": {"data": str(data)},
           "teacher": {"model": str(headless), "finetune": "auto", "placement": "sharded"}}
    with pytest.raises(UserInputError, match="teacher.finetune.*not fine-tuned by minidisc-ray"):
        prepare(config_from_dict(raw), out)
    assert not out.exists() or not any(out.iterdir())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserInputError, match="cannot be read shard by shard"):
        load_model_meta(str(gguf), 2)

    from minidisc_ray.modelio import fingerprint

    teacher = save_model_dir(tiny_bert(), tokenizer, tmp_path / "teacher")
    cache = tmp_path / "fp.json"
    first = files_fingerprint(teacher, cache)
    assert files_fingerprint(teacher) == first
    assert json.loads(cache.read_text())["sha256"] == first
    real_sha = fingerprint.file_sha256

    def unread(path: object) -> str:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(fingerprint, "file_sha256", unread)
    assert files_fingerprint(teacher, cache) == first  # unchanged files: the kept digest, nothing read
    weights = next(teacher.glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # a file touched: read again
    with pytest.raises(AssertionError, match="read again"):
        files_fingerprint(teacher, cache)
    monkeypatch.setattr(fingerprint, "file_sha256", real_sha)
    assert files_fingerprint(teacher, cache) == first
    kept = json.loads(cache.read_text())
    cache.write_text(json.dumps({**kept, "sha256": "planted"}))  # an edited cache is not believed
    assert files_fingerprint(teacher, cache) == first
    assert json.loads(cache.read_text())["sha256"] == first
    other = save_model_dir(tiny_bert(seed=1), tokenizer, tmp_path / "other")
    assert files_fingerprint(other) != first
