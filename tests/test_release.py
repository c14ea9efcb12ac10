"""Release-ready: the version is written in one place, and the wheel installs into a clean environment with exactly
the core dependencies the docs state, ships its type marker, and imports none of the extras' packages."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sdebatch

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "tqdm"}  # what README.md and docs/index.md state: "the core: torch and tqdm"
# the CPU build the Makefile installs (make TORCH_SPEC=... passes another one down)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
NOT_ON_IMPORT = ["lightning", "pytorch_lightning", "matplotlib", "transformers", "accelerate", "torchdiffeq"]


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower()


def test_the_version_is_written_once_and_read_everywhere():
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdebatch.__version__"}
    assert importlib.metadata.version("sdebatch") == sdebatch.__version__  # the installed metadata agrees
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(sdebatch.__version__)}\b", changelog, re.M), "CHANGELOG has no entry"
    assert "## Unreleased" in changelog


def test_the_docs_state_the_core_dependencies():
    assert {requirement_name(d) for d in PYPROJECT["project"]["dependencies"]} == CORE
    for page in ("README.md", "docs/index.md"):
        assert "torch and tqdm" in (ROOT / page).read_text(), page


def test_release_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "the sdebatch authors" in (ROOT / "LICENSE").read_text()
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Changelog"}
    assert (ROOT / "sdebatch" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["sdebatch"]


CHECK = """
import importlib.metadata, json, sys
from pathlib import Path
import sdebatch
requires = importlib.metadata.requires("sdebatch") or []
print(json.dumps({
    "version": sdebatch.__version__,
    "file": sdebatch.__file__,
    "core": [r for r in requires if "extra ==" not in r],
    "typed": (Path(sdebatch.__file__).parent / "py.typed").is_file(),
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:])),
}))
"""


def test_the_wheel_installs_into_a_clean_venv(tmp_path):
    pytest.importorskip("build", reason="the dev extra (pip install -e '.[dev]') builds the wheel")
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    wheel, = dist.glob("sdebatch-*.whl")
    assert wheel.name.startswith(f"sdebatch-{sdebatch.__version__}-")

    venv = tmp_path / "venv"  # a clean environment: no --system-site-packages
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH_SPEC,
                          str(wheel)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    out = subprocess.run([str(python), "-c", CHECK, *NOT_ON_IMPORT], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"] == sdebatch.__version__
    assert Path(got["file"]).is_relative_to(venv), got["file"]  # the installed copy, not the source tree
    assert {requirement_name(r) for r in got["core"]} == CORE, got["core"]
    assert sorted(got["core"]) == sorted(PYPROJECT["project"]["dependencies"])
    assert got["typed"]
    assert got["loaded"] == [], f"import sdebatch loads {got['loaded']}"

    # the console script of the core runs with the core's dependencies alone
    out = subprocess.run([str(venv / "bin" / "sdebatch"), "rules", "--logical", "64", "--batch", "64", "256"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "kappa" in out.stdout, out.stderr[-3000:]
