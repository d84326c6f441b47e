from __future__ import annotations

import copy

import pytest
import torch

from minidisc_ray.families import EmptySelfAttention, count_params
from minidisc_ray.modelio.load import load_model_dir, save_model_dir, weights_equal
from minidisc_ray.pruning import (
    Importance,
    PruningPlan,
    compute_importance,
    masked,
    plan_for_sparsity,
    prune_model,
    sliced,
)

from .conftest import _outputs, batch_with_padding, tiny_bert, tiny_roberta


def _importance(model: torch.nn.Module, seed: int = 3) -> Importance:
    batches = [batch_with_padding(seed=seed + i) for i in range(3)]
    return compute_importance(model, batches)


@pytest.mark.parametrize("s", [0.1, 0.3, 0.5, 0.7, 0.9, 0.95])
def test_pruning_removes_s_of_prunable_params(s: float) -> None:
    # hidden 64: LayerNorms and output biases (never pruned) are 0.8% of the encoder, 0.13% in MiniLM
    teacher = tiny_bert(layers=4, heads=8, hidden=64, ffn=256)
    plan = plan_for_sparsity(_importance(teacher), s)
    pruned = prune_model(teacher, plan)
    before, total_before = count_params(teacher)
    after, total_after = count_params(pruned)
    assert abs((1 - after / before) - s) <= 0.02
    assert total_before - total_after == before - after  # only encoder layers shrink
    assert sum(plan.heads_per_layer) == 32 - round(s * 32)
    assert sum(plan.neurons_per_layer) == 1024 - round(s * 1024)


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.7, 0.95])
def test_pruned_equals_masked_teacher(make, s: float) -> None:  # type: ignore[no-untyped-def]
    teacher = make()
    snapshot = copy.deepcopy(teacher)
    plan = plan_for_sparsity(_importance(teacher), s)
    pruned = prune_model(teacher, plan)
    batch = batch_with_padding()
    handles = masked(teacher, plan)
    try:
        reference = _outputs(teacher, batch)
    finally:
        for h in handles:
            h.remove()
    for got, want in zip(_outputs(pruned, batch), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert weights_equal(teacher, snapshot), "the teacher must never change in place"


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95])
def test_sliced_forward_equals_the_pruned_prefix_and_trains_the_shared_weights(make, s: float) -> None:  # type: ignore[no-untyped-def]
    teacher = make()
    imp = _importance(teacher)
    shared = prune_model(teacher, plan_for_sparsity(imp, 0.0))  # reordered: every candidate is a prefix
    plan = plan_for_sparsity(imp, s)
    prefix = PruningPlan.prefix(plan.heads_per_layer, plan.neurons_per_layer, s)
    reference = _outputs(prune_model(shared, prefix), batch_with_padding())
    modules_before = [type(m) for m in shared.modules()]
    with sliced(shared, plan.heads_per_layer, plan.neurons_per_layer):
        got = _outputs(shared, batch_with_padding())
        out = shared(**batch_with_padding())
        out.loss.backward()
    for g, want in zip(got, reference, strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    assert [type(m) for m in shared.modules()] == modules_before, "the full-width modules come back"
    adaptor_layers = shared.base_model.encoder.layer
    for layer, h, n in zip(adaptor_layers, plan.heads_per_layer, plan.neurons_per_layer, strict=True):
        rows = h * (teacher.config.hidden_size // teacher.config.num_attention_heads)
        q, fc = layer.attention.self.query.weight.grad, layer.intermediate.dense.weight.grad
        if rows:
            assert q is not None
            assert q[:rows].abs().sum() > 0
        assert q is None or q[rows:].abs().sum() == 0  # units outside the prefix get no gradient
        if n:
            assert fc is not None
            assert fc[:n].abs().sum() > 0
        assert fc is None or fc[n:].abs().sum() == 0


def test_layer_that_loses_every_head_and_neuron_keeps_its_residual_path() -> None:
    teacher = tiny_bert(layers=2, heads=4, ffn=8)
    # layer 0 is least important in every unit, so s = 0.5 empties it completely
    imp = Importance(heads=[[0.1, 0.1, 0.1, 0.1], [0.9, 0.8, 0.7, 0.6]],
                     neurons=[[0.01] * 8, [0.5 + i / 100 for i in range(8)]])
    plan = plan_for_sparsity(imp, 0.5)
    assert plan.heads_per_layer == [0, 4]
    assert plan.neurons_per_layer == [0, 8]
    pruned = prune_model(teacher, plan)
    layer0 = pruned.bert.encoder.layer[0]
    assert isinstance(layer0.attention.self, EmptySelfAttention)
    assert layer0.intermediate.dense.out_features == 0
    batch = batch_with_padding()
    handles = masked(teacher, plan)
    reference = _outputs(teacher, batch)
    for h in handles:
        h.remove()
    for got, want in zip(_outputs(pruned, batch), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the emptied layer is not the identity: LayerNorm(bias + residual) still runs
    assert not torch.allclose(reference[1], reference[2])
    with sliced(teacher, plan.heads_per_layer, plan.neurons_per_layer):  # zero-width slices agree too
        for got, want in zip(_outputs(teacher, batch), reference, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_plan_orders_kept_units_by_importance() -> None:
    imp = Importance(heads=[[0.2, 0.9, 0.5, 0.1]], neurons=[[0.3, 0.1, 0.8, 0.4]])
    plan = plan_for_sparsity(imp, 0.25)
    assert plan.heads == [[1, 2, 0]]
    assert plan.neurons == [[2, 3, 0]]


def test_importance_is_deterministic_and_normalised_per_layer() -> None:
    teacher = tiny_bert()
    a, b = _importance(teacher), _importance(teacher)
    assert a == b
    assert a.samples == 9
    for row in a.heads + a.neurons:
        assert abs(sum(x * x for x in row) - 1.0) < 1e-5
    assert _importance(teacher, seed=11) != a  # other data gives other scores


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_bert()
    plan = plan_for_sparsity(_importance(teacher), 0.6)
    pruned = prune_model(teacher, plan)
    out = save_model_dir(pruned, tokenizer, tmp_path / "cand", plan=plan, record={"sparsity": 0.6})
    assert {"config.json", "pruning_plan.json", "model.safetensors", "minidisc.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    loaded, tok, record, _ = load_model_dir(str(out))
    assert record["sparsity"] == 0.6
    assert count_params(loaded) == count_params(pruned)
    batch = batch_with_padding()
    for got, want in zip(_outputs(loaded, batch), _outputs(pruned, batch), strict=True):
        assert torch.equal(got, want)
    assert not list(tmp_path.glob(".cand.tmp-*")), "no temporary directory left behind"


def test_pruning_a_pruned_model_composes(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_bert(layers=2, heads=8, ffn=64)
    ta = prune_model(teacher, plan_for_sparsity(_importance(teacher), 0.5))
    student_plan = plan_for_sparsity(_importance(ta), 0.75, base_units=(16, 128))
    student = prune_model(ta, student_plan)
    assert sum(student_plan.heads_per_layer) == 4
    assert sum(student_plan.neurons_per_layer) == 32
    out = save_model_dir(student, tokenizer, tmp_path / "student", plan=student_plan)
    loaded, *_ = load_model_dir(str(out))
    batch = batch_with_padding()
    assert torch.equal(_outputs(loaded, batch)[0], _outputs(student, batch)[0])


def test_prefix_plan_rebuilds_shapes() -> None:
    plan = PruningPlan.prefix([2, 0], [5, 0])
    pruned = prune_model(tiny_bert(), plan)
    assert [layer.intermediate.dense.out_features for layer in pruned.bert.encoder.layer] == [5, 0]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_depth_pruned_equals_the_teacher_with_those_layers_skipped_and_round_trips(  # type: ignore[no-untyped-def]
        family: str, tmp_path, tokenizer) -> None:
    """``depth.drop_layers`` (alone and after width pruning) computes exactly what the teacher computes with
    the dropped layers turned into the identity; the smaller model saves and loads like a width-pruned one."""
    from minidisc_ray.depth import drop_layers, layer_importance, layers_to_drop, skipping

    from .conftest import tiny_llama

    teacher = tiny_bert(layers=4) if family == "bert" else tiny_llama(lm=False, layers=4)
    batch = batch_with_padding()
    imp = layer_importance(teacher, [batch])
    assert len(imp) == 4
    assert all(0.0 <= x <= 2.0 for x in imp)
    assert len(set(imp)) == 4
    drop = layers_to_drop(imp, 2)
    assert drop == sorted(sorted(range(4), key=lambda i: imp[i])[:2])
    for base in (teacher, prune_model(teacher, plan_for_sparsity(_importance(teacher), 0.5))):
        shallow = drop_layers(base, drop)
        assert shallow.config.num_hidden_layers == 2
        assert base.config.num_hidden_layers == 4
        assert count_params(shallow)[1] < count_params(base)[1]
        with torch.no_grad(), skipping(base, drop):
            want = base(**{k: v for k, v in batch.items() if k != "labels"}).logits
        with torch.no_grad():
            got = shallow(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    from minidisc_ray.families import unit_widths

    out = save_model_dir(shallow, tokenizer, tmp_path / f"shallow-{family}", plan=PruningPlan.prefix(
        *unit_widths(shallow)), record={"depth_dropped": drop})
    loaded, _, record, _ = load_model_dir(str(out))
    assert record["depth_dropped"] == drop
    assert count_params(loaded) == count_params(shallow)
    with torch.no_grad():
        again = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(again, got, atol=1e-6)  # (a loaded decoder attends with sdpa, the fixture with eager)
    from minidisc_ray.errors import UserInputError

    with pytest.raises(UserInputError, match="pruning.depth"):
        layers_to_drop(imp, 4)
