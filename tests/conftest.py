"""Shared fixtures. modlora is imported under jaxtyping + beartype so public shapes are checked."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("modlora", "beartype.beartype"):
    import modlora  # noqa: F401, E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def llama():
    return tiny.llama()


@pytest.fixture
def gpt2():
    return tiny.gpt2()


@pytest.fixture(scope="session")
def minilm_session():
    return tiny.minilm()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
