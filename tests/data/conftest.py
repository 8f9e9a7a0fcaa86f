import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # Two shared cores: a second intra-op thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
