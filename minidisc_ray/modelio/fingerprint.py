"""Digests that name weights: a teacher's files fingerprinted once (kept beside their sizes and times) and recovered
candidates kept under the digest a later reader checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from minidisc_ray.modelio.locate import (
    PLAN,
)
from minidisc_ray.modelio.weights import save_weights
from minidisc_ray.outputs import atomic_write_text
from minidisc_ray.records import sign, verify, warn_record


def files_fingerprint(directory: str | os.PathLike[str], cache: Path | None = None) -> str:
    """SHA-256 over ``directory``'s config.json, pruning plan and safetensors files (names and bytes): the
    weights' identity without loading them (a sharded teacher's, which no process holds whole).

    With ``cache`` (a JSON file, signed like the evaluation records) the digest is kept beside each file's path,
    size and modification time, and reused while none of them changed: a 70B teacher's 141 GB are read once,
    not on every run. A cache whose signature does not match is ignored (one warning) and rewritten."""
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
        body = {"files": stamp, "sha256": digest}
        atomic_write_text(cache, json.dumps({**body, "mac": sign(body)}))
    return digest


def file_sha256(path: str | os.PathLike[str]) -> str:
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
