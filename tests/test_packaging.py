"""Dependencies follow the layers: the core imports none of the extras' packages; the declared Python floor holds
for every module; the extras name the packages their layers import."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = ["sdebatch", "sdebatch.rules", "sdebatch.optimizer", "sdebatch.clock", "sdebatch.schedules", "sdebatch.ema",
        "sdebatch.noise", "sdebatch.chunking", "sdebatch.families", "sdebatch.stepping", "sdebatch.data",
        "sdebatch.sweep", "sdebatch.progress", "sdebatch.utils", "sdebatch.cli"]
EXTRAS_ONLY = ["lightning", "pytorch_lightning", "lightning_fabric", "matplotlib", "torchdiffeq", "scipy",
               "tokenizers", "PIL", "espeakng_loader", "submitit"]


def test_core_imports_no_extra():
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({EXTRAS_ONLY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_command_line_of_the_core_runs_without_extras():
    """`sdebatch rules` (core) works in a process where the extras cannot be imported at all."""
    block = "import sys\nclass B:\n    def find_spec(self, name, *a):\n" \
            f"        if name.split('.')[0] in {EXTRAS_ONLY!r}: raise ImportError('blocked: ' + name)\n" \
            "sys.meta_path.insert(0, B())\nfrom sdebatch.cli import main\n" \
            "sys.exit(main(['rules', '--logical', '64', '--batch', '64', '256']))"
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "kappa" in out.stdout, out.stderr


def test_every_module_parses_at_the_declared_python_floor():
    floor = PYPROJECT["project"]["requires-python"].split(">=")[1].split(",")[0].strip()
    major, minor = (int(x) for x in floor.split(".")[:2])
    assert (major, minor) <= sys.version_info[:2]  # the suite itself runs on a supported interpreter
    for path in [*ROOT.glob("sdebatch/**/*.py"), *ROOT.glob("experiments/**/*.py"), *ROOT.glob("paper_figures/*.py")]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(major, minor))
    assert (major, minor) >= (3, 11)  # tomllib (sweep.py, mdm/train.py) is in the standard library from 3.11


def test_each_layer_declares_what_it_imports():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {k: {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in v} for k, v in extras.items()}
    core = {d.split(">")[0].strip().lower() for d in PYPROJECT["project"]["dependencies"]}
    dist = {"PIL": "pillow", "espeakng_loader": "espeakng-loader"}

    def imported(paths) -> set[str]:
        found = set()
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
        return {dist.get(m, m).lower() for m in found if m in EXTRAS_ONLY + ["numpy", "tqdm"]}

    sdebatch = ROOT / "sdebatch"
    assert imported(sdebatch.glob("mdm/**/*.py")) <= names["mdm"] | core
    assert imported(sdebatch.glob("figures/*.py")) <= names["figures"] | core
    assert imported(sdebatch.glob("sde/*.py")) <= names["sde"] | core
    assert imported([sdebatch / "lightning.py"]) <= names["lightning"] | core
    assert names["all"] == {"sdebatch"} and "tqdm" in core
