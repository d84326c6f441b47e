"""`minidisc export`: ONNX, torch.export and stock HF directories that run without minidisc-ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidisc_ray.errors import UserInputError
from minidisc_ray.export import export_model, probe_batch
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.pruning import PruningPlan, compute_importance, plan_for_sparsity, prune_model

from .conftest import make_tokenizer, tiny_bert, tiny_llama
from .test_decoders import lm_batches

# runs in a fresh interpreter where `import minidisc_ray` fails: only onnxruntime, numpy and transformers
ONNX_CHECK = """
import json, sys
sys.modules["minidisc_ray"] = None
try:
    import minidisc_ray  # noqa
    raise SystemExit("minidisc_ray importable")
except ImportError:
    pass
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
enc = tok(["a lovely film", "dull"], padding=True, return_tensors="np")
sess = ort.InferenceSession(out + "/model.onnx")
logits = sess.run(None, {"input_ids": enc["input_ids"].astype("int64"),
                         "attention_mask": enc["attention_mask"].astype("int64")})[0]
labels = json.load(open(out + "/config.json"))["id2label"]
print(json.dumps({"logits": logits.tolist(), "ids": enc["input_ids"].tolist(), "mask": enc["attention_mask"].tolist(),
                  "labels": [labels[str(int(i))] for i in logits.argmax(-1)]}))
"""


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    teacher = tiny_bert(seed=2)
    teacher.config.id2label, teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    student = prune_model(teacher, PruningPlan([[3, 0], [1]], [list(range(40)), list(range(7))]))
    return save_model_dir(student, make_tokenizer(root / "tok"), root / "student",
                          plan=PruningPlan([[3, 0], [1]], [list(range(40)), list(range(7))]),
                          record={"role": "student", "sparsity": 0.5})


def test_onnx_runs_without_minidisc_and_matches_torch(tmp_path: Path, student_dir: Path) -> None:
    info = export_model(str(student_dir), "onnx", str(tmp_path / "onnx"))
    assert info["opset"] == 18
    assert info["max_abs_diff"] <= 1e-4
    assert info["id2label"] == {"0": "neg", "1": "pos"}
    run = subprocess.run([sys.executable, "-c", ONNX_CHECK, str(tmp_path / "onnx")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    model, *_ = load_model_dir(str(student_dir))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(got["ids"]), attention_mask=torch.tensor(got["mask"])).logits
    assert float((torch.tensor(got["logits"]) - want).abs().max()) <= 1e-4
    assert got["labels"] == [model.config.id2label[int(i)] for i in want.argmax(-1)]
    assert (tmp_path / "onnx" / "README.md").read_text().count("onnxruntime") >= 1


def test_torch_export_program_matches(tmp_path: Path, student_dir: Path) -> None:
    info = export_model(str(student_dir), "torch", str(tmp_path / "pt2"))
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2")).module()
    ids, mask = probe_batch(128, batch=4, length=9, seed=5)
    model, *_ = load_model_dir(str(student_dir))
    with torch.no_grad():
        assert float((program(ids, mask) - model(input_ids=ids, attention_mask=mask).logits).abs().max()) <= 1e-4
    assert info["max_abs_diff"] <= 1e-4


def test_hf_export_of_a_uniform_decoder_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    teacher = tiny_llama(layers=3, heads=6, kv_heads=3)
    plan = plan_for_sparsity(compute_importance(teacher, lm_batches(), method="activation"), 0.34, layout="uniform")
    assert plan.heads_per_layer == [2, 2, 2]
    assert len(set(plan.neurons_per_layer)) == 1
    tok = make_tokenizer(tmp_path / "tok")
    src = save_model_dir(prune_model(teacher, plan), tok, tmp_path / "uniform", plan=plan,
                         record={"role": "student", "task": {"config": {"type": "lm"}}})
    info = export_model(str(src), "hf", str(tmp_path / "hf"))
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # plain transformers, no minidisc loader
    assert stock.config.num_key_value_heads == 2
    assert stock.config.num_attention_heads == 4
    batch = lm_batches(1)[0]
    pruned, *_ = load_model_dir(str(src), kind="lm")
    with torch.no_grad():
        a = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((a - b).abs().max()) <= 1e-5
    assert info["max_abs_diff"] <= 1e-4


def test_hf_export_refuses_what_a_stock_config_cannot_hold(tmp_path: Path, student_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserInputError, match="stock config cannot express"):
        export_model(str(student_dir), "hf", str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists(), "nothing half-written"
    from minidisc_ray.cli import main

    assert main(["export", str(student_dir), "--format", "hf", "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "pruning.layout: uniform" in err
    assert err.startswith("minidisc: error: --format")
