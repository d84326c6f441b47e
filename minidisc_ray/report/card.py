"""The model card (``README.md``) written beside every model directory minidisc-ray exports."""

from __future__ import annotations

from typing import Any

from minidisc_ray.report.figures import PARAM_SPARSITY, UNIT_SPARSITY


def model_card(role: str, record: dict[str, Any], command: str) -> str:
    p = record["params"]
    lines = [f"# minidisc-ray {role}", "",
             f"Made by minidisc-ray (MiniDisc, arXiv 2205.14570) with: `{command}`", "",
             "| | value |", "|---|---|",
             f"| teacher | {record['teacher']} |",
             f"| assistant it learnt from | {record.get('assistant') or 'none'} |",
             f"| {UNIT_SPARSITY} | {record['sparsity']:.3f} |",
             f"| {PARAM_SPARSITY} | {record['param_sparsity']:.3f} |",
             f"| parameters | {p['total']:,} total, {p['prunable']:,} prunable (transformer layers) |",
             f"| dev {record['metric_name']} | {record['metric']:.4f} |",
             f"| task data | {record['task']['source']} |", "",
             "Load it with minidisc-ray (transformers cannot rebuild pruned shapes by itself):", "",
             "```python", "from minidisc_ray import load_model_dir",
             "model, tokenizer, record, _ = load_model_dir(PATH)", "```", "",
             "Or export it to files that run without minidisc-ray (each checked against this model's logits):", "",
             "```bash", "minidisc export PATH --format onnx --output PATH-onnx    # onnxruntime",
             "minidisc export PATH --format torch --output PATH-pt2    # torch.export.load(...).module()",
             "minidisc export PATH --format hf --output PATH-hf       # from_pretrained; uniform layouts only",
             "```", ""]
    return "\n".join(lines)
