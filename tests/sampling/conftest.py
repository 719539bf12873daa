import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is faster, and on a shared 2-core machine two threads contend badly.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
