import pytest
import torch

from fedprune.models.tiny import TINY_ARCHS, tiny_model


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (2, 12), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
