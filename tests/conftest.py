import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# One torch thread per test process: Ray workers started by the tests run beside
# it on the same two cores, and oversubscribed threads slow conv nets many-fold.
torch.set_num_threads(1)
