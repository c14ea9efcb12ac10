import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    """Exactness tests run in float64 so 1e-10 means round-off, not float32 noise."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
