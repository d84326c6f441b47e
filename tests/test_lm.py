"""Language modelling with decoder teachers: data blocks, perplexity score, KD loss, candidates, the chain."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from minidisc_ray.config import RecoveryConfig, config_from_dict
from minidisc_ray.data import load_task, make_loader, tokenize_task
from minidisc_ray.engine import evaluate
from minidisc_ray.losses import minidisc_loss
from minidisc_ray.metrics import lm_metrics, lm_score, perplexity_of_score

from .conftest import make_tokenizer, synthetic_sentence, tiny_llama


def write_text(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(synthetic_sentence(rng, rng.random() < 0.5) for _ in range(n)) + "\n")
    return path


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from minidisc_ray.modelio.load import save_model_dir

    root = tmp_path_factory.mktemp("lm")
    tok = make_tokenizer(root / "tok")
    return save_model_dir(tiny_llama(seed=3, tied=True), tok, root / "teacher", record={"role": "teacher"})


def lm_config(teacher: Path, data: Path, out: Path, **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "seed": 1, "output_dir": str(out),
        "task": {"type": "lm", "data": str(data), "max_length": 32, "max_dev_samples": 60},
        "teacher": {"model": str(teacher), "finetune": "never"},
        "pruning": {"grid": [0.3, 0.6], "importance": "activation", "importance_samples": 32,
                    "student_sparsity": 0.8},
        "recovery": {"steps": 3, "batch_size": 8},
        "distill": {"steps": 6, "batch_size": 8, "eval_every": 3},
    }
    cfg.update(extra)
    return cfg


def test_lm_score_is_higher_for_lower_perplexity() -> None:
    v = 49152
    assert lm_score(1.0, v) == 1.0
    assert abs(lm_score(float(v), v)) < 1e-12  # the uniform guess scores 0
    assert lm_score(2.0 * v, v) < 0  # worse than uniform
    assert lm_score(20.0, v) > lm_score(40.0, v)
    assert abs((lm_score(20.0, v) - lm_score(40.0, v)) - math.log(2) / math.log(v)) < 1e-12
    assert math.isnan(lm_score(math.nan, v))
    m = lm_metrics(nll_sum=2.0 * 50, tokens=50, vocab_size=v)
    assert abs(m["perplexity"] - math.exp(2.0)) < 1e-9
    assert m["metric"] == m["lm_score"]
    assert abs(perplexity_of_score(m["lm_score"], v) - m["perplexity"]) < 1e-6 * m["perplexity"]


def test_text_is_packed_into_blocks_whose_labels_are_the_inputs(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_dict({"task": {"type": "lm", "data": str(write_text(tmp_path / "t.txt")), "max_length": 16}})
    task = load_task(cfg.task)
    assert task.is_lm
    assert task.metric == "lm_score"
    assert task.text_columns == ("text",)
    train, dev, _ = tokenize_task(task, tokenizer, 16)
    assert len(train) > 0
    assert len(dev) > 0
    batch = next(iter(make_loader(train, tokenizer, 4)))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int(batch["attention_mask"].sum()) == 64
    first = tokenizer(task.train[0]["text"], add_special_tokens=False)["input_ids"]
    assert train[0]["input_ids"].tolist()[:len(first)] == first[:16]
    assert tokenizer.sep_token_id in train[0]["input_ids"].tolist() + train[1]["input_ids"].tolist()


def test_lm_evaluation_matches_the_models_own_loss(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_dict({"task": {"type": "lm", "data": str(write_text(tmp_path / "t.txt")), "max_length": 16}})
    _, dev, _ = tokenize_task(load_task(cfg.task), tokenizer, 16)
    model = tiny_llama()
    loader = make_loader(dev, tokenizer, 8)
    got = evaluate(model, loader, "lm_score")
    total, count = 0.0, 0
    with torch.no_grad():
        for b in loader:
            n = int(b["labels"][:, 1:].numel())
            total += float(model(**b).loss) * n
            count += n
    assert abs(got["nll"] - total / count) < 1e-5
    assert abs(got["metric"] - lm_score(math.exp(total / count), 128)) < 1e-5


def test_lm_distillation_loss_is_zero_against_itself_and_hard_labels_are_next_tokens() -> None:
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    zero = minidisc_loss(out.logits, out.logits, out.hidden_states, out.hidden_states, mask)
    assert float(zero) < 1e-6
    hard = minidisc_loss(out.logits, out.logits, out.hidden_states, out.hidden_states, mask, labels=ids,
                         hard_label_weight=1.0)
    assert abs(float(hard) - float(out.loss)) < 1e-5


def test_decoder_candidates_are_scored_by_perplexity_without_ray(tmp_path: Path, lm_teacher: Path) -> None:
    from minidisc_ray.candidates import SearchPayload, score_candidate
    from minidisc_ray.families import get_adaptor
    from minidisc_ray.modelio.blobs import model_blob
    from minidisc_ray.pipeline import importance_of, prepare

    cfg = config_from_dict(lm_config(lm_teacher, write_text(tmp_path / "t.txt"), tmp_path / "run"))
    prep = prepare(cfg, tmp_path / "run")
    assert type(prep.teacher).__name__ == "LlamaForCausalLM"
    assert prep.task.is_lm
    # a random teacher is about as good as a uniform guess: score near 0
    assert abs(prep.teacher_metrics["metric"]) < 0.2
    assert prep.teacher_metrics["perplexity"] > 1.0
    imp = importance_of(prep)
    adaptor = get_adaptor(prep.teacher)
    layers = adaptor.layers(prep.teacher)
    units = (sum(adaptor.num_heads(x) for x in layers), sum(adaptor.num_neurons(x) for x in layers))
    assert units == (6, 192)  # 3 layers x 2 KV groups, 3 x 64 neurons
    payload = SearchPayload(model_blob(prep.teacher), prep.tokenizer, imp, prep.train.with_format(None).data.table,
                            prep.dev.with_format(None).data.table, prep.task.metric, False, prep.prunable, units, 0.2,
                            RecoveryConfig(steps=3, batch_size=8), 0.8, seed=1, importance_method="activation")
    one = score_candidate(payload, 0.5)
    assert one["metric"] < prep.teacher_metrics["metric"] + 0.05
    assert abs(one["tradeoff"] - (one["metric"] + 0.2 * one["param_sparsity"])) < 1e-12
    ex = score_candidate(payload, 0.5, exhaustive=True)
    assert ex["student_params"] < one["params"]
    assert math.isfinite(ex["student_metric"])


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_llama_run_end_to_end_with_fsdp_chain(ray_session, tmp_path: Path, lm_teacher: Path) -> None:  # type: ignore[no-untyped-def]
    """`minidisc run` on a decoder: search on Ray Tune, FSDP2 chain on two Ray Train workers, exports."""

    from minidisc_ray.modelio.load import load_model_dir
    from minidisc_ray.run import run_job

    data = write_text(tmp_path / "t.txt")
    raw = lm_config(lm_teacher, data, tmp_path / "run", ray={"num_cpus": 2}, distill={
        "steps": 6, "batch_size": 8, "eval_every": 3, "num_workers": 2, "parallelism": "fsdp",
        "activation_checkpointing": True, "baseline_direct_kd": False}, tracking={"mlflow": True})
    raw["teacher"] = {**raw["teacher"], "placement": "offline", "top_k": 16}  # type: ignore[dict-item]
    raw["search"] = {"strategy": "auto"}  # offline: its halving round (online arms) is skipped, in one log line
    cfg = config_from_dict(raw)
    report = run_job(cfg, tmp_path / "run", command="test")
    search = json.loads((tmp_path / "run" / "search.json").read_text())
    assert search["strategy"] == "auto"
    assert search["halving_skipped"] == "teacher.placement: offline"
    assert search["lambda_pick"] == search["chosen_sparsity"]
    assert "halving" not in search
    # teacher.placement: offline: one Ray Data pass per teacher. The search's candidates recovered on the
    # teacher's targets; the first link reads the same files (same teacher, data, k and temperature); the
    # assistant that teaches the student gets a pass of its own, read by the stage on both FSDP workers
    import json as _json

    passes = [_json.loads(x) for x in (tmp_path / "run" / "train_events.jsonl").read_text().splitlines()
              if '"offline_targets"' in x]
    assert [p["written"] for p in passes] == [False, True]
    assert len({p["directory"] for p in passes}) == 2
    assert len(list((tmp_path / "run" / "offline_targets").iterdir())) == 2
    assert report["metric_name"] == "lm_score"
    assert report["teacher"]["params"] > report["assistant"]["params"] > report["student"]["params"]
    assert report["assistant"]["sparsity"] in (0.3, 0.6)
    assert report["student"]["sparsity"] == 0.8
    assert report["distill"]["teacher_to_assistant"]["steps_run"] == 6
    model, tok, record, _ = load_model_dir(str(tmp_path / "run" / "student"), kind="lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert record["task"]["config"]["type"] == "lm"
    _, dev, _ = tokenize_task(load_task(cfg.task, cfg.seed), tok, 32)
    again = evaluate(model, make_loader(dev, tok, 64), "lm_score")
    # the dev rows were kept back from every choice: the exported student reproduces its held-out score on them
    assert again["metric"] == report["student"]["held_out_metric"], "the exported student reproduces its score"
    assert report["student"]["perplexity"] > 1.0

    # MLflow read-back: the job run, one run per search trial, one per chain stage, report and student files
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("minidisc-ray")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`minidisc.run_id` = '{report['run_id']}'")
    kinds = [r.data.tags["minidisc.kind"] for r in runs]
    assert kinds.count("job") == 1
    assert kinds.count("chain-stage") == 2
    assert kinds.count("search-trial/bisection") == report["search"]["evaluations"]
    job = next(r for r in runs if r.data.tags["minidisc.kind"] == "job")
    assert job.data.params["task.type"] == "lm"
    assert job.data.params["distill.parallelism"] == "fsdp"
    assert abs(job.data.metrics["student.metric"] - report["student"]["metric"]) < 1e-9
    stage = next(r for r in runs if r.data.tags.get("minidisc.stage") == "teacher_to_assistant")
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "metric")] == [3, 6]
    files = {f.path for f in client.list_artifacts(job.info.run_id)}
    assert {"report.json", "report.md", "student", "config.json"} <= files
    assert "student/model.safetensors" in {f.path for f in client.list_artifacts(job.info.run_id, "student")}


@pytest.mark.ray
def test_offline_targets_are_the_teachers_top_k_written_once_and_give_the_online_logit_loss(  # type: ignore[no-untyped-def]
        ray_session, tmp_path: Path, lm_teacher: Path) -> None:
    """The Ray Data pass stores exactly the teacher's top-k (indices, logits, log-sum-exp) per row and position;
    a second call (the next stage, or a rerun) reuses the files; at k = the vocabulary the offline training
    loss equals the online loss's logit half on the same batch."""
    from minidisc_ray.losses import logit_loss, teacher_top_k
    from minidisc_ray.modelio.blobs import model_blob
    from minidisc_ray.offline import ROW_ID, OfflineTargets, ensure_targets, offline_kd_loss_fn, with_row_ids
    from minidisc_ray.pipeline import prepare
    from minidisc_ray.records import tensor_fingerprint

    cfg = config_from_dict(lm_config(lm_teacher, write_text(tmp_path / "t.txt"), tmp_path / "run"))
    prep = prepare(cfg, tmp_path / "run")
    teacher, vocab = prep.teacher, prep.teacher.config.vocab_size
    table = prep.train.with_format(None).data.table
    fp = tensor_fingerprint(teacher.state_dict())
    args = (tmp_path / "run", model_blob(teacher), fp, table, prep.data_key, prep.tokenizer, vocab, 2.0)
    first, written = ensure_targets(*args, replicas=2, batch_size=16)
    again, written_again = ensure_targets(*args, replicas=2, batch_size=16)
    assert written
    assert not written_again
    assert first == again
    assert not list(first.parent.glob(".*tmp-*")), "no half-written pass is left"
    from minidisc_ray.errors import UserInputError
    from minidisc_ray.offline import targets_key

    planted = first.parent / targets_key(fp, prep.data_key, 8, 2.0)  # a directory minidisc did not write
    planted.mkdir()
    (planted / "mine.txt").write_text("keep")
    with pytest.raises(UserInputError, match="no manifest.json"):
        ensure_targets(tmp_path / "run", model_blob(teacher), fp, table, prep.data_key, prep.tokenizer, 8, 2.0)
    assert (planted / "mine.txt").read_text() == "keep"
    assert not list(first.parent.glob(".*tmp-*"))
    targets = OfflineTargets.load(first)
    assert targets.indices.shape == (table.num_rows, 32, vocab)
    assert targets.temperature == 2.0

    rows = with_row_ids(table).slice(5, 4)
    batch = {k: torch.tensor(rows.column(k).to_pylist()) for k in ("input_ids", "attention_mask", "labels", ROW_ID)}
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    idx, val, lse = teacher_top_k(logits, vocab, 2.0)
    stored = targets.batch(batch[ROW_ID], torch.device("cpu"))
    assert torch.equal(stored[0], idx)
    assert torch.allclose(stored[1], val, atol=1e-5)
    assert torch.allclose(stored[2], lse, atol=1e-5)
    student = tiny_llama(seed=9, tied=True)
    offline = offline_kd_loss_fn(targets)(student, batch)
    online = 0.5 * logit_loss(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              logits, 2.0, mask=batch["attention_mask"])
    assert torch.allclose(offline, online, atol=1e-5), (float(offline), float(online))
