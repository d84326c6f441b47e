"""Decoder (Llama-architecture) adaptor: GQA-consistent pruning equals masking, both importance scores."""

from __future__ import annotations

import copy

import pytest
import torch

from minidisc_ray.families import EmptyDecoderAttention, count_params, get_adaptor
from minidisc_ray.modelio.blobs import model_blob, model_from_blob
from minidisc_ray.pruning import PruningPlan, compute_importance, masked, plan_for_sparsity, prune_model, sliced

from .conftest import _outputs, tiny_llama, tiny_qwen2


def lm_batches(n: int = 3, vocab: int = 128, length: int = 16) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        ids = torch.randint(1, vocab, (4, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 5:] = 0  # a padded row: padding must not count in activation scores
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("method", ["gradient", "activation"])
@pytest.mark.parametrize("s", [0.0, 0.34, 0.67, 0.95])
def test_pruned_decoder_equals_masked_teacher(make, method: str, s: float) -> None:  # type: ignore[no-untyped-def]
    teacher = make()
    snapshot = copy.deepcopy(teacher)
    imp = compute_importance(teacher, lm_batches(), method=method)
    plan = plan_for_sparsity(imp, s)
    pruned = prune_model(teacher, plan)
    batch = lm_batches(1)[0]
    handles = masked(teacher, plan)
    try:
        reference = _outputs(teacher, batch)
    finally:
        for h in handles:
            h.remove()
    got = _outputs(pruned, batch)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for k, v in snapshot.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, teacher.state_dict()[k])


def test_gqa_groups_keep_their_query_heads() -> None:
    teacher = tiny_llama(layers=2, heads=6, kv_heads=2)  # 2 groups of 3 query heads, head_dim 8
    adaptor = get_adaptor(teacher)
    assert [adaptor.num_heads(layer) for layer in adaptor.layers(teacher)] == [2, 2]
    plan = PruningPlan([[1], []], [list(range(64)), list(range(10))])
    pruned = prune_model(teacher, plan)
    attn = pruned.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (24, 8, 8)
    assert attn.o_proj.in_features == 24
    assert attn.num_key_value_groups == 3
    src = teacher.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, src.q_proj.weight[24:48])  # group 1 = query heads 3, 4, 5
    assert torch.equal(attn.k_proj.weight, src.k_proj.weight[8:16])
    assert isinstance(pruned.model.layers[1].self_attn, EmptyDecoderAttention)
    assert pruned.model.layers[1].mlp.down_proj.in_features == 10
    # a pruned model generates with the KV cache (fewer KV heads per layer)
    out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_decoder_prunable_share_and_blob_round_trip() -> None:
    teacher = tiny_llama(layers=4, heads=8, kv_heads=4, hidden=64, ffn=256)
    plan = plan_for_sparsity(compute_importance(teacher, lm_batches(), method="activation"), 0.5)
    pruned = prune_model(teacher, plan)
    before, _ = count_params(teacher)
    after, _ = count_params(pruned)
    assert abs((1 - after / before) - 0.5) <= 0.03
    rebuilt = model_from_blob(model_blob(pruned))
    assert type(rebuilt).__name__ == "LlamaForCausalLM"
    batch = lm_batches(1)[0]
    torch.testing.assert_close(_outputs(rebuilt, batch)[0], _outputs(pruned, batch)[0])


def test_decoder_sliced_prefix_equals_pruned_prefix() -> None:
    teacher = tiny_llama()
    ordered = prune_model(teacher, plan_for_sparsity(compute_importance(teacher, lm_batches()), 0.0))
    heads, neurons = [2, 0, 1], [40, 64, 3]
    reference = prune_model(ordered, PruningPlan.prefix(heads, neurons))
    batch = lm_batches(1)[0]
    with sliced(ordered, heads, neurons) as narrow:
        got = _outputs(narrow, batch)
    for a, b in zip(got, _outputs(reference, batch), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_activation_importance_needs_no_labels_and_ignores_padding() -> None:
    teacher = tiny_llama()
    batches = lm_batches()
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    a = compute_importance(teacher, unlabelled, method="activation")
    # changing what sits under the padding mask changes nothing
    for b in unlabelled:
        b["input_ids"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)
    b_ = compute_importance(teacher, unlabelled, method="activation")
    assert a.heads == b_.heads
    assert a.neurons == b_.neurons
    assert all(len(h) == 2 for h in a.heads)
    assert all(len(n) == 64 for n in a.neurons)


def test_sequence_classification_decoder_prunes() -> None:
    teacher = tiny_llama(lm=False)
    batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "labels": torch.tensor([0, 1, 1, 0])} for b in lm_batches()]
    plan = plan_for_sparsity(compute_importance(teacher, batches), 0.5)
    pruned = prune_model(teacher, plan)
    handles = masked(teacher, plan)
    try:
        reference = _outputs(teacher, batches[0])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_outputs(pruned, batches[0])[0], reference[0], atol=2e-5, rtol=1e-4)


def test_pruning_a_pruned_decoder_again() -> None:
    """TA -> student: a layer already without groups stays empty, the rest is cut further."""
    teacher = tiny_llama()
    imp = compute_importance(teacher, lm_batches(), method="activation")
    ta = prune_model(teacher, PruningPlan([[0], [], [1, 0]], [list(range(30)), list(range(64)), [3, 4]]))
    student = prune_model(ta, PruningPlan([[0], [], [1]], [list(range(5)), [], [0]]))
    assert [get_adaptor(student).num_heads(x) for x in get_adaptor(student).layers(student)] == [1, 0, 1]
    assert imp.samples == 12
    batch = lm_batches(1)[0]
    assert torch.isfinite(_outputs(student, batch)[0]).all()


def test_tied_embeddings_stay_tied_through_pruning_saving_and_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    from minidisc_ray.chain.checkpoint import unaliased
    from minidisc_ray.modelio.load import load_model_dir, save_model_dir

    from .conftest import make_tokenizer

    teacher = tiny_llama(tied=True)
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    pruned = prune_model(teacher, PruningPlan.prefix([1, 2, 0], [30, 64, 5]))
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight, "one clone for both names"
    rebuilt = model_from_blob(model_blob(pruned))
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    save_file(unaliased(pruned.state_dict()), str(tmp_path / "ckpt.safetensors"))  # the chain's checkpoint
    again = model_from_blob(model_blob(pruned))
    again.load_state_dict(load_file(str(tmp_path / "ckpt.safetensors")))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    out = save_model_dir(pruned, make_tokenizer(tmp_path / "tok"), tmp_path / "m",
                         plan=PruningPlan.prefix([1, 2, 0], [30, 64, 5]))
    loaded, *_ = load_model_dir(str(out), kind="lm")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    batch = lm_batches(1)[0]
    torch.testing.assert_close(_outputs(loaded, batch)[0], _outputs(pruned, batch)[0])
