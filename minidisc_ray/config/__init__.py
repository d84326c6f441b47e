"""Typed, frozen run configuration loaded from YAML, with ``--set key=value`` overrides.

Validation collects every problem into one :class:`~minidisc_ray.errors.ConfigError`. YAML is read with a strict
``yaml.SafeLoader``: no tag or string in a config executes code. The sections are the frozen dataclasses of
:mod:`~minidisc_ray.config.schema`, their value checks the table of :mod:`~minidisc_ray.config.checks`, and
:mod:`~minidisc_ray.config.loading` reads, overrides, builds and validates.
"""

from __future__ import annotations

from minidisc_ray.config.checks import CHECKS, Check, EachItem, check_values
from minidisc_ray.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    config_from_dict,
    load_config,
    parse_overrides,
    safe_yaml,
)
from minidisc_ray.config.schema import (
    Config,
    DistillConfig,
    FinetuneConfig,
    PlainData,
    PruningConfig,
    RayConfig,
    RecoveryConfig,
    SearchConfig,
    TaskConfig,
    TeacherConfig,
    TrackingConfig,
)

__all__ = [
    "CHECKS",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_NODES",
    "Check",
    "Config",
    "DistillConfig",
    "EachItem",
    "FinetuneConfig",
    "PlainData",
    "PruningConfig",
    "RayConfig",
    "RecoveryConfig",
    "SearchConfig",
    "TaskConfig",
    "TeacherConfig",
    "TrackingConfig",
    "check_values",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "safe_yaml",
]
