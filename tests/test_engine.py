"""The one training loop and the Ray-free candidate scoring, called directly (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from minidisc_ray.candidates import sandwich_scores, score_candidate
from minidisc_ray.config import TaskConfig
from minidisc_ray.data import infinite, load_task, make_loader, tokenize_task
from minidisc_ray.engine import Loop, LoopSpec, LoopState, evaluate, task_loss
from minidisc_ray.families import count_params
from minidisc_ray.modelio.blobs import model_blob, model_from_blob
from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
from minidisc_ray.training import kd_loss_fn

from .conftest import tiny_bert, tiny_search_payload


@pytest.fixture(scope="module")
def task(sst2_dir: Path, tokenizer):  # type: ignore[no-untyped-def]
    data = load_task(TaskConfig(data=str(sst2_dir), max_train_samples=120, max_dev_samples=40), seed=0)
    train, dev, _ = tokenize_task(data, tokenizer, 32, use_cache=False)
    return data, train, dev


def _stream(train, tokenizer, seed: int = 0):  # type: ignore[no-untyped-def]
    return infinite(make_loader(train, tokenizer, 8, shuffle=True, seed=seed))


def test_same_seed_same_weights_and_grad_accumulation_equals_the_big_batch(task, tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, train, _ = task

    def trained(accum: int, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = tiny_bert()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        model = type(model)(model.config)  # no dropout: micro-batches and the big batch see the same net
        torch.manual_seed(seed)
        stream = infinite(make_loader(train, tokenizer, batch, shuffle=False))
        Loop(model, LoopSpec(steps=3, lr=1e-3, grad_accum=accum), task_loss).run(stream)
        return model.state_dict()

    a, b = trained(1, 8), trained(1, 8)
    assert all(torch.equal(a[k], b[k]) for k in a), "deterministic under a seed"
    big, small = trained(1, 16), trained(2, 8)
    worst = max(float((big[k] - small[k]).abs().max()) for k in big)
    assert worst < 1e-5, f"2 x 8 accumulated differs from 16 by {worst}"


def test_evaluation_early_stop_best_weights_and_resume_state(task, tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, train, dev = task
    model = tiny_bert()
    dev_loader = make_loader(dev, tokenizer, 16)
    calls = []
    spec = LoopSpec(steps=50, lr=0.0, eval_every=2, patience=2, keep_best=True)  # lr 0: the metric never improves
    loop = Loop(model, spec, task_loss, evaluate_fn=lambda m: evaluate(m, dev_loader, "accuracy"))
    state = loop.run(_stream(train, tokenizer), on_eval=lambda lp, e: calls.append(e["step"]))
    assert calls == [2, 4, 6]
    assert state.stopped
    assert state.step == 6
    assert state.best_step == 2
    assert loop.best_state is not None
    assert set(loop.best_state) == set(model.state_dict())
    again = LoopState.from_dict(state.to_dict())
    assert again == state


def test_every_tensor_goes_to_the_models_device(task, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A model on the meta device: the first forward must already see meta inputs, or a batch was left
    on the CPU. Evaluation, a training step and the importance pass are checked."""
    _, train, dev = task

    class Reached(Exception):
        pass

    def check(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
        devices = {v.device.type for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)}
        raise Reached(devices)

    model = tiny_bert().to("meta")
    model.register_forward_pre_hook(check, with_kwargs=True)
    with pytest.raises(Reached) as seen:
        evaluate(model, make_loader(dev, tokenizer, 8), "accuracy")
    assert seen.value.args[0] == {"meta"}
    with pytest.raises(Reached) as seen:
        Loop(model, LoopSpec(steps=1, lr=1e-3), task_loss).run(_stream(train, tokenizer))
    assert seen.value.args[0] == {"meta"}
    with pytest.raises(Reached) as seen:
        compute_importance(model, make_loader(train.select(range(8)), tokenizer, 8))
    assert seen.value.args[0] == {"meta"}


