"""Each example runs as a user would run it, prints its batch arithmetic and checks itself against the big batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    ("plain_loop.py", []),
    ("accelerate_loop.py", []),
    ("hf_trainer.py", ["--samples", "48"]),
    ("lightning_logical_batch.py", ["--samples", "192", "--epochs", "1"]),
    ("fsdp2_two_processes.py", []),
]


@pytest.mark.parametrize("name,args", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs_and_equals_the_big_batch(name, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "samples per update" in done.stdout + done.stderr  # the batch arithmetic (Lightning logs it)
    diff = float(done.stdout.split("max |parameter - big-batch reference| = ")[1].split()[0])
    assert diff < 1e-10
