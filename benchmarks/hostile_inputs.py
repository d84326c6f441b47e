"""The hardening review's command-line cases, run against a checkout: how many give the promised behaviour
(one ``minidisc: error:`` line naming the field, exit 2 or 1, nothing written or replaced, no code run, no hang).

    python benchmarks/hostile_inputs.py                      # this checkout
    python benchmarks/hostile_inputs.py --repo /tmp/old      # another checkout (a git worktree of an old commit)
    python benchmarks/hostile_inputs.py --output benchmarks/results/hostile_inputs.json

Each case runs ``python -m minidisc_ray.cli`` from ``--repo`` in a subprocess with a time limit. The cases
that need a Ray job (a planted checkpoint pickle, edited evaluation records, SIGTERM, a killed trial) are
pinned by tests in ``tests/`` (``test_checkpoint_trust.py``, ``test_hardening.py``, ``test_search_ray.py``)
rather than here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import (  # noqa: E402
    make_tokenizer,
    save_tiny_teacher,
    sentiment_rows,
    snapshot,
    tiny_bert,
    write_csv,
)

Case = Callable[[Path, Path], tuple[bool, str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return add


def cli(repo: Path, work: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 60,
        preexec: Callable[[], None] | None = None) -> tuple[int | None, str, float]:
    t0 = time.perf_counter()
    full_env = {**os.environ, "MINIDISC_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", *argv], cwd=repo, capture_output=True,
                           text=True, env=full_env, timeout=timeout, preexec_fn=preexec)
        return p.returncode, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return None, "timed out", time.perf_counter() - t0


def one_line(rc: int | None, err: str, codes: tuple[int, ...] = (2,), needle: str = "") -> tuple[bool, str]:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("minidisc: error:")]
    ok = rc in codes and len(lines) == 1 and "Traceback" not in err and needle in (lines[0] if lines else "")
    return ok, (lines[0] if lines else err.strip().splitlines()[-1] if err.strip() else f"rc={rc}")[:200]


def teacher(work: Path) -> tuple[Path, Path]:
    data = write_csv(work / "reviews.csv", sentiment_rows(60))
    return save_tiny_teacher(work / "teacher", make_tokenizer(work / "tok"), data=str(data)), data


def tiny_config_json(work: Path, **changes: object) -> Path:
    data = tiny_bert().config.to_dict()
    data.update(changes)
    path = work / "config.json"
    path.write_text(json.dumps(data))
    return path


DEFAULT = "search_spaces/default.yaml"


@case("package:// with a dotted name imports nothing (validate)")
def _dotted(repo: Path, work: Path) -> tuple[bool, str]:
    marker = work / "imported"
    (work / "site" / "trap").mkdir(parents=True)
    (work / "site" / "trap" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
    rc, err, _ = cli(repo, work, "validate", DEFAULT, "--set", "task.data=package://trap.x/f.csv",
                     env={"PYTHONPATH": str(work / "site")})
    return not marker.exists() and rc == 2, "imported" if marker.exists() else one_line(rc, err)[1]


@case("package:// path leaving the package is refused")
def _escape(repo: Path, work: Path) -> tuple[bool, str]:
    (work / "site" / "pkg").mkdir(parents=True)
    (work / "site" / "pkg" / "__init__.py").write_text("")
    write_csv(work / "secret.csv", sentiment_rows(20))
    rc, err, _ = cli(repo, work, "validate", DEFAULT, "--set", "task.data=package://pkg/../../secret.csv",
                     env={"PYTHONPATH": str(work / "site")})
    return one_line(rc, err, needle="task.data")


@case("prune --output TEACHER is refused, the teacher unchanged")
def _prune_over(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)
    before = snapshot(t)
    rc, err, _ = cli(repo, work, "prune", "--teacher", str(t), "--sparsity", "0.5", "--output", str(t),
                     "--samples", "8")
    ok, line = one_line(rc, err, needle="--output")
    return ok and snapshot(t) == before, line


@case("export --output SOURCE is refused, the source unchanged")
def _export_over(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)
    before = snapshot(t)
    rc, err, _ = cli(repo, work, "export", str(t), "--format", "hf", "--output", str(t))
    ok, line = one_line(rc, err, needle="--output")
    return ok and snapshot(t) == before, line


@case("plan --output over a file it did not write is refused")
def _plan_over(repo: Path, work: Path) -> tuple[bool, str]:
    notes = work / "notes.txt"
    notes.write_text("mine")
    rc, err, _ = cli(repo, work, "plan", str(tiny_config_json(work)), "--output", str(notes))
    ok, line = one_line(rc, err, needle="--output")
    return ok and notes.read_text() == "mine", line


@case("--output ~/x goes to the home directory")
def _tilde(repo: Path, work: Path) -> tuple[bool, str]:
    home = work / "home"
    home.mkdir()
    rc, err, _ = cli(repo, work, "plan", str(tiny_config_json(work)), "--output", "~/p.json", env={"HOME": str(home)})
    literal = (repo / "~").exists()
    return rc == 0 and (home / "p.json").is_file() and not literal, f"rc={rc}, ./~ made: {literal}"


@case("plan search_spaces/default.yaml works 4 times of 4")
def _plan_default(repo: Path, work: Path) -> tuple[bool, str]:
    codes = [cli(repo, work, "plan", DEFAULT, timeout=120)[0] for _ in range(4)]
    return codes == [0, 0, 0, 0], f"exit codes {codes}"


@case("YAML alias bomb in task.data: one line, fast")
def _bomb(repo: Path, work: Path) -> tuple[bool, str]:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = work / "bomb.yaml"
    bomb.write_text("x:\n" + "\n".join("  " + ln for ln in levels) + "\ntask:\n  data: *a8\n")
    rc, err, took = cli(repo, work, "validate", str(bomb), timeout=30,
                        preexec=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)))
    ok, line = one_line(rc, err)
    return ok and took < 20 and len(err) < 2000, f"{line} ({took:.1f}s)"


@case("eval on a model whose config.json has 100,000 layers: one line, fast")
def _eval_layers(repo: Path, work: Path) -> tuple[bool, str]:
    t, data = teacher(work)
    cfg = json.loads((t / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_000
    (t / "config.json").write_text(json.dumps(cfg))
    rc, err, took = cli(repo, work, "eval", "--model", str(t), "--data", str(data), timeout=60)
    ok, line = one_line(rc, err)
    return ok and took < 30, f"{line} ({took:.1f}s)"


def _plan_arch(name: str, **changes: object) -> None:
    @case(f"plan on a config.json with {name}: one line")
    def _run(repo: Path, work: Path) -> tuple[bool, str]:
        rc, err, took = cli(repo, work, "plan", str(tiny_config_json(work, **changes)), timeout=60)
        ok, line = one_line(rc, err)
        return ok and took < 30, f"{line} ({took:.1f}s)"


_plan_arch("100,000 layers", num_hidden_layers=100_000)
_plan_arch("auto_map", auto_map={"AutoModel": "x.Model"})
_plan_arch("hidden size not a multiple of heads", hidden_size=30)
_plan_arch("0 layers", num_hidden_layers=0)


@case("plan on a fake .gguf: one line")
def _gguf(repo: Path, work: Path) -> tuple[bool, str]:
    fake = work / "m.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(64))
    rc, err, _ = cli(repo, work, "plan", str(fake))
    return one_line(rc, err)


@case("plan --output under a file: one line")
def _plan_under(repo: Path, work: Path) -> tuple[bool, str]:
    (work / "f").write_text("x")
    rc, err, _ = cli(repo, work, "plan", str(tiny_config_json(work)), "--output", str(work / "f" / "p.json"))
    return one_line(rc, err, needle="--output")


@case("minidisc.json whose task is a string: one line")
def _record_task(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)
    rec = json.loads((t / "minidisc.json").read_text())
    rec["task"] = "sst2"
    (t / "minidisc.json").write_text(json.dumps(rec))
    rc, err, _ = cli(repo, work, "eval", "--model", str(t))
    return one_line(rc, err)


def _labels(name: str, content: Callable[[Path], Path]) -> None:
    @case(f"{name} labels: one line")
    def _run(repo: Path, work: Path) -> tuple[bool, str]:
        t, _ = teacher(work)
        rc, err, _ = cli(repo, work, "eval", "--model", str(t), "--data", str(content(work)))
        return one_line(rc, err, needle="task.")


def _inf(work: Path) -> Path:
    rows = [(f"text {i}", str(float(i % 2))) for i in range(40)]
    rows[5] = ("bad", "inf")
    return write_csv(work / "inf.csv", rows)


def _lists(work: Path) -> Path:
    path = work / "lists.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t {i}", "label": [i % 2]}) for i in range(40)) + "\n")
    return path


_labels("inf", _inf)
_labels("list", _lists)


@case("a NaN label is reported or refused, not dropped silently")
def _nan(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)
    rows = sentiment_rows(40)
    rows[3] = ("no label", "nan")
    rc, err, _ = cli(repo, work, "eval", "--model", str(t), "--data", str(write_csv(work / "nan.csv", rows)))
    said = "no 'label' label" in err or (rc == 2 and "minidisc: error:" in err)
    return said and "Traceback" not in err, err.strip().splitlines()[0][:200] if err.strip() else f"rc={rc}"


@case("MINIDISC_CACHE pointing at a file: one line")
def _cache_file(repo: Path, work: Path) -> tuple[bool, str]:
    t, data = teacher(work)
    (work / "cachefile").write_text("x")
    rc, err, _ = cli(repo, work, "eval", "--model", str(t), "--data", str(data),
                     env={"MINIDISC_CACHE": str(work / "cachefile")})
    return one_line(rc, err, needle="MINIDISC_CACHE")


@case("prune --seed -1: one line")
def _seed(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)
    rc, err, _ = cli(repo, work, "prune", "--teacher", str(t), "--sparsity", "0.5", "--output", str(work / "p"),
                     "--seed", "-1", "--samples", "8")
    return one_line(rc, err, needle="--seed")


@case("disk full (file-size limit) while saving: one line, nothing left")
def _disk(repo: Path, work: Path) -> tuple[bool, str]:
    t, _ = teacher(work)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = work / "pruned"
    rc, err, _ = cli(repo, work, "prune", "--teacher", str(t), "--sparsity", "0.5", "--output", str(out),
                     "--samples", "8", preexec=limit)
    ok, line = one_line(rc, err, codes=(1, 2))
    left = out.exists() or any(p.name.startswith(".pruned.") for p in work.iterdir())
    return ok and not left, line


@case("a token file of invalid UTF-8: one line")
def _token(repo: Path, work: Path) -> tuple[bool, str]:
    tok = work / "token"
    tok.write_bytes(b"\xff\xfe\x00bad")
    rc, err, _ = cli(repo, work, "jobs", "status", "raysubmit_x", "--token-file", str(tok))
    return one_line(rc, err, needle="--token-file")


@case("an argparse error is one line, exit 2")
def _argparse(repo: Path, work: Path) -> tuple[bool, str]:
    rc, err, _ = cli(repo, work, "prune", "--sparsity", "x")
    return rc == 2 and len(err.strip().splitlines()) == 1, err.strip().replace("\n", " | ")[:200]


@case("a YAML section given twice is refused")
def _dup(repo: Path, work: Path) -> tuple[bool, str]:
    dup = work / "dup.yaml"
    dup.write_text("distill:\n  steps: 10\npruning:\n  lam: 0.2\ndistill:\n  lr: 0.001\n")
    rc, err, _ = cli(repo, work, "validate", str(dup))
    return one_line(rc, err)


@case("labels edited in place (same size and mtime) are not served stale")
def _stale(repo: Path, work: Path) -> tuple[bool, str]:
    t, data = teacher(work)
    rc1, err1, _ = cli(repo, work, "eval", "--model", str(t), "--data", str(data))
    st = data.stat()
    text = data.read_text()
    edited = text.replace(",pos\n", ",xyz\n", 1)  # one row gets a third class, same size
    assert len(edited) == len(text) and edited != text
    data.write_text(edited)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc2, err2, _ = cli(repo, work, "eval", "--model", str(t), "--data", str(data))
    ok, line = one_line(rc2, err2, needle="labels")  # the 2-label model against 3-label data: refused
    return rc1 == 0 and ok, f"before the edit rc={rc1}; after: {line}"


@case("a bad search.optuna_storage is refused before the output is claimed")
def _optuna(repo: Path, work: Path) -> tuple[bool, str]:
    t, data = teacher(work)
    out = work / "run"
    rc, err, _ = cli(repo, work, "search", DEFAULT, "--output", str(out), "--strategy", "optuna",
                     "--set", f"teacher.model={t}", "--set", f"task.data={data}", "--set", "task.label_column=label",
                     "--set", "task.text_column=text", "--set", "search.optuna_storage=sqlite:////no/such/dir/x.db",
                     timeout=180,
                     env={"RAY_AUTH_MODE": "disabled"})
    ok, line = one_line(rc, err, needle="search.optuna_storage")
    return ok and not out.exists(), line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="checkout to run the cases against (default: this one)")
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("-k", help="only cases whose name contains this")
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    results = []
    for name, fn in CASES.items():
        if args.k and args.k not in name:
            continue
        with tempfile.TemporaryDirectory() as d:
            try:
                ok, detail = fn(repo, Path(d))
            except Exception as exc:  # noqa: BLE001 - a case that cannot even run counts as failed
                ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        results.append({"case": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed} of {len(results)} cases behave as promised ({repo})")
    if args.output:
        Path(args.output).write_text(json.dumps({"repo": str(repo), "passed": passed, "cases": len(results),
                                                 "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
