"""``minidisc export``: a model directory of ours as files that run without minidisc-ray.

Formats:

* ``onnx``: one self-contained ``model.onnx`` (the dynamo exporter, opset 18; weights inside the file
  up to 2 GB, beside it above) with dynamic ``batch`` and ``sequence`` axes, inputs ``input_ids`` and
  ``attention_mask`` (int64), output ``logits``; tokenizer files and ``config.json`` (with
  ``id2label``) beside it. Runs in onnxruntime.
* ``torch``: a ``torch.export`` program, ``model.pt2`` (same inputs, dynamic axes), loaded with
  ``torch.export.load``.
* ``hf``: a stock transformers directory that ``from_pretrained`` loads, where the architecture can
  express the pruned shapes: decoders (Llama, Qwen2, Mistral) with the same number of key/value groups
  and MLP neurons in every layer (``pruning.layout: uniform``), any hidden size (``head_dim`` is written
  explicitly) and any depth; encoders (BERT family) with the same heads and FFN width in every layer whose
  heads x head size equal the kept hidden size (a BERT config ties the head size to
  ``hidden_size / num_attention_heads``: fewer heads of the same size are stock only with the hidden size cut
  to match, e.g. 9 of 12 heads of 32 over a 288-wide stream).

Every export is checked: the exported model's logits must match the source's on a probe batch, or the
export is refused and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minidisc_ray.axes import hidden_width
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import BertFamilyAdaptor, LlamaFamilyAdaptor, count_params, get_adaptor, unit_widths
from minidisc_ray.modelio.load import load_model_dir
from minidisc_ray.modelio.locate import RECORD, auto_class, kind_of, position_limit, read_record
from minidisc_ray.outputs import check_model_output, refuse_overlap, writing_model_dir

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel

FORMATS = ("onnx", "torch", "hf")
OPSET = 18
TOLERANCE = 1e-4
_TWO_GB = 2 * 1024**3


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the signature every exported format has."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out


def probe_batch(vocab: int, batch: int = 3, length: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with one padded row: exports are checked on padding too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    return ids, mask


def _dynamic(model: PreTrainedModel) -> dict[str, dict[int, Any]]:
    """Dynamic batch and sequence axes; the sequence is bounded by the model's position limit."""
    limit = position_limit(model)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=limit) if limit else torch.export.Dim("sequence")
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _reference(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return LogitsOnly(model)(ids, mask)


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = float((got.float() - want.float()).abs().max())
    if not diff <= TOLERANCE:
        raise UserInputError("--format", name, f"the exported model's logits differ from the source's by {diff:.2e} "
                             f"(> {TOLERANCE}); report this, and use another format meanwhile")
    return diff


def export_onnx(model: PreTrainedModel, out: Path) -> dict[str, Any]:
    import onnxruntime as ort  # deferred: the optional [export] extra, needed only for --format onnx

    ids, mask = probe_batch(int(model.config.vocab_size))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    program = torch.onnx.export(LogitsOnly(model).eval(), (ids, mask), dynamo=True, opset_version=OPSET,
                                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                dynamic_shapes=_dynamic(model), verbose=False)
    assert program is not None
    program.save(str(out / "model.onnx"), external_data=size >= _TWO_GB)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids2, mask2 = probe_batch(int(model.config.vocab_size), batch=2, length=17, seed=1)  # other shapes
    got = torch.from_numpy(session.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()})[0])
    return {"file": "model.onnx", "opset": OPSET, "max_abs_diff": _check("onnx", got, _reference(model, ids2, mask2)),
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "dynamic_axes": ["batch", "sequence"]}


def export_torch(model: PreTrainedModel, out: Path) -> dict[str, Any]:
    ids, mask = probe_batch(int(model.config.vocab_size))
    program = torch.export.export(LogitsOnly(model).eval(), (ids, mask), dynamic_shapes=_dynamic(model))
    torch.export.save(program, str(out / "model.pt2"))
    loaded = torch.export.load(str(out / "model.pt2"))
    ids2, mask2 = probe_batch(int(model.config.vocab_size), batch=2, length=17, seed=1)
    with torch.no_grad():
        got = loaded.module()(ids2, mask2)
    return {"file": "model.pt2", "max_abs_diff": _check("torch", got, _reference(model, ids2, mask2)),
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "dynamic_axes": ["batch", "sequence"]}


