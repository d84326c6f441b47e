"""Shared fixtures: tiny in-memory models and tokenizer (no download), local data paths, one Ray session."""

from __future__ import annotations

import os
import random
import string
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# records are signed with a key outside every output directory: the test session's own, not the user's,
# removed when the session ends
if "MINIDISC_RECORD_KEY_FILE" not in os.environ:
    _KEY_DIR = tempfile.TemporaryDirectory(prefix="minidisc-key-")
    os.environ["MINIDISC_RECORD_KEY_FILE"] = os.path.join(_KEY_DIR.name, "record.key")

REPO = Path(__file__).resolve().parents[1]


def tiny_bert(num_labels: int = 2, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64,
              seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(num_labels: int = 2, seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=130, num_labels=num_labels,
                        pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_llama(lm: bool = True, layers: int = 3, heads: int = 6, kv_heads: int = 2, hidden: int = 48,
               ffn: int = 64, num_labels: int = 2, seed: int = 0, tied: bool = False) -> torch.nn.Module:
    """A tiny random Llama with grouped-query attention (``heads`` query heads over ``kv_heads`` KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=256,
                      num_labels=num_labels, pad_token_id=0, tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg) if lm else LlamaForSequenceClassification(cfg)
    return model.eval()


def tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    """A tiny random Qwen2 (GQA with biased q/k/v projections)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases so that pruning them wrongly would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model.eval()


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    """A real WordPiece tokenizer over single characters (vocab < 128, fits the tiny models)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,'!?-"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars]]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def batch_with_padding(vocab: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def ray_session():  # type: ignore[no-untyped-def]
    """The test run's one embedded Ray (2 CPUs, loopback only): started by the first test that asks for it and
    kept for the rest, shut down when the run ends. A test that builds a cluster of its own
    (``ray.cluster_utils.Cluster``) shuts that down at its end; the next test here starts the shared one again."""
    import ray

    from minidisc_ray.config import RayConfig
    from minidisc_ray.ray_env import ensure_ray

    if not ray.is_initialized():
        ensure_ray(RayConfig(num_cpus=2))
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDISC_CACHE", str(tmp_path / "cache"))


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "\n".join(f"{t},{label}" for t, label in rows) + "\n")
    return path


@pytest.fixture()
def teacher(tmp_path: Path, tokenizer) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A tiny teacher model directory whose record names a small sentiment CSV, and that CSV."""
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(60))
    return save_tiny_teacher(tmp_path / "teacher", tokenizer, data=str(data)), data


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher model directory (seed 5, no task record, its own tokenizer), one per test module."""
    root = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(root / "teacher", make_tokenizer(root / "tok"), seed=5)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to show nothing was changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The CLI run in process: its exit code and what it wrote to stderr."""
    from minidisc_ray.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, *needles: str, code: int = 2) -> str:
    """A refusal: exit ``code``, exactly one ``minidisc: error:`` line, containing every needle, and no
    traceback. Returns that line."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("minidisc: error:")]
    assert rc == code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class _Planted:
    """A pickle whose unpickling writes ``marker``: proof that it was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (Path(self.marker), "pickle ran"))


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The logits and every hidden state of ``model`` on ``batch`` (no grad)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return (out.logits, *out.hidden_states)


def sentiment_rows(n: int = 60) -> list[tuple[str, str]]:
    good = ["great fun", "lovely film", "a joy", "superb acting", "wonderful"]
    bad = ["dull mess", "awful plot", "boring", "a bore", "terrible film"]
    return [(good[i % 5] if i % 2 else bad[i % 5], "pos" if i % 2 else "neg") for i in range(n)]


def save_tiny_teacher(directory: Path, tok: BertTokenizerFast, num_labels: int = 2, data: str | None = None,
                      seed: int = 0) -> Path:
    """A tiny BERT saved as a model directory with a task record (as `minidisc finetune` writes)."""
    from minidisc_ray.modelio.load import save_model_dir

    record = None
    if data is not None:
        record = {"role": "teacher", "task": {"num_labels": num_labels, "config": {
            "data": data, "text_column": "text", "label_column": "label", "max_length": 32}}}
    return save_model_dir(tiny_bert(num_labels=num_labels, seed=seed), tok, directory, record=record)


_POSITIVE = ["great", "lovely", "superb", "joyful", "moving", "clever", "warm", "bright", "fine", "fresh"]
_NEGATIVE = ["dull", "awful", "boring", "messy", "tired", "flat", "weak", "grim", "stale", "bland"]
_FILLER = ["the", "film", "plot", "a", "cast", "story", "was", "and", "its", "score", "very", "quite"]


def synthetic_sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 8))]
    mood = _POSITIVE if positive else _NEGATIVE
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(mood))
    return " ".join(words)


def make_glue_dir(directory: Path, kind: str = "single", n_train: int = 400, n_dev: int = 120,
                  seed: int = 0) -> Path:
    """A small GLUE-format task directory (SST-2 style single sentences or RTE style pairs) made here.

    Tests use it instead of ../shared, so a bare clone runs every test. Labels follow the words (a
    learnable task); the files use GLUE's own TSV columns.
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"] if kind == "single" else ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            positive = rng.random() < 0.5
            if kind == "single":
                lines.append(f"{synthetic_sentence(rng, positive)}\t{int(positive)}")
            else:
                premise = synthetic_sentence(rng, positive)
                hypothesis = synthetic_sentence(rng, positive if rng.random() < 0.5 else not positive)
                same = (any(w in premise for w in _POSITIVE) == any(w in hypothesis for w in _POSITIVE))
                lines.append(f"{i}\t{premise}\t{hypothesis}\t{'entailment' if same else 'not_entailment'}")
        (directory / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SST-2-shaped data made by the tests (400 train / 120 dev)."""
    return make_glue_dir(tmp_path_factory.mktemp("glue") / "SST-2")


@pytest.fixture(scope="session")
def rte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RTE-shaped sentence pairs made by the tests (200 train / 60 dev)."""
    return make_glue_dir(tmp_path_factory.mktemp("glue") / "RTE", kind="pair", n_train=200, n_dev=60)


def tiny_search_payload(train, dev, tokenizer, recovery_steps: int = 3):  # type: ignore[no-untyped-def]
    """A search payload over a tiny random teacher (seed 4) and tokenised splits: what a candidate
    evaluation or a study trial needs, without Ray."""
    from minidisc_ray.candidates import SearchPayload
    from minidisc_ray.config import RecoveryConfig
    from minidisc_ray.data import make_loader
    from minidisc_ray.families import count_params
    from minidisc_ray.modelio.blobs import model_blob
    from minidisc_ray.pruning import compute_importance

    teacher = tiny_bert(seed=4)
    imp = compute_importance(teacher, make_loader(train.select(range(32)), tokenizer, 16))
    prunable, _ = count_params(teacher)
    return SearchPayload(model_blob(teacher), tokenizer, imp, train.with_format(None).data.table,
                         dev.with_format(None).data.table, "accuracy", False, prunable, (8, 128), 0.2,
                         RecoveryConfig(steps=recovery_steps, batch_size=8), 0.9, seed=1)
