"""Typed, frozen run configuration loaded from YAML, with ``--set key=value`` overrides.

Validation collects every problem into one :class:`~minidisc_ray.errors.ConfigError`. YAML is read
with ``yaml.safe_load``: no tag or string in a config executes code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minidisc_ray.errors import ConfigError, UserInputError
from minidisc_ray.search.strategies import REGISTRY, names


@dataclass(frozen=True)
class TaskConfig:
    """Where the task data comes from and how to read it.

    ``data`` is a hub name (``glue/sst2``), a local GLUE-format directory (train.tsv/dev.tsv), a
    file (csv/tsv/json/jsonl/parquet/txt), or ``package://PKG/path/in/package`` for data shipped
    inside an installed Python package (read by path; the package is never imported).

    ``type`` is ``classification`` (labels; GLUE metrics) or ``lm`` (language modelling on the text
    column: texts are packed into blocks of ``max_length`` tokens, the metric is the perplexity score
    of :func:`minidisc_ray.metrics.lm_score`).
    """

    type: str = "classification"
    data: str = "glue/sst2"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"
    dev_fraction: float = 0.1
    max_train_samples: int | None = None
    max_dev_samples: int | None = None
    max_length: int = 128
    regression: bool = False


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: ``minilm`` (the embedded all-MiniLM-L6-v2), a local directory, or a hub id."""

    model: str = "minilm"
    finetune: str = "auto"  # auto | always | never
    trust_remote_code: bool = False
    # where the frozen teacher of every stage and trial lives: replicated (whole on every worker) | sharded
    # (FSDP2 over the workers of a chain stage, and of a search trial when search.trial_workers > 1, read shard
    # by shard from its safetensors; the candidate too is cut from the shards) | offline (its top-k logits per
    # position computed once with Ray Data and read back); `minidisc plan` recommends one
    placement: str = "replicated"
    top_k: int = 64  # offline: logits kept per position (the KL is taken on the teacher's top-k support)

    def holds_whole_in_trials(self, trial_workers: int) -> bool:
        """Whether a search trial process holds the whole teacher (False: offline targets, or sharded over a
        multi-worker trial)."""
        return self.placement == "replicated" or (self.placement == "sharded" and trial_workers <= 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimisation of the teacher's fine-tuning stage."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 100


@dataclass(frozen=True)
class PruningConfig:
    """Importance estimation and the candidate grid of teacher-assistant sparsities."""

    importance: str = "gradient"  # gradient (|d loss / d mask|) | activation (no backward pass)
    layout: str = "global"  # global (rank units across layers) | uniform (same width in every layer)
    importance_samples: int = 512
    batch_size: int = 32
    grid: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    student_sparsity: float = 0.9
    lam: float = 0.2
    assistants: int = 1  # teacher assistants chained; each next one searched between the previous and the student
    tradeoff: str = "paper"  # paper (metric + lam * sparsity) | retained (share of the teacher's skill over chance)


@dataclass(frozen=True)
class RecoveryConfig:
    """Budget of the short distillation that recovers each candidate before it is scored."""

    steps: int = 60
    batch_size: int = 32
    lr: float = 1e-4
    temperature: float = 1.0
    hard_label_weight: float = 0.0


@dataclass(frozen=True)
class SearchConfig:
    """How the teacher assistant is chosen."""

    # auto: the lambda search, then a halving round on the student's dev metric among its shortlist and "no
    # assistant" (minidisc study, three tasks: about half of exhaustive's cost, never more than 0.3 pt below direct
    # KD); bisection: the lambda search alone (the paper's; about 0.8 of auto's cost)
    strategy: str = "auto"
    points_per_round: int = 2
    sweep: bool = True  # bisection: check the largest unevaluated gaps within the unimodal bound
    max_concurrent_trials: int = 2
    optuna_trials: int = 6
    optuna_seed: int | None = None  # TPE sampler seed (default: the job's seed)
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    # > 1: a candidate trial is a Ray Train TorchTrainer of this many workers (FSDP) inside the Tune trial,
    # sharing trial_cpus and trial_gpus; for candidates that do not fit one device (see `minidisc plan`)
    trial_workers: int = 1
    # Optuna RDB storage for the optuna strategy: default SQLite in the output directory (OUTPUT/optuna.db);
    # any SQLAlchemy URL (postgresql://...) for a study shared across a cluster
    optuna_storage: str | None = None
    # halving / auto: trial distillation of arms (assistants and "no assistant") stopped early by a Tune scheduler
    halving_steps: int | None = None  # student-link steps at the last rung (default: distill.steps)
    halving_min_fraction: float = 1 / 9  # the first rung, as a fraction of halving_steps
    halving_reduction: int = 3  # arms kept per rung: 1 / reduction; rungs grow by this factor
    # successive (synchronous successive halving: one Tune experiment per rung, done when one arm is left) |
    # asha (Tune's AsyncHyperBandScheduler) | hyperband (Tune's HyperBandScheduler)
    halving_scheduler: str = "successive"
    shortlist: int = 3  # auto: the lambda search's best candidates that enter the halving round
    optuna_pruner: str = "hyperband"  # optuna-kd: hyperband (HyperbandPruner) | successive-halving


@dataclass(frozen=True)
class DistillConfig:
    """The teacher -> TA -> student chain on Ray Train."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 1.0
    hard_label_weight: float = 0.0
    eval_every: int = 50
    patience: int = 4
    num_workers: int = 1
    parallelism: str = "ddp"  # ddp (replicated student) | fsdp (student sharded with FSDP2)
    grad_accum: int = 1
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the rest in the backward pass
    kl_chunk: int = 0  # > 0: the vocabulary-sized KL over this many positions at a time (each chunk recomputed)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    baseline_direct_kd: bool = True
    # matched: the direct-KD student trains as many steps as the TA path's two stages together (the same
    # compute budget, the honest comparison); stage: as many as the student stage alone
    direct_kd_budget: str = "matched"

    def what_it_computes(self) -> dict[str, Any]:
        """The fields that decide what a stage computes, for the keys its results are recorded under.
        Placement (workers, parallelism, device, CPUs), the memory savers (checkpointing and the chunked KL
        recompute what they drop), retries and the baseline's settings change how or whether a stage runs, not
        its result: an interrupted stage resumes under another placement
        (DCP reshards), so they stay out."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("num_workers", "parallelism", "use_gpu", "cpus_per_worker", "max_failures",
                             "baseline_direct_kd", "direct_kd_budget", "activation_checkpointing", "kl_chunk")}


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: MLflow, off by default; nothing is sent anywhere unless ``uri`` says so."""

    mlflow: bool = False
    uri: str | None = None  # default: sqlite under OUTPUT/mlruns
    experiment: str = "minidisc-ray"


@dataclass(frozen=True)
class RayConfig:
    """Where Ray runs: ``address`` (or ``RAY_ADDRESS``) joins a cluster, else Ray starts embedded."""

    address: str | None = None
    num_cpus: int | None = None
    storage_path: str | None = None


@dataclass(frozen=True)
class Config:
    """A whole minidisc-ray job."""

    seed: int = 42
    output_dir: str = "runs/default"
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON serialisable)."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_INVALID = object()  # what _coerce returns for a value it recorded a problem for


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str, problems: list[UserInputError]) -> Any:
    """Check ``value`` against annotation ``tp``; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(UserInputError(path, value, "give a YAML list, e.g. [0.5, 0.7, 0.9]"))
            return _INVALID
        (item_tp, _) = typing.get_args(tp)
        items = tuple(_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value))
        return _INVALID if any(v is _INVALID for v in items) else items
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(UserInputError(path, value, "use a finite number"))
            return _INVALID
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    problems.append(UserInputError(path, value, f"expected {_type_name(tp)}"))
    return _INVALID


