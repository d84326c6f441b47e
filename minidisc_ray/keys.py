"""Which config fields each recorded computation is keyed by: one table, config field x record kind.

Every result minidisc-ray records for reuse (``OUTPUT/evaluations``, the chain's stage directories, the
Optuna studies) is found again by a key: a digest of everything that decides the result. The table below says,
for every field of :class:`~minidisc_ray.config.Config`, which kinds of record it decides, so a rerun with
another value computes again instead of reusing a result that no longer holds:

* ``candidate``: a candidate's recovery and score (``SearchPayload.evaluation_key``);
* ``stage``: one link of the chain (``ChainRunner.key``; its ``distill.*`` are the link's own, e.g. its steps);
* ``halving_arm``: one rung of a halving arm (``HalvingPayload.rung_key``);
* ``study_unit``: one ``minidisc study`` trial (``StudyPayload.key``);
* ``optuna_study``: the name of an Optuna study (``optuna`` and ``optuna-kd``), which decides whose history a
  rerun continues.

Tune experiment names are not keys: every run starts a new experiment (``tune_experiment.experiment_name``),
so no field decides them.

A field enters a kind's key in one of two ways: ``direct`` (its value, through :func:`config_part`) or ``via``
an input the key holds anyway (the teacher's fingerprint: its weights and config; the data key: the tokenised
rows; the stage's starting weights; a rung's steps). A field that enters no key is declared result-neutral,
with the reason: where or how a computation runs (placement, memory savers, retries, paths, budgets of which
computations run), never what it computes.

:data:`KEY_VERSION` is part of every key: records written under an older version are not found, so they are
computed again once (:class:`~minidisc_ray.records.EvaluationStore` says how many in one log line).
New config fields go into the table; ``tests/test_keys.py`` fails for a field the table does not name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minidisc_ray.config import Config
from minidisc_ray.records import KEY_VERSION, digest

# KEY_VERSION 2: the table (the teacher's config in its fingerprint, an offline teacher's top-k in candidate keys);
# 1 (no key_version in a record): the keys before it
__all__ = ["ARM", "CANDIDATE", "KEY_VERSION", "KINDS", "OPTUNA", "STAGE", "STUDY", "TABLE", "Entry", "config_fields",
           "config_key", "config_part", "field_value"]

CANDIDATE, STAGE, ARM, STUDY, OPTUNA = "candidate", "stage", "halving_arm", "study_unit", "optuna_study"
KINDS = (CANDIDATE, STAGE, ARM, STUDY, OPTUNA)


@dataclass(frozen=True)
class Entry:
    """How one config field enters the keys: ``direct`` kinds take its (normalised) value; ``via`` names the
    input through which it reaches the others; ``why`` says what it decides, or why it decides nothing."""

    direct: frozenset[str]
    why: str
    via: str = ""
    normalise: Callable[[Any, Config], Any] | None = None  # the part of the value that decides the result


def _e(kinds: str, why: str, via: str = "", normalise: Callable[[Any, Config], Any] | None = None) -> Entry:
    return Entry(frozenset(k for k in kinds.split() if k), why, via, normalise)


_ALL = " ".join(KINDS)
_RESULTS = f"{CANDIDATE} {ARM} {STUDY} {OPTUNA}"  # everything that trains from the search's candidates
NEUTRAL = ""
_DATA = "data key (the rows as tokenised)"
_TEACHER = "teacher fingerprint (its weights and config)"
_START = "the stage's starting weights (the student or assistant as cut)"


def _loss_of(placement: str, cfg: Config) -> str:
    """Only the loss a placement implies decides results: an offline teacher's stored top-k targets, or the
    teacher's own forward pass wherever it runs (replicated and sharded compute the same)."""
    return "offline" if placement == "offline" else "online"


def _top_k(top_k: int, cfg: Config) -> int | None:
    return top_k if cfg.teacher.placement == "offline" else None


def _on_gpu(gpus: float, cfg: Config) -> bool:
    return gpus > 0  # a trial on a GPU holds the teacher in bf16


