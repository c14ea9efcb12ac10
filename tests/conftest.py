import os

import pytest
import torch

# nothing is downloaded at run time: no model or dataset hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def float64():
    """Exactness tests run in float64 so 1e-10 means round-off, not float32 noise."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def float32():
    """For tests of training/evaluation (not exactness): float32, the dtype the workload runs in."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread is fastest, and spared OpenMP waits when the 2 cores are shared (>10x)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """A data folder of the "micro" preset (real tokenizers, ~15 s to prepare), shared by the whole session."""
    from sdebatch.mdm.data.prepare import prepare

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    out = tmp_path_factory.mktemp("data") / "micro"
    index = prepare(out, preset="micro", progress=False)
    torch.set_default_dtype(old)
    return out, index
