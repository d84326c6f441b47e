"""minidisc-ray: MiniDisc teacher-assistant scheduling and distillation on Ray (arXiv 2205.14570)."""

from __future__ import annotations

from minidisc_ray.config import Config, load_config
from minidisc_ray.errors import ConfigError, MinidiscError, UserInputError
from minidisc_ray.families import count_params, get_adaptor
from minidisc_ray.losses import minidisc_loss
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.pruning import Importance, PruningPlan, compute_importance, plan_for_sparsity, prune_model
from minidisc_ray.tradeoff import lambda_tradeoff

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Importance",
    "MinidiscError",
    "PruningPlan",
    "UserInputError",
    "compute_importance",
    "count_params",
    "get_adaptor",
    "lambda_tradeoff",
    "load_config",
    "load_model_dir",
    "minidisc_loss",
    "plan_for_sparsity",
    "prune_model",
    "save_model_dir",
]