TABLE: dict[str, Entry] = {
    "seed": _e(_ALL, "every random draw: data order, dropout, the importance sample"),
    "output_dir": _e(NEUTRAL, "where records are kept, not what they hold (an Optuna study's name takes the job's "
                              "actual output directory: one study per job)"),
    **{f"task.{name}": _e(_ALL, "the rows, their labels and the metric", via=_DATA) for name in (
        "type", "data", "text_column", "text_pair_column", "label_column", "encoding", "dev_fraction",
        "validation_fraction", "max_train_samples", "max_dev_samples", "max_length", "regression")},
    "teacher.model": _e(NEUTRAL, "the teacher, identified by its files' contents, not their path", via=_TEACHER),
    "teacher.finetune": _e(NEUTRAL, "whether the teacher is fine-tuned here", via=_TEACHER),
    "teacher.trust_remote_code": _e(NEUTRAL, "whether the model's own code may run; what it computes is in the "
                                             "teacher's fingerprint", via=_TEACHER),
    "teacher.placement": _e(f"{CANDIDATE} {STAGE} {OPTUNA}", "offline: trained on stored top-k targets, another "
                            "loss; replicated and sharded compute the same", normalise=_loss_of),
    "teacher.top_k": _e(f"{CANDIDATE} {STAGE} {OPTUNA}", "an offline teacher's targets (the others ignore it)",
                        normalise=_top_k),
    **{f"finetune.{name}": _e(NEUTRAL, "how the teacher was fine-tuned", via=_TEACHER) for name in (
        "max_steps", "batch_size", "lr", "warmup_ratio", "weight_decay", "eval_every")},
    "pruning.importance": _e(_RESULTS, "which units a candidate keeps", via=_START),
    "pruning.layout": _e(_RESULTS, "which units a candidate keeps", via=_START),
    "pruning.importance_samples": _e(_RESULTS, "which units a candidate keeps", via=_START),
    "pruning.batch_size": _e(_RESULTS, "which units a candidate keeps (the importance pass's batches)",
                             via=_START),
    "pruning.grid": _e(OPTUNA, "the Optuna study's search space; a candidate's result is its own (the study's "
                               "sandwich unit names its grid)"),
    "pruning.student_sparsity": _e(f"{ARM} {STUDY} {OPTUNA}", "the student an arm or a study path trains, and "
                                   "optuna-kd's arms (an exhaustive candidate's key names it too)", via=_START),
    "pruning.lam": _e(OPTUNA, "the Optuna objective; everything else records the metric, lambda applies after"),
    "pruning.assistants": _e(NEUTRAL, "how many links the chain has; each link is keyed by its own start"),
    **{f"pruning.{name}": _e(_RESULTS, "which shape a candidate at a grid point takes (and what the grid means)",
                             via=_START) for name in ("axes", "budget", "min_layers", "min_hidden")},
    "pruning.tradeoff": _e(OPTUNA, "the Optuna objective's form; the rest records metrics, the form applies after"),
    **{f"recovery.{name}": _e(_RESULTS, "a candidate's recovery (and an arm's first link)") for name in (
        "steps", "batch_size", "lr", "temperature", "hard_label_weight")},
    "search.strategy": _e(NEUTRAL, "which computations run; their records are shared across strategies"),
    "search.points_per_round": _e(NEUTRAL, "which candidates the bisection evaluates, not their results"),
    "search.sweep": _e(NEUTRAL, "which candidates the bisection evaluates, not their results"),
    "search.max_concurrent_trials": _e(NEUTRAL, "how many trials run at once"),
    "search.optuna_trials": _e(NEUTRAL, "the trial budget: a rerun with a larger one continues the study"),
    "search.optuna_seed": _e(OPTUNA, "the sampler's proposals"),
    "search.trial_cpus": _e(NEUTRAL, "threads of a trial (same arithmetic)"),
    "search.trial_gpus": _e(f"{CANDIDATE} {ARM} {STUDY} {OPTUNA}", "a trial on a GPU holds the teacher in bf16",
                            normalise=_on_gpu),
    "search.trial_workers": _e(NEUTRAL, "a candidate recovered over several workers averages the same gradients"),
    "search.optuna_storage": _e(NEUTRAL, "where the Optuna study is kept"),
    "search.halving_steps": _e(OPTUNA, "optuna-kd's rungs; a rung is keyed by its own steps", via="the rung's steps"),
    "search.halving_min_fraction": _e(OPTUNA, "optuna-kd's rungs; a rung is keyed by its own steps",
                                      via="the rung's steps"),
    "search.halving_reduction": _e(OPTUNA, "optuna-kd's pruner; a rung is keyed by its own steps",
                                   via="the rung's steps"),
    "search.halving_scheduler": _e(NEUTRAL, "the order rungs are trained in, not what a rung computes"),
    "search.shortlist": _e(NEUTRAL, "which arms the round runs"),
    "search.optuna_pruner": _e(OPTUNA, "which of optuna-kd's trials are pruned"),
    "distill.steps": _e(f"{STAGE} {STUDY} {OPTUNA}", "what a chain link trains; optuna-kd's rungs when "
                                                    "search.halving_steps is null"),
    **{f"distill.{name}": _e(f"{STAGE} {STUDY}", "what a chain link trains") for name in (
        "warmup_ratio", "weight_decay", "temperature", "hard_label_weight", "eval_every", "patience")},
    "distill.lr": _e(f"{STAGE} {ARM} {STUDY} {OPTUNA}", "what a chain link (and an arm's student link) trains"),
    "distill.batch_size": _e(f"{STAGE} {ARM} {STUDY} {OPTUNA}", "what a chain link (and an arm's student link) "
                                                                "trains"),
    "distill.num_workers": _e(NEUTRAL, "placement: a stage resumes under another"),
    "distill.parallelism": _e(NEUTRAL, "placement: DDP and FSDP train the same model"),
    "distill.grad_accum": _e(f"{STAGE} {STUDY}", "a step averages this many micro-batches of distill.batch_size: "
                                                 "a larger batch, another result"),
    "distill.activation_checkpointing": _e(NEUTRAL, "a memory saver: recomputes what it drops"),
    "distill.kl_chunk": _e(NEUTRAL, "a memory saver: the same KL a chunk of positions at a time"),
    "distill.use_gpu": _e(NEUTRAL, "placement: a stage resumes on another device"),
    "distill.cpus_per_worker": _e(NEUTRAL, "threads of a worker"),
    "distill.max_failures": _e(NEUTRAL, "retries"),
    "distill.baseline_direct_kd": _e(NEUTRAL, "whether the baseline runs; it is keyed as a stage of its own"),
    "distill.direct_kd_budget": _e(NEUTRAL, "the baseline's steps, which its stage key holds",
                                   via="the stage's distill.steps"),
    "ray.address": _e(NEUTRAL, "where Ray runs"),
    "ray.num_cpus": _e(NEUTRAL, "where Ray runs"),
    "ray.storage_path": _e(NEUTRAL, "where Tune keeps its files"),
    "tracking.mlflow": _e(NEUTRAL, "what is reported to MLflow"),
    "tracking.uri": _e(NEUTRAL, "what is reported to MLflow"),
    "tracking.experiment": _e(NEUTRAL, "what is reported to MLflow"),
}


def config_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf field of the config, as dotted paths (``recovery.steps``)."""
    out: list[str] = []
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += config_fields(type(default), f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def field_value(cfg: Config, path: str) -> Any:
    """The value of the dotted field ``path`` of ``cfg``."""
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def config_part(cfg: Config, kind: str) -> dict[str, Any]:
    """The fields that decide a ``kind`` record, with their (normalised) values, and the key version: what every
    key function puts into its digest besides the inputs that are not config (fingerprints, sparsities)."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; one of {', '.join(KINDS)}")
    part: dict[str, Any] = {"key_version": KEY_VERSION}
    for path, entry in TABLE.items():
        if kind in entry.direct:
            value = field_value(cfg, path)
            part[path] = entry.normalise(value, cfg) if entry.normalise else value
    return part


def config_key(cfg: Config, kind: str) -> str:
    """:func:`config_part` as a digest."""
    return digest(kind, config_part(cfg, kind))
