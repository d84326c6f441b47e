"""Hidden-size and depth pruning (:mod:`minidisc_ray.axes`): a cut model is the stock model of the smaller shape
holding the sliced weights (norms then compute their statistics over the kept channels), for every family; it
saves and loads back; and a cut built on the meta device from the files gets the same weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2ForCausalLM,
    RobertaForSequenceClassification,
)

from minidisc_ray.axes import channel_importance, hidden_width, keep_channels
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.pruning import PruningPlan, prune_model

from .conftest import batch_with_padding, make_tokenizer, tiny_bert, tiny_llama, tiny_qwen2, tiny_roberta


def _plan(model: Any, heads: list[int], neurons: int, hidden: list[int], layers: list[int]) -> PruningPlan:
    return PruningPlan([list(heads)] * len(layers), [list(range(0, 2 * neurons, 2))] * len(layers), 0.5,
                       {"layout": "uniform"}, hidden=hidden, layers=layers)


def _stock(cls: type, teacher: Any, **shape: Any) -> Any:
    config = copy.deepcopy(teacher.config)
    for k, v in shape.items():
        setattr(config, k, v)
    return cls(config)


def _same_logits(pruned: Any, stock: Any, batch: dict[str, torch.Tensor]) -> float:
    stock.load_state_dict(pruned.state_dict(), strict=True)
    if getattr(stock.config, "tie_word_embeddings", False):
        stock.tie_weights()
    stock.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return float((pruned(**inputs).logits - stock(**inputs).logits).abs().max())


CHANNELS = [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28, 30, 31, 2, 5]  # 24 of 32


@pytest.mark.parametrize("make,cls", [(tiny_bert, BertForSequenceClassification),
                                      (tiny_roberta, RobertaForSequenceClassification)])
def test_an_encoder_cut_in_width_and_depth_is_the_stock_encoder_of_that_shape(make, cls) -> None:  # type: ignore[no-untyped-def]
    teacher = make()
    hidden = sorted(CHANNELS)
    pruned = prune_model(teacher, _plan(teacher, [0, 2, 3], 24, hidden, [1]))  # 3 heads of 8 = 24 = hidden
    assert hidden_width(pruned) == 24
    stock = _stock(cls, teacher, hidden_size=24, num_attention_heads=3, intermediate_size=24, num_hidden_layers=1)
    assert _same_logits(pruned, stock, batch_with_padding()) < 1e-5
    # not the teacher with channels masked: the norms' statistics are over the kept channels
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2


@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_cut_in_width_and_depth_is_the_stock_llama_of_that_shape(tied: bool) -> None:
    teacher = tiny_llama(lm=True, tied=tied)  # 48 wide, 6 query heads over 2 KV groups of 8, 3 layers
    channels = keep_channels([float(c % 7) for c in range(48)], 40)
    pruned = prune_model(teacher, _plan(teacher, [1], 20, channels, [0, 2]))
    if tied:
        assert pruned.lm_head.weight is pruned.get_input_embeddings().weight, "tied embeddings stay tied"
    stock = _stock(LlamaForCausalLM, teacher, hidden_size=40, num_attention_heads=3, num_key_value_heads=1,
                   head_dim=8, intermediate_size=20, num_hidden_layers=2)
    assert _same_logits(pruned, stock, batch_with_padding()) < 1e-5


def test_a_qwen2_and_a_llama_classifier_cut_in_width_are_stock_models() -> None:
    teacher = tiny_qwen2()  # 48 wide, 6 heads over 3 KV groups (biased q/k/v)
    pruned = prune_model(teacher, _plan(teacher, [2, 0], 32, list(range(8, 48)), [0, 1]))
    stock = _stock(Qwen2ForCausalLM, teacher, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=8, intermediate_size=32)
    assert _same_logits(pruned, stock, batch_with_padding()) < 1e-5
    clf = tiny_llama(lm=False)
    cut = prune_model(clf, _plan(clf, [0, 1], 16, list(range(0, 48, 2)), [0, 1, 2]))
    stock = _stock(LlamaForSequenceClassification, clf, hidden_size=24, head_dim=8, intermediate_size=16)
    assert _same_logits(cut, stock, batch_with_padding()) < 1e-5


def test_a_width_and_depth_cut_saves_and_loads_back_with_the_same_logits(tmp_path: Path) -> None:
    teacher = tiny_bert()
    plan = _plan(teacher, [1, 3], 16, keep_channels(list(range(32)), 16), [0])
    pruned = prune_model(teacher, plan)
    save_model_dir(pruned, make_tokenizer(tmp_path / "tok"), tmp_path / "cut", plan=plan)
    loaded = load_model_dir(str(tmp_path / "cut")).model
    batch = {k: v for k, v in batch_with_padding().items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, pruned(**batch).logits, atol=1e-6)
    assert hidden_width(loaded) == 16 and loaded.config.num_hidden_layers == 1


def test_channel_importance_ranks_the_channels_the_stream_uses() -> None:
    teacher = tiny_llama(lm=True)
    with torch.no_grad():  # channel 5 carries nothing anywhere: no embedding column, no norm gain, no writes
        teacher.model.embed_tokens.weight[:, 5] = 0
        for layer in teacher.model.layers:
            layer.input_layernorm.weight[5] = 0
            layer.post_attention_layernorm.weight[5] = 0
        teacher.model.norm.weight[5] = 0
    scores = channel_importance(teacher, [batch_with_padding()])
    assert len(scores) == 48
    assert scores[5] == min(scores) == 0.0
    assert 5 not in keep_channels(scores, 47)
    assert keep_channels(scores, 47) == [c for c in range(48) if c != 5]


@pytest.mark.parametrize("make", [tiny_bert, tiny_qwen2])
def test_a_width_and_depth_cut_read_from_the_files_equals_the_cut_in_memory(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What a sharded teacher's candidate is built from: the meta-device cut filled from the teacher's files,
    each tensor reading the rows and columns it keeps (a projection cut twice: its heads, then its hidden
    columns, read against the stored tensor)."""
    from minidisc_ray.modelio.sharded import load_sharded

    teacher = make()
    kind = "lm" if make is tiny_qwen2 else "classification"
    save_model_dir(teacher, make_tokenizer(tmp_path / "tok"), tmp_path / "teacher")
    width = hidden_width(teacher)
    plan = _plan(teacher, [2, 0], 12, [c for c in range(width) if c % 4 != 1], [0, 1])
    in_memory = prune_model(teacher, plan)
    from_files = load_sharded(tmp_path / "teacher", kind, torch.device("cpu"), plan=plan, shard=False)
    mine, theirs = in_memory.state_dict(), from_files.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], theirs[k])]


