import gc

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


@pytest.fixture(scope="module")
def tok():
    """The toy byte-level BPE tokenizer (a module may define its own ``tok``)."""
    from fedprune.data.toy_tokenizer import toy_tokenizer

    return toy_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A tiny LLaMA (max_position_embeddings=256) saved with the toy tokenizer, as a model directory."""
    import fedprune

    d = tmp_path_factory.mktemp("models") / "tiny"
    fedprune.save_model(tiny_model("llama", vocab_size=len(tok)), d, tokenizer=tok)
    return d


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny BPE tokenizer of the federated tests (trained once on the Dolly test records;
    a module may define its own ``tokenizer``)."""
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer

    return tiny_bpe_tokenizer()


def _freeze_long_lived_objects() -> None:
    """Collect, then move every surviving object out of the cyclic collector's reach (``gc.freeze``).

    The pruners call ``gc.collect()`` between layers to release memory; with torch and transformers
    imported that walks ~400k long-lived objects (0.2 s a call), which dominated the tiny-model tests.
    Frozen objects are still freed by reference counting; only cycles among them would stay."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session):
    for a in TINY_ARCHS:  # transformers imports each family's modelling code on first use
        tiny_model(a)
    import fedprune.pruning.methods  # noqa: F401  (the pruners, imported lazily by name)

    _freeze_long_lived_objects()  # and the imports of every test module


@pytest.fixture(autouse=True, scope="module")
def _frozen_module_imports():
    _freeze_long_lived_objects()  # what the previous module imported lazily
    yield
