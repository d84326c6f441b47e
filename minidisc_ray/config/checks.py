"""The value checks of a configuration: one declarative table, :data:`CHECKS`, and the loop that runs it.

A row names a field (its dotted path in the config), a predicate on the field's value (given the whole
:class:`~minidisc_ray.config.schema.Config` too, for the checks that weigh one field against another) and the fix
the user reads when it fails. :func:`check_values` runs the rows in order and records one
:class:`~minidisc_ray.errors.UserInputError` per failure. The strategy lists come from the search strategy
registry when a check runs, so a strategy registered later (a plug-in, a test's toy) is listed too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from minidisc_ray.config.schema import Config
from minidisc_ray.errors import UserInputError
from minidisc_ray.strategies import REGISTRY, names

# a predicate's first argument is the value of whichever field its row names (Any: a str, an int, a float, a
# list...); a TypeError inside it means the value's type was wrong, which the row then leaves to the type check
Predicate: TypeAlias = Callable[[Any, Config], bool]
Fix: TypeAlias = str | Callable[[Config], str]  # a callable where the text quotes other fields or the registry


@dataclass(frozen=True)
class Check:
    """One row: the value of ``field`` must satisfy ``ok(value, cfg)``, else the user is told ``fix``."""

    field: str
    ok: Predicate
    fix: Fix

    def fix_text(self, cfg: Config) -> str:
        return self.fix if isinstance(self.fix, str) else self.fix(cfg)


@dataclass(frozen=True)
class EachItem:
    """Rows for every item of a list field, reported as ``field[i]``, all rows of an item before the next item;
    skipped as a whole when the list or one of its items already had a type problem."""

    field: str
    checks: tuple[tuple[Predicate, Fix], ...]


def _address_ok(address: str) -> bool:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (what ``ray.init(address=...)`` accepts)."""
    if address == "auto":
        return True
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    return bool(sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536)


def _strategies(**supports: bool) -> str:
    return ", ".join(names(**supports))


def _at_least_one(v: float, _: Config) -> bool:
    return v >= 1


def _null_or_at_least_one(v: float | None, _: Config) -> bool:
    return v is None or v >= 1


def _inside_0_1(v: float, _: Config) -> bool:  # in (0, 1), both ends open
    return 0.0 < v < 1.0


def _nonempty(v: str | list[float], _: Config) -> bool:
    return bool(v)


