"""sdebatch.checks: every bad value is one ValueError naming the argument and what it accepts; integers of any
integral type are accepted and returned as ints. And the checks stand below the rules: importing them needs neither
the rules nor torch."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sdebatch
from sdebatch import checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("call, needle", [
    (lambda: sdebatch.warmup_cosine(total=1, warmup=None), "warmup must be a non-negative finite number, got None"),
    (lambda: sdebatch.warmup_cosine(total=10, warmup="10k"), "warmup must be a non-negative finite number, got '10k'"),
    (lambda: sdebatch.warmup_cosine(total=10, final=None), "final must be a number in [0, 1], got None"),
    (lambda: sdebatch.linear(10, final=None), "final must be a number in [0, 1], got None"),
    (lambda: sdebatch.linear(10, warmup="10k"), "warmup must be a non-negative finite number, got '10k'"),
    (lambda: sdebatch.constant(warmup=None), "warmup must be a non-negative finite number, got None"),
    (lambda: sdebatch.constant(warmup=[1]), "warmup must be a non-negative finite number, got [1]"),
    (lambda: sdebatch.warmup_stable_decay(10, decay=None), "decay must be a number in [0, 1], got None"),
    (lambda: sdebatch.warmup_stable_decay(10, decay="10k"), "decay must be a number in [0, 1], got '10k'"),
    (lambda: sdebatch.warmup_stable_decay(10, final="x"), "final must be a number in [0, 1], got 'x'"),
    (lambda: sdebatch.warmup_stable_decay(10, decay=1.5), "decay must be a number in [0, 1], got 1.5"),
    (lambda: sdebatch.constant(warmup=-1), "warmup must be a non-negative finite number, got -1"),
])
def test_schedule_arguments_of_the_wrong_type_name_the_argument(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


@pytest.mark.parametrize("check, value, needle", [
    (checks.non_negative, None, "x must be a non-negative finite number, got None"),
    (checks.non_negative, float("nan"), "x must be a non-negative finite number, got nan"),
    (checks.fraction, None, "x must be a number in [0, 1], got None"),
    (checks.fraction, "half", "x must be a number in [0, 1], got 'half'"),
    (checks.fraction, float("nan"), "x must be a number in [0, 1], got nan"),
])
def test_number_checks_raise_value_errors_only(check, value, needle):
    with pytest.raises(ValueError) as e:
        check("x", value)
    assert needle in str(e.value)


@pytest.mark.parametrize("value", [np.int64(8), np.int32(8), np.uint8(8), 8])
def test_integers_of_any_integral_type_are_accepted_as_ints(value):
    got = checks.int_at_least("n", value)
    assert got == 8 and type(got) is int
    sizes = checks.batch_sizes(value, physical_batch_size=value, accumulation_steps=None)
    assert sizes == {"logical_batch_size": 8, "physical_batch_size": 8, "accumulation_steps": None}
    assert all(type(v) is int for v in sizes.values() if v is not None)
    cands = checks.candidates("c", [value, np.int16(2), 4, np.int64(2)])
    assert cands == [2, 4, 8] and all(type(b) is int for b in cands)


@pytest.mark.parametrize("value, needle", [
    (True, "logical_batch_size must be a positive int, got True"),
    (np.bool_(True), "logical_batch_size must be a positive int, got"),
    (8.0, "logical_batch_size must be a positive int, got 8.0"),
    (np.float64(8), "logical_batch_size must be a positive int, got"),
    (np.int64(0), "logical_batch_size must be a positive int, got"),
    ("8", "logical_batch_size must be a positive int, got '8'"),
])
def test_what_is_not_a_positive_integer_is_refused(value, needle):
    with pytest.raises(ValueError, match=needle):
        checks.batch_sizes(value)
    with pytest.raises(ValueError, match="physical_batch_size must be a positive int or None"):
        checks.batch_sizes(8, physical_batch_size=value)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        checks.int_at_least("n", value)
    with pytest.raises(ValueError, match="c must be positive ints"):
        checks.candidates("c", [4, value])


def test_choose_physical_batch_takes_numpy_candidates():
    clock = [0.0]

    def step(b):
        clock[0] += 1.0  # one time unit per micro-step whatever its size: the largest is the fastest per sample

    choice = sdebatch.choose_physical_batch(step, np.array([2, 8, 4]), device="cpu", timer=lambda: clock[0])
    assert choice.physical_batch_size == 8 and type(choice.physical_batch_size) is int
    assert [r["batch"] for r in choice.rows] == [2, 4, 8]


def _imports(path: Path, package: str) -> set[str]:
    """Every module of the package a file imports, at its top or inside a function, as dotted names."""
    parts = package.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_checks_import_nothing_of_the_package():
    """The rules import the checks; the checks import no module of sdebatch (no circle through the rules)."""
    found = _imports(ROOT / "sdebatch" / "checks.py", "sdebatch")
    assert not {m for m in found if m.startswith("sdebatch")}, found
    assert "sdebatch.checks" in _imports(ROOT / "sdebatch" / "rules.py", "sdebatch")


def test_rules_and_checks_load_without_torch():
    """rules.py and checks.py, loaded on their own (not through sdebatch/__init__.py, which loads torch) in a process
    where torch cannot be imported: the pure formulas and the argument checks need no torch."""
    code = f"""
import importlib, sys, types
class Block:
    def find_spec(self, name, *a):
        if name.split('.')[0] in ('torch', 'numpy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('sdb')
pkg.__path__ = [{str(ROOT / 'sdebatch')!r}]
sys.modules['sdb'] = pkg
rules = importlib.import_module('sdb.rules')
checks = importlib.import_module('sdb.checks')
assert rules.FAMILIES is checks.FAMILIES == ('sgd', 'adam', 'none')
assert abs(rules.kappa(64, 16, horizon=1, reference_horizon=4, gamma=0.5) - 8.0) < 1e-12
assert rules.rescale('adam', {{'lr': 1.0}}, 4.0)['lr'] == 2.0
assert checks.count('n', 3) == 3.0
checks.wrapper_options(rule='adam', gamma=1.0, horizon=2, reference_horizon=2)
try:
    checks.wrapper_options(rule='adamw')
except ValueError as e:
    assert "rule must be one of 'auto', 'sgd', 'adam', 'none'" in str(e)
else:
    raise AssertionError('no error')
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kw, needle", [
    (dict(gamma=None), "gamma must be a finite number, got None"),
    (dict(gamma="x"), "gamma must be a finite number, got 'x'"),
    (dict(gamma=1.0, horizon=None, reference_horizon=5), "gamma != 0 needs both horizon and reference_horizon"),
    (dict(gamma=1.0, horizon=-1, reference_horizon=5), "horizon must be a positive finite number, got -1"),
    (dict(noise_scale_decay=None), "noise_scale_decay must be in [0, 1), got None"),
])
def test_wrapper_options_raise_value_errors(kw, needle):
    with pytest.raises(ValueError) as e:
        checks.wrapper_options(**kw)
    assert needle in str(e.value)
