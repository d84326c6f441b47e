"""Candidates by budget (:mod:`minidisc_ray.budget`): exact parameter counts of every uniform cut, the published
Minitron shapes of Llama-3.1-8B, the shapes a budget admits, and the cut kept by the cheap score."""

from __future__ import annotations

import random

import pytest
import torch

from minidisc_ray.budget import CostModel, Limits, architectures, choose_cut, plan_for_arch, rank
from minidisc_ray.errors import ConfigError, UserInputError
from minidisc_ray.modelio.weights import empty_model
from minidisc_ray.plan_shapes import load_architecture
from minidisc_ray.pruning import PruningPlan, compute_importance, prune_model

from .conftest import batch_with_padding, tiny_bert, tiny_llama, tiny_qwen2


@pytest.mark.parametrize("make", [tiny_bert, lambda: tiny_llama(lm=True, tied=True), tiny_qwen2,
                                  lambda: tiny_llama(lm=False)])
def test_the_cost_model_counts_every_uniform_cut_exactly(make) -> None:  # type: ignore[no-untyped-def]
    teacher = make()
    cost = CostModel(teacher)
    assert cost.total == sum(p.numel() for p in teacher.parameters())
    rng = random.Random(0)
    for _ in range(12):
        layers, hidden = rng.randint(1, cost.L), rng.randint(4, cost.H)
        units, ffn = rng.randint(0, cost.U), rng.randint(1, cost.N)
        plan = PruningPlan([list(range(units))] * layers, [list(range(ffn))] * layers, hidden=list(range(hidden)),
                           layers=list(range(layers)))
        real = sum(p.numel() for p in prune_model(teacher, plan).parameters())
        assert cost.params(layers, hidden, units, ffn) == real, (layers, hidden, units, ffn)


def test_llama_3_1_8b_minitron_width_and_depth_shapes_have_their_published_sizes() -> None:
    """Llama-3.1-Minitron-4B-Width (32 layers, hidden 3072, FFN 9216, 32 heads over 8 KV groups of 128) and the
    Depth sibling (16 of 32 layers): 4.51B and 4.54B parameters."""
    teacher = empty_model(load_architecture("meta-llama/Llama-3.1-8B"), kind="lm")  # the bundled config, meta
    cost = CostModel(teacher)
    assert abs(cost.params(32, 3072, 8, 9216) / 4.51e9 - 1) < 1e-3
    assert abs(cost.params(16, 4096, 8, 14336) / 4.54e9 - 1) < 1e-3
    half = architectures(cost, 0.5, ["heads", "ffn", "hidden", "depth"])
    assert len(half) > 20
    assert all(a.params <= 0.5 * cost.total for a in half)
    assert {a.layers for a in half} >= {32, 16} and {a.hidden for a in half} >= {4096, 2048}
    width_only = architectures(cost, 0.5, ["hidden"], Limits(min_hidden=0.25))
    assert [a.layers for a in width_only] == [32] * len(width_only) and all(a.units == 8 for a in width_only)
    with pytest.raises(UserInputError, match="pruning.axes"):
        architectures(cost, 0.5, ["width"])


def test_the_cheap_score_keeps_the_cut_that_changes_the_teacher_least() -> None:
    teacher = tiny_llama(lm=False, layers=3)
    with torch.no_grad():  # layer 1 and channels 40.. do nothing: cutting them costs nothing
        layer = teacher.model.layers[1]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        teacher.model.embed_tokens.weight[:, 40:] = 0
        for lyr in teacher.model.layers:
            for norm in (lyr.input_layernorm, lyr.post_attention_layernorm):
                norm.weight[40:] = 0
            lyr.self_attn.o_proj.weight[40:] = 0
            lyr.mlp.down_proj.weight[40:] = 0
    batches = [batch_with_padding(seed=s) for s in range(3)]
    imp = compute_importance(teacher, batches)
    cost = CostModel(teacher)
    archs = [cost.arch(2, 48, 2, 64), cost.arch(3, 40, 2, 64), cost.arch(3, 48, 1, 64)]
    from minidisc_ray.axes import channel_importance
    from minidisc_ray.depth import layer_importance

    channels, layers = channel_importance(teacher, batches), layer_importance(teacher, batches)
    ranked = rank(teacher, archs, imp, channels, layers, batches)
    assert ranked[0][1] < ranked[-1][1]
    kept = plan_for_arch(imp, channels, layers, cost.arch(2, 40, 2, 64), 3)
    assert kept.layers == [0, 2] and kept.hidden == list(range(40))