def stock_config(model: PreTrainedModel) -> Any:
    """The transformers config that describes ``model``'s pruned shapes natively, or a one-line refusal."""
    adaptor = get_adaptor(model)
    heads, neurons = (set(w) for w in unit_widths(model))
    config = copy.deepcopy(model.config)
    if len(heads) != 1 or len(neurons) != 1 or 0 in heads or 0 in neurons:
        raise UserInputError("--format", "hf", f"the layers keep different widths (heads {sorted(heads)}, neurons "
                             f"{sorted(neurons)[:4]}...) which a stock config cannot express; prune with "
                             "pruning.layout: uniform, or export onnx or torch")
    (h,), (n,) = heads, neurons
    width = hidden_width(model)  # a hidden cut keeps the teacher's hidden_size in our config (axes module doc)
    if isinstance(adaptor, LlamaFamilyAdaptor):
        group = adaptor.group_size(model)
        if width % (h * group):
            raise UserInputError("--format", "hf", f"the residual stream keeps {width} channels, not a multiple of the "
                                 f"{h * group} query heads kept, which transformers' config refuses; cut the hidden "
                                 f"size to a multiple of {h * group}, or export onnx or torch")
        config.head_dim = adaptor.head_dim(model)
        config.num_attention_heads = h * group
        config.num_key_value_heads = h
        config.intermediate_size = n
        config.hidden_size = width
    elif isinstance(adaptor, BertFamilyAdaptor):
        head_dim = adaptor.head_dim(model)
        if h * head_dim != width:
            raise UserInputError("--format", "hf", f"the encoder keeps {h} heads of {head_dim} over a residual "
                                 f"stream of {width}; a BERT config ties the head size to hidden_size / "
                                 f"num_attention_heads, so only heads x head size = hidden ({h * head_dim} here) "
                                 "is stock; export onnx or torch")
        config.num_attention_heads = h
        config.intermediate_size = n
        config.hidden_size = width
    else:  # pragma: no cover - every registered family is handled above
        raise UserInputError("--format", "hf", f"no stock layout for {type(adaptor).__name__}")
    return config


def export_hf(model: PreTrainedModel, out: Path) -> dict[str, Any]:
    config = stock_config(model)
    cls = auto_class(kind_of(model))
    with torch.device("meta"):
        stock = cls.from_config(config)
    stock.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        stock.tie_weights()
    stock.save_pretrained(str(out))
    reloaded = cls.from_pretrained(str(out), use_safetensors=True).eval()
    ids, mask = probe_batch(int(model.config.vocab_size), batch=2, length=17, seed=1)
    diff = _check("hf", _reference(reloaded, ids, mask), _reference(model, ids, mask))
    return {"file": "model.safetensors", "max_abs_diff": diff, "loads_with": f"{cls.__name__}.from_pretrained"}


CARD = """# {name} ({fmt})

Exported by `minidisc export` from `{source}` ({kind}; {params:,} parameters).
Logits match the source model within {diff:.1e} (max abs) on a padded probe batch.

```python
{usage}
```
"""

USAGE = {
    "onnx": """import onnxruntime as ort
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{out}")
session = ort.InferenceSession("{out}/model.onnx")
enc = tok(["some text"], return_tensors="np")
logits = session.run(None, {{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}})[0]""",
    "torch": """import torch
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{out}")
program = torch.export.load("{out}/model.pt2").module()
enc = tok(["some text"], return_tensors="pt")
logits = program(enc["input_ids"], enc["attention_mask"])""",
    "hf": """from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("{out}")
tok = AutoTokenizer.from_pretrained("{out}")""",
}


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' internal warnings (optional torchvision ops, axis renaming) are not the user's news."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_model(model_dir: str, fmt: str, output: str) -> dict[str, Any]:
    """Export ``model_dir`` to ``output`` in ``fmt``; written atomically, nothing on failure."""
    if fmt not in FORMATS:
        raise UserInputError("--format", fmt, f"use one of {', '.join(FORMATS)}")
    refuse_overlap(output, {"MODEL_DIR": model_dir})
    out = check_model_output(output)
    record = read_record(model_dir, "MODEL_DIR")
    task_type = (record.get("task", {}).get("config") or {}).get("type", "classification")
    model, tokenizer, _, _ = load_model_dir(model_dir, field="MODEL_DIR", kind="lm" if task_type == "lm"
                                            else "classification")
    model = model.float().eval()
    model.requires_grad_(False)
    with writing_model_dir(out) as tmp:
        with _quiet_exporters():
            info = {"onnx": export_onnx, "torch": export_torch, "hf": export_hf}[fmt](model, tmp)
        tokenizer.save_pretrained(str(tmp))
        if fmt != "hf":
            model.config.save_pretrained(str(tmp))  # id2label and the architecture's numbers, for reference
        kind = kind_of(model)
        usage = USAGE[fmt].format(out=str(out), auto=auto_class(kind).__name__)
        (tmp / "README.md").write_text(CARD.format(name=Path(model_dir).name, fmt=fmt, source=model_dir, kind=kind,
                                                   params=count_params(model)[1], diff=info["max_abs_diff"],
                                                   usage=usage))
        labels = getattr(model.config, "id2label", None) if kind != "lm" else None
        export_record = {"role": "export", "format": fmt, "source": str(model_dir), **info,
                         "id2label": {str(k): v for k, v in (labels or {}).items()},
                         "task": record.get("task"), "sparsity": record.get("sparsity")}
        (tmp / RECORD).write_text(json.dumps(export_record, indent=1, default=str))
    return {"output": str(out), **{k: v for k, v in export_record.items() if k not in ("task",)}}