def _build(cls: Any, data: Any, path: str, problems: list[UserInputError]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(UserInputError(path or "config", data, "expected a mapping of fields"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(
                UserInputError(full, key, f"unknown key; use one of {', '.join(sorted(names))}")
            )
            continue
        value = _coerce(value, hints[key], full, problems)
        if value is not _INVALID:  # a field with a recorded problem keeps its default, so later checks can run
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return cls()


def _check_values(cfg: Config, problems: list[UserInputError]) -> None:
    """Range checks; a field whose type was already wrong is skipped (its problem is recorded)."""
    checks: list[tuple[str, Any, Any, str]] = []  # (field, value, is_ok(value), fix)
    t, p, se = cfg.task, cfg.pruning, cfg.search
    checks += [
        ("task.type", t.type, lambda v: v in ("classification", "lm"),
         "use classification (labelled text) or lm (language modelling)"),
        ("task.regression", t.regression, lambda v: not (v and t.type == "lm"),
         "language modelling has no regression labels; set it to false"),
        ("pruning.importance", p.importance, lambda v: v in ("gradient", "activation"),
         "use gradient (the paper's Taylor score) or activation (no backward pass)"),
        ("pruning.layout", p.layout, lambda v: v in ("global", "uniform"),
         "use global (rank units across layers) or uniform (the same width in every layer)"),
        ("pruning.assistants", p.assistants, lambda v: 1 <= v <= 8,
         "use 1 (the paper) to 8; each further assistant is searched between the previous one and the student"),
        ("pruning.tradeoff", p.tradeoff, lambda v: v in ("paper", "retained"),
         "use paper (metric + lam * sparsity) or retained (the teacher's skill over chance kept + lam * sparsity)"),
        ("task.data", t.data, bool, "give a hub name (glue/sst2), a directory or a file"),
        ("task.dev_fraction", t.dev_fraction, lambda v: 0.0 < v < 1.0, "use a fraction in (0, 1), e.g. 0.1"),
        ("task.max_length", t.max_length, lambda v: v >= 8, "use at least 8 tokens, e.g. 128"),
        ("task.max_train_samples", t.max_train_samples, lambda v: v is None or v >= 1, "use a positive count or null"),
        ("task.max_dev_samples", t.max_dev_samples, lambda v: v is None or v >= 1, "use a positive count or null"),
        ("teacher.finetune", cfg.teacher.finetune, lambda v: v in ("auto", "always", "never"),
         "use one of auto, always, never"),
        ("teacher.placement", cfg.teacher.placement, lambda v: v in ("replicated", "sharded", "offline"),
         "use replicated (the whole teacher on every worker), sharded (FSDP2 over a chain stage's workers) or "
         "offline (its top-k logits precomputed)"),
        ("teacher.top_k", cfg.teacher.top_k, lambda v: v >= 1, "keep 1 or more logits per position, e.g. 64"),
        ("teacher.placement", cfg.teacher.placement, lambda v: not (v == "offline" and t.regression),
         "a regression teacher has no logits to keep top-k of; use replicated"),
        ("distill.kl_chunk", cfg.distill.kl_chunk, lambda v: v >= 0, "use 0 (the whole KL at once) or a positive "
         "number of positions per chunk, e.g. 256"),
        ("pruning.student_sparsity", p.student_sparsity, lambda v: 0.0 < v < 1.0, "use a sparsity in (0, 1), e.g. 0.9"),
        ("pruning.grid", list(p.grid), bool, "list at least one candidate sparsity"),
        ("pruning.grid", list(p.grid), lambda v: len(set(v)) == len(v), "remove the duplicate sparsities"),
        ("pruning.lam", p.lam, lambda v: math.isfinite(v) and v >= 0, "use a non-negative lambda, e.g. 0.2"),
        ("pruning.importance_samples", p.importance_samples, lambda v: v >= 1, "use a positive count, e.g. 512"),
        ("search.strategy", se.strategy, lambda v: v in REGISTRY, f"use one of {', '.join(REGISTRY)}"),
        ("search.strategy", se.strategy,
         lambda v: cfg.teacher.placement != "offline" or v not in REGISTRY or REGISTRY[v].offline_teacher,
         "with teacher.placement: offline only the lambda strategies train on the stored targets (the others would "
         f"load the teacher); use one of {', '.join(names(offline_teacher=True))}"),
        ("search.strategy", se.strategy,
         lambda v: cfg.teacher.holds_whole_in_trials(se.trial_workers) or cfg.teacher.placement != "sharded"
         or v not in REGISTRY or REGISTRY[v].sharded_trials,
         "with teacher.placement: sharded and search.trial_workers > 1 only the lambda strategies shard the teacher "
         "over a trial's workers (the others' trials hold it whole in one process); use one of "
         f"{', '.join(names(sharded_trials=True))}, or search.trial_workers: 1"),
        ("search.points_per_round", se.points_per_round, lambda v: v >= 1, "use 1 (fewest evaluations) or more"),
        ("search.max_concurrent_trials", se.max_concurrent_trials, lambda v: v >= 1, "use 1 or more"),
        ("search.halving_steps", se.halving_steps, lambda v: v is None or v >= 1, "use 1 or more steps, or null "
         "for distill.steps"),
        ("search.halving_min_fraction", se.halving_min_fraction, lambda v: 0 < v <= 1, "use a fraction in (0, 1], "
         "e.g. 0.111 (the first rung at a ninth of halving_steps)"),
        ("search.halving_reduction", se.halving_reduction, lambda v: v >= 2, "use 2 or more (3 keeps a third)"),
        ("search.halving_scheduler", se.halving_scheduler, lambda v: v in ("successive", "asha", "hyperband"),
         "use successive, asha or hyperband"),
        ("search.shortlist", se.shortlist, lambda v: v >= 1, "use 1 or more candidates"),
        ("search.optuna_pruner", se.optuna_pruner, lambda v: v in ("hyperband", "successive-halving"),
         "use hyperband or successive-halving"),
        ("distill.num_workers", cfg.distill.num_workers, lambda v: v >= 1, "use 1 or more Ray Train workers"),
        ("distill.parallelism", cfg.distill.parallelism, lambda v: v in ("ddp", "fsdp"),
         "use ddp (replicate the student) or fsdp (shard it with FSDP2)"),
        ("distill.direct_kd_budget", cfg.distill.direct_kd_budget, lambda v: v in ("matched", "stage"),
         "use matched (the TA path's steps) or stage (the student stage's steps)"),
        ("distill.grad_accum", cfg.distill.grad_accum, lambda v: v >= 1, "use 1 or more micro-batches per step"),
        ("seed", cfg.seed, lambda v: 0 <= v < 2**32, "use a seed in [0, 2**32), e.g. 42"),
        ("pruning.batch_size", p.batch_size, lambda v: v >= 1, "use a positive batch size, e.g. 32"),
        ("search.optuna_trials", se.optuna_trials, lambda v: v >= 1, "use a positive trial budget, e.g. 6"),
        ("search.optuna_seed", se.optuna_seed, lambda v: v is None or 0 <= v < 2**32,
         "use a seed in [0, 2**32) or null"),
        ("search.trial_cpus", se.trial_cpus, lambda v: v > 0, "use a positive CPU count per trial, e.g. 1"),
        ("search.trial_gpus", se.trial_gpus, lambda v: v >= 0, "use 0 (CPU trials) or a positive GPU fraction"),
        ("search.trial_workers", se.trial_workers, lambda v: v >= 1, "use 1 (a trial in one process) or more "
         "Ray Train workers per trial"),
        ("search.trial_workers", se.trial_workers,
         lambda v: v == 1 or se.strategy not in REGISTRY or REGISTRY[se.strategy].multi_worker_trials,
         f"multi-worker trials recover candidates ({', '.join(names(multi_worker_trials=True))}); use 1 with "
         f"search.strategy: {se.strategy}"),
        ("search.trial_workers", se.trial_workers, lambda v: cfg.recovery.batch_size % max(1, v) == 0,
         f"every worker takes an equal share of recovery.batch_size ({cfg.recovery.batch_size}); use a divisor "
         "of it"),
        ("finetune.eval_every", cfg.finetune.eval_every, lambda v: v >= 1, "evaluate every 1 or more steps, e.g. 100"),
        ("distill.eval_every", cfg.distill.eval_every, lambda v: v >= 1, "evaluate every 1 or more steps, e.g. 50"),
        ("distill.patience", cfg.distill.patience, lambda v: v >= 1, "use 1 or more evaluations without improvement"),
        ("distill.cpus_per_worker", cfg.distill.cpus_per_worker, lambda v: v > 0, "use a positive CPU count, e.g. 1"),
        ("distill.max_failures", cfg.distill.max_failures, lambda v: v >= 0, "use 0 (no retry) or more"),
        ("tracking.experiment", cfg.tracking.experiment, bool, "name the MLflow experiment, e.g. minidisc-ray"),
        ("tracking.uri", cfg.tracking.uri, lambda v: v is None or "://" in v or v.startswith(("sqlite:", "file:")),
         "use a tracking URI such as http://mlflow:5000 or sqlite:///path/mlflow.db, or null for OUTPUT/mlruns"),
        ("search.optuna_storage", se.optuna_storage, lambda v: v is None or "://" in v,
         "use an SQLAlchemy URL such as sqlite:///optuna.db or postgresql://host/db, or null for OUTPUT/optuna.db"),
        ("ray.num_cpus", cfg.ray.num_cpus, lambda v: v is None or v >= 1, "use 1 or more CPUs, or null for all"),
        ("ray.address", cfg.ray.address, lambda v: v is None or _address_ok(v),
         "use auto, HOST:PORT (the GCS port, e.g. 10.0.0.5:6379), ray://HOST:10001, or null for a local Ray"),
    ]
    for section in ("finetune", "distill"):
        sub = getattr(cfg, section)
        checks += [
            (f"{section}.warmup_ratio", sub.warmup_ratio, lambda v: 0.0 <= v < 1.0,
             "use a fraction in [0, 1), e.g. 0.1"),
            (f"{section}.weight_decay", sub.weight_decay, lambda v: v >= 0,
             "use a non-negative weight decay, e.g. 0.01"),
        ]
    for section in ("recovery", "distill"):
        sub = getattr(cfg, section)
        checks += [
            (f"{section}.temperature", sub.temperature, lambda v: v > 0, "use a positive temperature, e.g. 1.0"),
            (f"{section}.hard_label_weight", sub.hard_label_weight, lambda v: 0.0 <= v <= 1.0,
             "use a weight in [0, 1] (0: distillation loss only)"),
        ]
    grid_broken = any(prob.field.startswith("pruning.grid") for prob in problems)
    for i, s in enumerate(() if grid_broken else p.grid):
        checks.append((f"pruning.grid[{i}]", s, lambda v: 0.0 <= v < 1.0 and math.isfinite(v),
                       "each candidate sparsity must lie in [0, 1)"))
        checks.append((f"pruning.grid[{i}]", s, lambda v: v <= p.student_sparsity,
                       f"candidates must not exceed pruning.student_sparsity ({p.student_sparsity})"))
    for section, steps_field in (("finetune", "max_steps"), ("recovery", "steps"), ("distill", "steps")):
        sub = getattr(cfg, section)
        checks += [
            (f"{section}.{steps_field}", getattr(sub, steps_field), lambda v: v >= 1, "use a positive number of steps"),
            (f"{section}.batch_size", sub.batch_size, lambda v: v >= 1, "use a positive batch size, e.g. 32"),
            (f"{section}.lr", sub.lr, lambda v: v > 0, "use a positive learning rate, e.g. 1e-4"),
        ]
    typed = {prob.field for prob in problems}
    for field_, value, ok, fix in checks:
        if field_ in typed:
            continue
        try:
            good = ok(value)
        except TypeError:
            continue
        if not good:
            problems.append(UserInputError(field_, value, fix))


def _address_ok(address: str) -> bool:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (what ``ray.init(address=...)`` accepts)."""
    if address == "auto":
        return True
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    return bool(sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "task.data=DIR"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise UserInputError("--set", item, "write --set key=value, e.g. --set task.data=../data/SST-2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if value is not None and not isinstance(value, (int, float, bool, list, dict)):
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError("--set", item, f"{part} is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config`; raise :class:`ConfigError` listing every problem."""
    problems: list[UserInputError] = []
    cfg = _build(Config, data, "", problems)
    _check_values(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(Config, cfg)


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; a megabyte is generous
MAX_CONFIG_NODES = 20_000  # YAML nodes after aliases are expanded (an alias bomb expands to billions)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes the document has once every alias is expanded (memoised: linear in the graph)."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        memo[id(n)] = limit + 1  # a node reached again while being sized is a recursive alias: too big
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v) for v in n.value)
        memo[id(n)] = min(total, limit + 1)
        return memo[id(n)]

    return size(node)


def safe_yaml(text: str, field: str, source: str) -> Any:
    """Parse YAML without running code, refusing duplicate keys and documents that expand past
    :data:`MAX_CONFIG_NODES` nodes (alias bombs); every problem is one :class:`UserInputError`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        if _expanded_nodes(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise UserInputError(field, source, f"the YAML expands to more than {MAX_CONFIG_NODES:,} values "
                                 "(aliases nested in aliases?); write the config out plainly")
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    except _DuplicateKey as exc:
        raise UserInputError(field, source, f"key {exc.key!r} is given twice (line {exc.line}); YAML would keep only "
                             "the last one: merge the two into one") from None
    except RecursionError:
        raise UserInputError(field, source, "the YAML nests too deeply; write the config out plainly") from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError("CONFIG", str(path), "give the path of a YAML file, e.g. search_spaces/default.yaml")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserInputError("CONFIG", str(path), f"the file is over {MAX_CONFIG_BYTES // 1024} KiB; a config is a "
                             "page of YAML (put data in task.data, not in the config)")
    try:
        data = safe_yaml(p.read_text(encoding="utf-8"), "CONFIG", str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserInputError("CONFIG", str(path), f"fix the YAML syntax{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError("CONFIG", str(path), "the YAML top level must be a mapping of sections")
    return config_from_dict(_merge(data, parse_overrides(overrides)))