@pytest.mark.parametrize("make", [lambda: tiny_llama(lm=True, tied=True), tiny_qwen2])
def test_a_decoder_cut_in_width_and_depth_exports_as_a_stock_directory(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``minidisc export --format hf``: a smaller hidden size and fewer layers, loaded by AutoModelForCausalLM
    with no minidisc code, giving the pruned model's logits."""
    from transformers import AutoModelForCausalLM

    from minidisc_ray.errors import UserInputError
    from minidisc_ray.export import export_model

    teacher = make()
    plan = _plan(teacher, [0], 24, list(range(6, 42)), [0, 1])  # 36 channels: a multiple of the 2 or 3 query heads
    src = save_model_dir(prune_model(teacher, plan), make_tokenizer(tmp_path / "tok"), tmp_path / "cut", plan=plan,
                         record={"role": "student", "task": {"config": {"type": "lm"}}})
    info = export_model(str(src), "hf", str(tmp_path / "hf"))
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert (stock.config.hidden_size, stock.config.num_hidden_layers, stock.config.intermediate_size) == (36, 2, 24)
    pruned = load_model_dir(str(src), kind="lm").model
    batch = {k: v for k, v in batch_with_padding().items() if k != "labels"}
    with torch.no_grad():
        diff = float((stock(**batch).logits - pruned(**batch).logits).abs().max())
    assert diff <= 1e-5 and info["max_abs_diff"] <= 1e-4, (diff, info)
    odd = _plan(teacher, [0], 24, list(range(37)), [0, 1])  # transformers refuses a width the heads do not divide
    src = save_model_dir(prune_model(teacher, odd), make_tokenizer(tmp_path / "tok"), tmp_path / "odd", plan=odd,
                         record={"role": "student", "task": {"config": {"type": "lm"}}})
    with pytest.raises(UserInputError, match="not a multiple of the"):
        export_model(str(src), "hf", str(tmp_path / "hf-odd"))


def test_an_encoder_exports_stock_exactly_when_its_heads_fill_its_hidden_size(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from minidisc_ray.errors import UserInputError
    from minidisc_ray.export import export_model

    teacher, tok = tiny_bert(), make_tokenizer(tmp_path / "tok")
    record = {"role": "student", "task": {"num_labels": 2}}
    fits = _plan(teacher, [0, 1, 3], 20, list(range(24)), [0, 1])  # 3 heads of 8 over 24 channels
    src = save_model_dir(prune_model(teacher, fits), tok, tmp_path / "fits", plan=fits, record=record)
    export_model(str(src), "hf", str(tmp_path / "hf"))
    stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    assert (stock.config.hidden_size, stock.config.num_attention_heads) == (24, 3)
    odd = _plan(teacher, [0, 1, 3], 20, list(range(28)), [0, 1])  # 3 heads of 8 over 28 channels
    src = save_model_dir(prune_model(teacher, odd), tok, tmp_path / "odd", plan=odd, record=record)
    with pytest.raises(UserInputError, match=r"heads x head size = hidden \(24 here\)"):
        export_model(str(src), "hf", str(tmp_path / "hf2"))
    assert not (tmp_path / "hf2").exists()


def test_the_hidden_state_loss_compares_each_student_layer_with_the_teacher_layer_it_was_cut_from() -> None:
    """A depth cut that removes a layer doing nothing (zero output projections: the identity on the residual
    stream) is the teacher exactly: the MiniDisc loss, whose hidden-state term then compares student layer 2 with
    teacher layer 3, is 0. A hidden cut's states are compared on the kept channels."""
    from minidisc_ray.training import distill_loss_on_batch

    teacher = tiny_llama(lm=False, layers=3)
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight.zero_()
        teacher.model.layers[1].mlp.down_proj.weight.zero_()
    batch = batch_with_padding()
    cut = prune_model(teacher, PruningPlan([[0, 1]] * 2, [list(range(64))] * 2, layers=[0, 2]))
    assert cut.config.minidisc_cut == {"layers": [0, 2], "hidden": None}
    assert float(distill_loss_on_batch(cut, teacher, batch)) < 1e-10
    narrow = prune_model(teacher, PruningPlan([[0, 1]] * 3, [list(range(64))] * 3, hidden=list(range(0, 48, 2))))
    loss = distill_loss_on_batch(narrow, teacher, batch)
    assert torch.isfinite(loss) and float(loss) > 0
    rebuilt = prune_model(narrow, PruningPlan([[0, 1]] * 3, [list(range(64))] * 3))  # a cut of the cut: its own map
    assert not hasattr(rebuilt.config, "minidisc_cut")


def test_a_decoder_cut_below_its_last_layer_compares_final_norm_outputs() -> None:
    from minidisc_ray.axes import teacher_states_for

    teacher = tiny_llama(lm=True, layers=3)
    cut = prune_model(teacher, PruningPlan([[0, 1]] * 2, [list(range(64))] * 2, layers=[0, 1]))
    states = [torch.full((1,), float(i)) for i in range(4)]  # embeddings, layers 0..1, the final norm's output
    mapped = teacher_states_for(cut, states, [1, 2])
    assert float(mapped[1]) == 1.0  # student layer 1 = teacher layer 0's output
    assert float(mapped[2]) == 3.0  # student's last (after its final norm) = the teacher's last, not layer 1's
