"""``teacher.placement: offline``: the frozen teacher runs once, as Ray Data batch inference, and its top-k
logits per position are what every stage that distils from it reads back.

Why: a teacher that does not fit one GPU beside its student (Llama-3.1-70B: 131 GiB in bf16) need not sit
on any training worker at all. One pass over the training rows, spread over the cluster's GPUs
(``map_batches`` with one model replica per actor; the driver streams the results into one Parquet file),
writes per row and position the indices and logits
of the teacher's ``k`` largest logits and the log-sum-exp of all of them (at the distillation
temperature) to Parquet with pyarrow. The KD loss is then the KL on the teacher's top-k support with its
exact probabilities (:func:`~minidisc_ray.losses.sparse_logit_loss`; with ``k`` = the vocabulary it is the
online loss exactly). The hidden-state half of the MiniDisc loss needs the teacher's hidden states, which
are not stored (at 70B they would be ``layers x hidden`` floats per token): offline stages train on the
logit half alone.

The targets are keyed by the teacher's weights, the training rows, ``k`` and the temperature, and written
once into ``OUTPUT/offline_targets/KEY`` (atomically: a temporary sibling renamed into place, the
manifest written last): the first link and the direct-KD baseline, which share the teacher, read the same
files, and a rerun finds them. The pruned assistant that teaches the next link gets a pass of its own.
Stages read the files with pyarrow into row-indexed arrays (``k x 8 + 4`` bytes per position: 0.5 GiB per
million tokens at ``k`` = 64) and look up each batch's rows by their ``row_id``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from transformers import DataCollatorWithPadding

from minidisc_ray.errors import UserInputError
from minidisc_ray.logs import log
from minidisc_ray.losses import hard_label_loss, sparse_logit_loss, teacher_top_k
from minidisc_ray.modelio.blobs import model_from_blob
from minidisc_ray.outputs import new_temporary_sibling
from minidisc_ray.records import digest

ROW_ID = "row_id"
MANIFEST = "manifest.json"


def targets_key(teacher_fp: str, data_key: str, top_k: int, temperature: float) -> str:
    return digest("offline-targets", teacher_fp, data_key, int(top_k), float(temperature))[:24]


def with_row_ids(table: Any) -> Any:
    """The training table with a ``row_id`` column (its row numbers), how batches name their targets."""

    if ROW_ID in table.column_names:
        return table
    return table.append_column(ROW_ID, pa.array(np.arange(table.num_rows, dtype=np.int64)))


class _TopK:
    """One teacher replica of the Ray Data pass (an actor of ``map_batches``)."""

    def __init__(self, teacher: Any, tokenizer: Any, top_k: int, temperature: float, use_gpu: bool) -> None:

        blob = ray.get(teacher) if type(teacher).__name__ == "ObjectRef" else teacher
        self.model = model_from_blob(blob, trainable=False).eval()
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(torch.bfloat16)
        self.tokenizer, self.top_k, self.temperature = tokenizer, top_k, temperature

    @torch.no_grad()
    def __call__(self, batch: Any) -> Any:

        rows = batch.to_pylist()
        ids = [r.pop(ROW_ID) for r in rows]
        for r in rows:
            r.pop("labels", None)
        features = DataCollatorWithPadding(self.tokenizer)(rows)
        inputs = {k: v.to(self.device) for k, v in features.items() if k in ("input_ids", "attention_mask",
                                                                              "token_type_ids")}
        logits = self.model(**inputs).logits.float()
        if logits.dim() == 2:  # a classifier: one position per row
            logits = logits.unsqueeze(1)
        idx, val, lse = teacher_top_k(logits, self.top_k, self.temperature)
        positions = logits.shape[1]
        return pa.table({
            ROW_ID: pa.array(ids, type=pa.int64()),
            "positions": pa.array([positions] * len(ids), type=pa.int32()),
            "indices": pa.array([x.reshape(-1).tolist() for x in idx.to(torch.int32).cpu()], type=pa.list_(pa.int32())),
            "values": pa.array([x.reshape(-1).tolist() for x in val.cpu()], type=pa.list_(pa.float32())),
            "lse": pa.array([x.reshape(-1).tolist() for x in lse.float().cpu()], type=pa.list_(pa.float32())),
        })


def ensure_targets(root: Path, teacher_blob: Any, teacher_fp: str, train_table: Any, data_key: str, tokenizer: Any,
                   top_k: int, temperature: float, use_gpu: bool = False, replicas: int = 1,
                   batch_size: int = 32, who: str = "") -> tuple[Path, bool]:
    """The directory of the teacher's top-k targets over ``train_table``; written by one Ray Data pass if no
    earlier stage or run wrote it (a line in the log says which, for ``who``). Returns ``(directory,
    written_now)``."""
    t0 = time.perf_counter()
    where, written = _ensure_targets(root, teacher_blob, teacher_fp, train_table, data_key, tokenizer, top_k,
                                     temperature, use_gpu, replicas, batch_size)
    log(f"[offline teacher] {who + ': ' if who else ''}top-{top_k} targets "
        + (f"written by a Ray Data pass in {time.perf_counter() - t0:.1f}s" if written else "reused") + f": {where}")
    return where, written


def _ensure_targets(root: Path, teacher_blob: Any, teacher_fp: str, train_table: Any, data_key: str, tokenizer: Any,
                    top_k: int, temperature: float, use_gpu: bool, replicas: int,
                    batch_size: int) -> tuple[Path, bool]:

    target = root / "offline_targets" / targets_key(teacher_fp, data_key, top_k, temperature)
    if (target / MANIFEST).is_file():
        return target, False
    table = with_row_ids(train_table)
    replicas = max(1, min(replicas, table.num_rows))
    step = -(-table.num_rows // replicas)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    out = ds.map_batches(_TopK, fn_constructor_kwargs={"teacher": teacher_blob, "tokenizer": tokenizer, "top_k": top_k,
                                                       "temperature": temperature, "use_gpu": use_gpu},
                         batch_size=batch_size, batch_format="pyarrow", concurrency=replicas,
                         num_gpus=1 if use_gpu else 0, num_cpus=1)
    tmp = new_temporary_sibling(target)
    try:  # the driver streams the replicas' batches into one Parquet file as they come (pyarrow)
        writer = None
        for part in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(part, pa.Table)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp / "targets.parquet"), part.schema)
            writer.write_table(part)
        if writer is None:
            raise ValueError("the training split is empty: there is nothing to compute targets for")
        writer.close()
        (tmp / MANIFEST).write_text(json.dumps({"teacher": teacher_fp, "data": data_key, "top_k": top_k,
                                                "temperature": temperature, "rows": table.num_rows}) + "\n")
        if target.exists():  # never ours: a pass is renamed into place whole, manifest included; not removed
            raise UserInputError("output_dir", str(target), "this directory is not offline targets minidisc wrote "
                                 "(no manifest.json); move it away and run again")
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary directory made above
        raise
    return target, True


@dataclass
class OfflineTargets:
    """Row-indexed top-k targets read back from :func:`ensure_targets`' Parquet files."""

    indices: np.ndarray  # int32 [rows, positions, k]
    values: np.ndarray  # float32 [rows, positions, k]
    lse: np.ndarray  # float32 [rows, positions]
    temperature: float

    @classmethod
    def load(cls, directory: str | Path) -> OfflineTargets:

        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        table = pq.read_table(directory / "targets.parquet").sort_by(ROW_ID)
        n, k = table.num_rows, int(manifest["top_k"])
        if n != manifest["rows"] or not np.array_equal(table.column(ROW_ID).to_numpy(), np.arange(n)):
            raise ValueError(f"{directory}: the targets do not cover the training rows 0..{manifest['rows'] - 1}")
        positions = int(table.column("positions")[0].as_py())

        def flat(name: str) -> np.ndarray:
            return np.asarray(table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False))

        k = flat("indices").size // (n * positions)
        return cls(flat("indices").reshape(n, positions, k), flat("values").reshape(n, positions, k),
                   flat("lse").reshape(n, positions), float(manifest["temperature"]))

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = rows.cpu().numpy()
        return (torch.from_numpy(self.indices[r].astype(np.int64)).to(device),
                torch.from_numpy(self.values[r]).to(device), torch.from_numpy(self.lse[r]).to(device))


def offline_kd_loss_fn(targets: OfflineTargets, hard_label_weight: float = 0.0) -> Any:
    """The loop's loss for a student distilled from stored targets: half the top-k KL (the logit half of the
    MiniDisc loss; the hidden-state half has no stored teacher states), plus the optional hard-label term."""
    def loss(student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", ROW_ID)}
        logits = student(**inputs).logits
        per_token = logits.dim() == 3
        idx, val, lse = targets.batch(batch[ROW_ID], logits.device)
        if per_token:
            mask = batch["attention_mask"]
            kd = sparse_logit_loss(logits, idx, val, lse, targets.temperature, mask)
        else:
            kd = sparse_logit_loss(logits.unsqueeze(1), idx, val, lse, targets.temperature)
        total = 0.5 * kd
        if hard_label_weight and "labels" in batch:
            total = total + hard_label_weight * hard_label_loss(logits, batch["labels"], regression=False)
        return total

    return loss
