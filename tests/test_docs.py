"""The documentation cannot rot.

- Every ```python block of README.md and docs/**/*.md runs as written, each in a fresh interpreter in an empty
  folder. A block that cannot (long work, files it cannot have) is skipped only by an explicit marker on the line
  before it, ``<!-- skip: the reason -->``, and is then reported as skipped with its page, line and reason.
- The site builds with ``mkdocs build --strict``, and every name in every public module's ``__all__`` (or, for a
  module without one, every public name it defines; or the members a page lists) is in the API reference, read from
  the built site's objects inventory.
- Every test the documentation names (``tests/test_x.py::test_y``) exists.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(\S.*?)\s*-->")
BLOCK_TIMEOUT_S = 300

# the public modules whose API the reference must document (sdebatch.mdm: its public entry points)
PUBLIC_MODULES = ["sdebatch", "sdebatch.lightning", "sdebatch.hf", "sdebatch.batch_schedules", "sdebatch.noise",
                  "sdebatch.data", "sdebatch.physical_batch", "sdebatch.sde", "sdebatch.sweep", "sdebatch.figures",
                  "sdebatch.figures.report", "sdebatch.stats", "sdebatch.presets", "sdebatch.progress", "sdebatch.mdm",
                  "sdebatch.mdm.config", "sdebatch.mdm.data.prepare", "sdebatch.mdm.train", "sdebatch.mdm.evaluate",
                  "sdebatch.mdm.sample", "sdebatch.mdm.checkpoint", "sdebatch.mdm.model"]


def python_blocks():
    """(page, line, code, skip reason or None) of every ```python block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip().splitlines()
            marker = SKIP.fullmatch(before[-1].strip()) if before else None
            found.append((page.relative_to(ROOT).as_posix(), line, m.group(1), marker.group(1) if marker else None))
    return found


BLOCKS = python_blocks()


@pytest.mark.parametrize("page,line,code,skip", BLOCKS, ids=[f"{p}:{n}" for p, n, _, _ in BLOCKS])
def test_python_block_runs_as_written(page, line, code, skip, tmp_path):
    if skip is not None:
        pytest.skip(f"{page}:{line} skipped by its marker: {skip}")
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page}:{line} ran past {BLOCK_TIMEOUT_S} s: make it smaller, or mark it "
                    "<!-- skip: the reason --> on the line before the block")
    assert out.returncode == 0, f"{page}:{line} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_blocks_are_found_and_every_skip_marker_precedes_a_python_block():
    assert len(BLOCKS) >= 15 and any(p == "README.md" for p, *_ in BLOCKS)
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, text in enumerate(lines):
            if "<!-- skip" in text:
                assert SKIP.fullmatch(text.strip()), f"{page.name}:{i + 1}: write <!-- skip: the reason -->"
                after = next((t for t in lines[i + 1:] if t.strip()), "")
                assert after.startswith("```python"), f"{page.name}:{i + 1}: a skip marker not before a python block"


def test_readme_is_short_and_keeps_its_markers():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 11_000, f"README.md is {len(text)} characters; the details belong in docs/"
    assert "<!-- MDM seeds headline -->" in text or "kappa 4" in text
    assert "paper_figures/measured/demo_paired_vs_batch.png" in text


def test_every_test_the_docs_name_exists():
    import ast

    named = set()
    for page in PAGES:
        named |= set(re.findall(r"tests/(test_\w+\.py)::(test_\w+)", page.read_text()))
    assert len(named) >= 20
    for file, name in sorted(named):
        path = ROOT / "tests" / file
        assert path.is_file(), f"the docs name {file}, which does not exist"
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"the docs name tests/{file}::{name}, which does not exist"


# ---------------------------------------------------------------- the site and its API reference

def directives() -> list[tuple[str, list[str] | None]]:
    """(module, explicit members or None) of every ``::: module`` in the API reference pages."""
    out = []
    for page in sorted((ROOT / "docs" / "reference" / "api").glob("*.md")):
        text = page.read_text()
        for m in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n?)*)", text, re.M):
            members = re.search(r"members:\s*\[([^\]]*)\]", m.group(2))
            out.append((m.group(1), [s.strip() for s in members.group(1).split(",")] if members else None))
    return out


@pytest.fixture(scope="module")
def inventory(tmp_path_factory) -> set[str]:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra (pip install -e '.[docs]')")
    site = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=600)
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four header lines, then zlib
        header_end = raw.index(b"\n", header_end) + 1
    return {line.split(" ", 1)[0] for line in zlib.decompress(raw[header_end:]).decode().splitlines()}


def public_names(module: str) -> list[str]:
    """The module's ``__all__``, or the public names it defines itself (not those it imports), read statically."""
    griffe = pytest.importorskip("griffe")
    mod = griffe.load(module, search_paths=[str(ROOT)], allow_inspection=False)
    exports = getattr(mod, "exports", None)
    if exports is not None:
        return [e if isinstance(e, str) else e.name for e in exports]
    return [name for name, member in mod.members.items() if not name.startswith("_") and not member.is_alias
            and not member.is_module]


def test_every_public_module_has_a_reference_page():
    documented = {module for module, _ in directives()}
    missing = [m for m in PUBLIC_MODULES if m not in documented]
    assert not missing, f"no `::: module` directive in docs/reference/api for {missing}"


def test_every_public_name_is_in_the_api_reference(inventory):
    missing = []
    for module, members in directives():
        names = members if members is not None else public_names(module)
        missing += [f"{module}.{n}" for n in names if f"{module}.{n}" not in inventory]
    assert not missing, f"not in the built API reference (objects.inv): {missing}"
    assert "sdebatch.LogicalBatchOptimizer.backward" in inventory  # methods are documented too


def test_the_generated_reference_pages_hold_the_code_s_own_words(inventory):
    """The CLI, MDM-config and rules pages are generated by docs/hooks.py from the parser and TrainConfig."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    cli = hooks.cli_reference()
    for command in ("rules", "sweep run", "sweep collect", "report", "data prepare", "train", "eval", "sample"):
        assert f"$ sdebatch {command} --help\nusage: sdebatch {command}" in cli
    from dataclasses import fields

    from sdebatch.mdm.config import TrainConfig
    table = hooks.mdm_config_table()
    assert all(f"| `{f.name}` |" in table for f in fields(TrainConfig))
    assert "kappa" in hooks.rules_example()


def test_every_test_the_guarantees_page_names_exists():
    """docs/explanation/guarantees.md says which test proves each guarantee: each named test must exist."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "explanation" / "guarantees.md").read_text()
    named = re.findall(r"`(tests/\w+\.py)::(\w+)", text)
    assert len(named) > 20
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (root / f).read_text()]
    assert missing == []