def test_blob_round_trip_shares_teacher_weights_and_pruning_copies_nothing_of_it() -> None:
    teacher = tiny_bert(seed=3)
    blob = model_blob(teacher)
    frozen = model_from_blob(blob, trainable=False)
    ptrs = {p.data_ptr() for p in frozen.parameters()}
    assert ptrs <= {a.__array_interface__["data"][0] for a, _ in blob["state"].values()}, "shared, not copied"
    assert not any(p.requires_grad for p in frozen.parameters())
    batch = {"input_ids": torch.randint(5, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    assert torch.equal(frozen(**batch).logits, teacher(**batch).logits)
    trainable = model_from_blob(blob, trainable=True)
    assert not {p.data_ptr() for p in trainable.parameters()} & ptrs
    imp = compute_importance(teacher, [{**batch, "labels": torch.tensor([0, 1])}])
    before = copy.deepcopy(teacher.state_dict())
    cand = prune_model(teacher, plan_for_sparsity(imp, 0.5))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "the teacher is untouched"
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not {p.data_ptr() for p in cand.parameters()} & teacher_ptrs, "the candidate owns its weights"
    assert count_params(cand)[0] < count_params(teacher)[0]


def test_candidate_scoring_and_sandwich_without_ray(task, tokenizer) -> None:  # type: ignore[no-untyped-def]
    data, train, dev = task
    payload = tiny_search_payload(train, dev, tokenizer)
    one = score_candidate(payload, 0.5)
    again = score_candidate(payload, 0.5)
    assert one["metric"] == again["metric"]
    assert one["recovery_loss"] == again["recovery_loss"]
    assert abs(one["tradeoff"] - (one["metric"] + 0.2 * one["param_sparsity"])) < 1e-12
    assert 0.4 < one["param_sparsity"] < 0.6
    ex = score_candidate(payload, 0.5, exhaustive=True)
    assert ex["metric"] == one["metric"], "the exhaustive trial's candidate half is the candidate evaluation"
    assert 0.0 <= ex["student_metric"] <= 1.0
    assert ex["student_params"] < one["params"]
    sw = sandwich_scores(payload, [0.5, 0.7, 0.9])
    assert [c["sparsity"] for c in sw["candidates"]] == [0.5, 0.7, 0.9]
    assert sw["best"] == max(sw["candidates"], key=lambda c: (c["tradeoff"], c["sparsity"]))
    assert [c["params"] for c in sw["candidates"]] == sorted((c["params"] for c in sw["candidates"]), reverse=True)
    assert data.num_labels == 2


def test_kd_loss_fn_trains_the_student_towards_the_teacher(task, tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, train, _ = task
    teacher = tiny_bert(seed=5)
    student = prune_model(teacher, plan_for_sparsity(
        compute_importance(teacher, make_loader(train.select(range(16)), tokenizer, 8)), 0.5))
    loop = Loop(student, LoopSpec(steps=30, lr=1e-3, warmup_ratio=0.0), kd_loss_fn(teacher))
    losses: list[float] = []
    loop.run(_stream(train, tokenizer), on_step=lambda lp, loss: losses.append(loss))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_stage_progress_reads_worker_events_and_prints_eta(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    from minidisc_ray.chain.progress import StageProgress

    events = tmp_path / "events.jsonl"
    events.write_text(_json.dumps({"event": "start", "stage": "student", "run_id": "r", "time": 0.0}) + "\n")
    progress = StageProgress(str(events), "student", "r", steps=100, metric="accuracy", every_s=0.0)
    progress.offset = 0
    lines = [{"event": "progress", "stage": "student", "run_id": "r", "time": 10.0, "step": 10, "loss": 2.0},
             {"event": "progress", "stage": "other", "run_id": "r", "time": 11.0, "step": 3, "loss": 9.0},
             {"event": "eval", "stage": "student", "run_id": "r", "time": 30.0, "step": 30, "loss": 1.5,
              "metric": 0.8125},
             {"event": "progress", "stage": "student", "run_id": "old", "time": 31.0, "step": 31, "loss": 1.0}]
    with open(events, "a") as fh:
        fh.write("".join(_json.dumps(e) + "\n" for e in lines) + '{"event": "progress", "stage": "stu')
    printed = progress.poll()
    assert printed[0] == "[distill student] 10/100 steps, loss 2.0000, ETA -"
    assert printed[1] == "[distill student] 30/100 steps, loss 1.5000 dev accuracy 0.8125, 1.00 s/step, ETA 1m10s"
    assert len(printed) == 2, "other stages, other runs and a half-written line are not shown"
    assert progress.poll() == []
    assert "ETA 1m10s" in capsys.readouterr().err
