"""Weights on disk and the architecture they fill: an empty (meta-device) model cut to a plan, safetensors writing,
the pad token a decoder's tokenizer lacks."""

from __future__ import annotations

import copy
import errno
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from minidisc_ray.modelio.locate import (
    auto_class,
    kind_of,
)
from minidisc_ray.pruning import PruningPlan, prune_model

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel


def set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoders often ship without a padding token: pad with end-of-text (padding is masked anyway)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def empty_model(config: PretrainedConfig, heads: list[int] | None = None, neurons: list[int] | None = None,
                trust_remote_code: bool = False, kind: str | None = None, hidden: int | None = None) -> Any:
    """The architecture of ``config`` cut to ``heads``/``neurons`` per layer and to ``hidden`` residual channels,
    its parameters on the meta device (no memory, no random init); non-persistent buffers (position ids, rotary
    frequencies) are real, taken from a zero-layer model of the same config."""
    cls = auto_class(kind or kind_of(config))
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    if heads is not None and neurons is not None:
        model = prune_model(model, PruningPlan.prefix(list(heads), list(neurons), hidden_size=hidden),
                            share_unpruned=True, rebuild=True)
    if any(b.is_meta for b in model.buffers()):
        small = copy.deepcopy(config)
        small.num_hidden_layers = 0
        small.vocab_size = 8
        reference = dict(cls.from_config(
            small, trust_remote_code=trust_remote_code).named_buffers())
        for module_name, module in model.named_modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    full = f"{module_name}.{name}" if module_name else name
                    if full not in reference or reference[full].shape != buf.shape:
                        raise RuntimeError(f"cannot materialise buffer {full} of {type(model).__name__}")
                    module._buffers[name] = reference[full]
    return model


def save_weights(model: nn.Module, path: Path) -> None:
    """``safetensors.torch.save_model``, whose I/O failures (disk full, file too large) come back as the
    ``OSError`` they are, so the CLI reports them in one line."""
    try:
        save_model(model, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) if number in errno.errorcode else str(exc), str(path)) from None