def test_choose_cut_returns_a_model_within_budget_and_its_plan() -> None:
    teacher = tiny_bert(layers=3)
    batches = [batch_with_padding(seed=s) for s in range(2)]
    pruned, plan, ranked = choose_cut(teacher, batches, batches, 0.4, ["heads", "ffn", "hidden", "depth"])
    total = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == ranked[0][0].params <= 0.6 * total
    assert plan.meta["arch"] == ranked[0][0].to_dict()
    assert [loss for _, loss in ranked] == sorted(loss for _, loss in ranked)


def test_plan_sizes_a_shape_and_lists_the_shapes_a_budget_admits(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from minidisc_ray.cli import main

    assert main(["plan", "meta-llama/Llama-3.1-8B", "--shape", "layers=16", "--shapes-at", "0.5"]) == 0
    captured = capsys.readouterr()
    shapes = json.loads(captured.out.strip().splitlines()[-1])["shapes"]
    assert shapes["shape"]["layers"] == 16 and abs(shapes["shape"]["params"] / 4.54e9 - 1) < 1e-3
    assert len(shapes["shapes_at"]["shapes"]) > 20
    assert "[plan] shape 16 layers, hidden 4096" in captured.err
    assert main(["plan", "meta-llama/Llama-3.1-8B", "--shape", "head_dim=64"]) == 2
    assert "head_dim must stay the teacher's 128" in capsys.readouterr().err


def test_a_latency_price_cuts_heads_and_ffn_too_and_a_shape_past_the_teacher_is_one_line() -> None:
    from minidisc_ray.budget import parse_shape

    cost = CostModel(tiny_llama(lm=True, layers=3))
    by_flops = architectures(cost, 0.4, ["heads", "ffn", "depth"], measure="flops")
    priced = architectures(cost, 0.4, ["heads", "ffn", "depth"], measure="latency", price=lambda a: a.flops)
    assert priced == by_flops and any(a.units < cost.U for a in priced)
    with pytest.raises(UserInputError, match="hidden=99 is more than the teacher's 48"):
        parse_shape("hidden=99", cost)


def test_hidden_and_depth_cuts_refuse_a_sharded_teacher_and_the_sandwich_in_one_line() -> None:
    from minidisc_ray.config import config_from_dict

    every = {"axes": ["heads", "ffn", "hidden", "depth"]}
    base = {"task": {"data": "x.csv"}, "teacher": {"model": "m"}}
    # offline, the driver holds the teacher: accepted
    config_from_dict({**base, "pruning": every, "teacher": {"model": "m", "placement": "offline"}})
    for extra, says in (({"teacher": {"model": "m", "placement": "sharded"}}, "teacher whole on the driver"),
                        ({"search": {"strategy": "sandwich"}}, "nested"),
                        ({"pruning": {**every, "assistants": 2}}, "one assistant")):
        raw = {**base, "pruning": every, **extra}
        with pytest.raises(ConfigError, match="pruning.axes") as err:
            config_from_dict(raw)
        assert len(err.value.problems) == 1 and says in str(err.value) and "\n" not in str(err.value)


def test_the_teachers_outputs_are_computed_once_for_every_shape_and_give_the_same_losses() -> None:
    from minidisc_ray.budget import distillation_loss, teacher_log_probs

    teacher = tiny_llama(layers=3)
    held = [batch_with_padding(seed=s) for s in (1, 2)]
    cut = prune_model(teacher, PruningPlan([[0], [0, 1], [1]], [list(range(20))] * 3), share_unpruned=True)
    cached = teacher_log_probs(teacher, held)
    assert cached is not None and len(cached) == 2
    assert distillation_loss(teacher, cut, held, cached) == pytest.approx(distillation_loss(teacher, cut, held),
                                                                          rel=1e-5)
    assert teacher_log_probs(teacher, held, limit=1000) is None, "past the limit each shape runs the teacher"