# in the order the problems are reported
CHECKS: tuple[Check | EachItem, ...] = (
    Check("task.type", lambda v, _: v in ("classification", "lm"),
          "use classification (labelled text) or lm (language modelling)"),
    Check("task.regression", lambda v, cfg: not (v and cfg.task.type == "lm"),
          "language modelling has no regression labels; set it to false"),
    Check("pruning.importance", lambda v, _: v in ("gradient", "activation"),
          "use gradient (the paper's Taylor score) or activation (no backward pass)"),
    Check("pruning.layout", lambda v, _: v in ("global", "uniform"),
          "use global (rank units across layers) or uniform (the same width in every layer)"),
    Check("pruning.assistants", lambda v, _: 1 <= v <= 8,
          "use 1 (the paper) to 8; each further assistant is searched between the previous one and the student"),
    Check("pruning.axes", lambda v, _: bool(v) and all(a in ("heads", "ffn", "hidden", "depth") for a in v)
          and len(set(v)) == len(v), "use a list of distinct axes among heads, ffn, hidden, depth, e.g. [heads, ffn, "
          "hidden, depth]"),
    Check("pruning.budget", lambda v, _: v in ("params", "flops", "latency"), "use params, flops or latency"),
    Check("pruning.min_layers", lambda v, _: 0 < v <= 1, "use a fraction of the teacher's layers in (0, 1], e.g. 0.5"),
    Check("pruning.min_hidden", lambda v, _: 0 < v <= 1, "use a fraction of the teacher's hidden size in (0, 1], "
          "e.g. 0.5"),
    Check("pruning.axes", lambda v, cfg: not cfg.pruning.by_budget or cfg.teacher.placement != "sharded",
          "hidden and depth cuts need the teacher whole on the driver (teacher.placement: replicated or offline) "
          "for now: their channel and layer importance and the shapes' scores are not yet computed by the sharded "
          "teacher pass; use [heads, ffn]"),
    Check("pruning.axes", lambda v, cfg: not cfg.pruning.by_budget or cfg.search.strategy != "sandwich",
          "the sandwich strategy trains one shared network of nested widths; hidden and depth cuts are not nested "
          "in it: use another search.strategy, or axes [heads, ffn]"),
    Check("pruning.axes", lambda v, cfg: not cfg.pruning.by_budget or cfg.pruning.assistants == 1,
          "hidden and depth cuts chain one assistant for now; set pruning.assistants: 1"),
    Check("pruning.tradeoff", lambda v, _: v in ("paper", "retained"),
          "use paper (metric + lam * sparsity) or retained (the teacher's skill over chance kept + lam * sparsity)"),
    Check("task.data", _nonempty, "give a hub name (glue/sst2), a directory or a file"),
    Check("task.dev_fraction", _inside_0_1, "use a fraction in (0, 1), e.g. 0.1"),
    Check("task.validation_fraction", lambda v, _: 0.0 <= v < 1.0,
          "use a fraction in [0, 1) of the training rows to select on, e.g. 0.1 (0: select on the dev rows)"),
    Check("task.max_length", lambda v, _: v >= 8, "use at least 8 tokens, e.g. 128"),
    Check("task.max_train_samples", _null_or_at_least_one, "use a positive count or null"),
    Check("task.max_dev_samples", _null_or_at_least_one, "use a positive count or null"),
    Check("teacher.finetune", lambda v, _: v in ("auto", "always", "never"), "use one of auto, always, never"),
    Check("teacher.placement", lambda v, _: v in ("replicated", "sharded", "offline"),
          "use replicated (the whole teacher on every worker), sharded (FSDP2 over a chain stage's workers) or "
          "offline (its top-k logits precomputed)"),
    Check("teacher.top_k", _at_least_one, "keep 1 or more logits per position, e.g. 64"),
    Check("teacher.placement", lambda v, cfg: not (v == "offline" and cfg.task.regression),
          "a regression teacher has no logits to keep top-k of; use replicated"),
    Check("distill.kl_chunk", lambda v, _: v >= 0,
          "use 0 (the whole KL at once) or a positive number of positions per chunk, e.g. 256"),
    Check("pruning.student_sparsity", _inside_0_1, "use a sparsity in (0, 1), e.g. 0.9"),
    Check("pruning.grid", _nonempty, "list at least one candidate sparsity"),
    Check("pruning.grid", lambda v, _: len(set(v)) == len(v), "remove the duplicate sparsities"),
    Check("pruning.lam", lambda v, _: math.isfinite(v) and v >= 0, "use a non-negative lambda, e.g. 0.2"),
    Check("pruning.importance_samples", _at_least_one, "use a positive count, e.g. 512"),
    Check("search.strategy", lambda v, _: v in REGISTRY, lambda _: f"use one of {', '.join(REGISTRY)}"),
    Check("search.strategy",
          lambda v, cfg: cfg.teacher.placement != "offline" or v not in REGISTRY or REGISTRY[v].offline_teacher,
          lambda _: "with teacher.placement: offline only the lambda strategies train on the stored targets (the "
          f"others would load the teacher); use one of {_strategies(offline_teacher=True)}"),
    Check("search.strategy",
          lambda v, cfg: cfg.teacher.holds_whole_in_trials(cfg.search.trial_workers)
          or cfg.teacher.placement != "sharded" or v not in REGISTRY or REGISTRY[v].sharded_trials,
          lambda _: "with teacher.placement: sharded and search.trial_workers > 1 only the lambda strategies shard "
          "the teacher over a trial's workers (the others' trials hold it whole in one process); use one of "
          f"{_strategies(sharded_trials=True)}, or search.trial_workers: 1"),
    Check("search.points_per_round", _at_least_one, "use 1 (fewest evaluations) or more"),
    Check("search.max_concurrent_trials", _at_least_one, "use 1 or more"),
    Check("search.halving_steps", _null_or_at_least_one, "use 1 or more steps, or null for distill.steps"),
    Check("search.halving_min_fraction", lambda v, _: 0 < v <= 1,
          "use a fraction in (0, 1], e.g. 0.111 (the first rung at a ninth of halving_steps)"),
    Check("search.halving_reduction", lambda v, _: v >= 2, "use 2 or more (3 keeps a third)"),
    Check("search.halving_scheduler", lambda v, _: v in ("successive", "asha", "hyperband"),
          "use successive, asha or hyperband"),
    Check("search.shortlist", _at_least_one, "use 1 or more candidates"),
    Check("search.optuna_pruner", lambda v, _: v in ("hyperband", "successive-halving"),
          "use hyperband or successive-halving"),
    Check("distill.num_workers", _at_least_one, "use 1 or more Ray Train workers"),
    Check("distill.parallelism", lambda v, _: v in ("ddp", "fsdp"),
          "use ddp (replicate the student) or fsdp (shard it with FSDP2)"),
    Check("distill.direct_kd_budget", lambda v, _: v in ("matched", "stage"),
          "use matched (the TA path's steps) or stage (the student stage's steps)"),
    Check("distill.grad_accum", _at_least_one, "use 1 or more micro-batches per step"),
    Check("seed", lambda v, _: 0 <= v < 2**32, "use a seed in [0, 2**32), e.g. 42"),
    Check("pruning.batch_size", _at_least_one, "use a positive batch size, e.g. 32"),
    Check("search.optuna_trials", _at_least_one, "use a positive trial budget, e.g. 6"),
    Check("search.optuna_seed", lambda v, _: v is None or 0 <= v < 2**32, "use a seed in [0, 2**32) or null"),
    Check("search.trial_cpus", lambda v, _: v > 0, "use a positive CPU count per trial, e.g. 1"),
    Check("search.trial_gpus", lambda v, _: v >= 0, "use 0 (CPU trials) or a positive GPU fraction"),
    Check("search.trial_workers", _at_least_one,
          "use 1 (a trial in one process) or more Ray Train workers per trial"),
    Check("search.trial_workers",
          lambda v, cfg: v == 1 or cfg.search.strategy not in REGISTRY
          or REGISTRY[cfg.search.strategy].multi_worker_trials,
          lambda cfg: f"multi-worker trials recover candidates ({_strategies(multi_worker_trials=True)}); use 1 "
          f"with search.strategy: {cfg.search.strategy}"),
    Check("search.trial_workers", lambda v, cfg: cfg.recovery.batch_size % max(1, v) == 0,
          lambda cfg: "every worker takes an equal share of recovery.batch_size "
          f"({cfg.recovery.batch_size}); use a divisor of it"),
    Check("finetune.eval_every", _at_least_one, "evaluate every 1 or more steps, e.g. 100"),
    Check("distill.eval_every", _at_least_one, "evaluate every 1 or more steps, e.g. 50"),
    Check("distill.patience", _at_least_one, "use 1 or more evaluations without improvement"),
    Check("distill.cpus_per_worker", lambda v, _: v > 0, "use a positive CPU count, e.g. 1"),
    Check("distill.max_failures", lambda v, _: v >= 0, "use 0 (no retry) or more"),
    Check("tracking.experiment", _nonempty, "name the MLflow experiment, e.g. minidisc-ray"),
    Check("tracking.uri", lambda v, _: v is None or "://" in v or v.startswith(("sqlite:", "file:")),
          "use a tracking URI such as http://mlflow:5000 or sqlite:///path/mlflow.db, or null for OUTPUT/mlruns"),
    Check("search.optuna_storage", lambda v, _: v is None or "://" in v,
          "use an SQLAlchemy URL such as sqlite:///optuna.db or postgresql://host/db, or null for OUTPUT/optuna.db"),
    Check("ray.num_cpus", _null_or_at_least_one, "use 1 or more CPUs, or null for all"),
    Check("ray.address", lambda v, _: v is None or _address_ok(v),
          "use auto, HOST:PORT (the GCS port, e.g. 10.0.0.5:6379), ray://HOST:10001, or null for a local Ray"),
    *(check for section in ("finetune", "distill") for check in (
        Check(f"{section}.warmup_ratio", lambda v, _: 0.0 <= v < 1.0, "use a fraction in [0, 1), e.g. 0.1"),
        Check(f"{section}.weight_decay", lambda v, _: v >= 0, "use a non-negative weight decay, e.g. 0.01"),
    )),
    *(check for section in ("recovery", "distill") for check in (
        Check(f"{section}.temperature", lambda v, _: v > 0, "use a positive temperature, e.g. 1.0"),
        Check(f"{section}.hard_label_weight", lambda v, _: 0.0 <= v <= 1.0,
              "use a weight in [0, 1] (0: distillation loss only)"),
    )),
    EachItem("pruning.grid", (
        (lambda v, _: 0.0 <= v < 1.0 and math.isfinite(v), "each candidate sparsity must lie in [0, 1)"),
        (lambda v, cfg: v <= cfg.pruning.student_sparsity,
         lambda cfg: f"candidates must not exceed pruning.student_sparsity ({cfg.pruning.student_sparsity})"),
    )),
    *(check for section, steps in (("finetune", "max_steps"), ("recovery", "steps"), ("distill", "steps"))
      for check in (
        Check(f"{section}.{steps}", _at_least_one, "use a positive number of steps"),
        Check(f"{section}.batch_size", _at_least_one, "use a positive batch size, e.g. 32"),
        Check(f"{section}.lr", lambda v, _: v > 0, "use a positive learning rate, e.g. 1e-4"),
    )),
)


