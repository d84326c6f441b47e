"""The distillation chain on Ray Train: teacher -> TA -> student, one ``TorchTrainer`` run per stage.

Each stage runs the one loop of :mod:`minidisc_ray.engine` on every worker with the MiniDisc loss;
this package adds only what Ray Train needs, one concern a module: :mod:`.placement` (``distill.parallelism``),
:mod:`.checkpoint` (the checkpoint file format), :mod:`.stage_loop` (the worker loop), :mod:`.progress` (the
driver's progress line) and :mod:`.runner` (the ``TorchTrainer`` launch and :class:`ChainRunner`).

* ``ddp`` (default): the student is replicated and wrapped in DistributedDataParallel (gloo on CPU,
  NCCL on GPU); rank 0 writes the checkpoint (safetensors weights and optimiser moments + JSON).
* ``fsdp``: the student is sharded with FSDP2 (``fully_shard`` on every layer, then the root) across
  the workers; every rank writes its shard as safetensors with a JSON manifest (:func:`.checkpoint.save_sharded`,
  never ``torch.distributed.checkpoint``, whose metadata is a pickle) and Ray Train gathers the shards
  into one checkpoint directory. The frozen teacher is held once per worker without
  gradients (bf16 on GPU): it needs no optimiser state, so sharding it would only add an all-gather per
  layer per step to save one copy of its weights; a teacher too large for one GPU is the case for
  sharding it too, which the loop does not need to know about.

Checkpoints carry the loop state, the scheduler and the RNG state, and the data order is a function of
the step, so a worker group restarted by ``FailureConfig(max_failures)`` continues exactly where the
checkpoint left it: the resumed run ends with the weights an uninterrupted run ends with.
"""
