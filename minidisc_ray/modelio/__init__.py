"""Models in and out: model directories (:mod:`.load`), where a model comes from and the checks on it
(:mod:`.locate`), models in Ray's object store (:mod:`.blobs`), reading a stored model shard by shard
(:mod:`.sharded`) and the digests that name weights (:mod:`.fingerprint`).

Model directories: the teacher, and pruned models saved with their pruning plan.

A pruned model cannot be rebuilt by stock ``from_pretrained`` (transformers 5 has no ``prune_heads``),
so :func:`load_model_dir` is the one loader: it reads ``config.json``, builds the full architecture,
cuts it to the shapes in ``pruning_plan.json`` and then loads ``model.safetensors``. Weights are only
ever read from safetensors; ``trust_remote_code`` stays off unless the caller asks for it.

Layout of a saved model directory::

    config.json          the architecture before pruning (transformers format)
    pruning_plan.json    heads and FFN neurons kept per layer (absent for an unpruned model)
    model.safetensors    the weights
    minidisc.json        task record: data, labels, metric, sparsity, parameters, metrics
    tokenizer files, README.md (model card)
"""

from __future__ import annotations

from minidisc_ray.modelio.load import load_model_dir, save_model_dir

__all__ = ["load_model_dir", "save_model_dir"]