def check_values(cfg: Config, problems: list[UserInputError]) -> None:
    """Run :data:`CHECKS` on ``cfg``, appending a problem for each failed row. ``problems`` comes in holding the
    type problems found while building ``cfg``: a field among them (kept at its default) is not checked again."""
    typed = {problem.field for problem in problems}
    for check, value in _rows(cfg, typed):
        if check.field in typed:
            continue
        try:
            good = check.ok(value, cfg)
        except TypeError:  # a value of a type the row does not take: left to the type check
            continue
        if not good:
            problems.append(UserInputError(check.field, value, check.fix_text(cfg)))


def _rows(cfg: Config, typed: set[str]) -> Iterator[tuple[Check, object]]:
    """Every row of :data:`CHECKS` with the value it checks, the :class:`EachItem` rows spelled out per item."""
    for row in CHECKS:
        if isinstance(row, Check):
            yield row, _value(cfg, row.field)
            continue
        items = _value(cfg, row.field)
        if isinstance(items, list) and not any(field.startswith(row.field) for field in typed):
            for i, item in enumerate(items):
                yield from ((Check(f"{row.field}[{i}]", ok, fix), item) for ok, fix in row.checks)


def _value(cfg: Config, path: str) -> object:
    """The value at a dotted path; a tuple (``pruning.grid``) is quoted as the list the YAML gave."""
    value: object = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return list(value) if isinstance(value, tuple) else value
