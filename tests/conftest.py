"""Shared fixtures: a tiny random checkpoint in the official layout, made once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# The engine runs the LLM and flow/HiFT workers in parallel threads; with torch's default intra-op
# threads per worker they oversubscribe the 2-core CI machine and OpenMP spinning makes tests crawl.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from engine.tools.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (2 threads on a shared 2-core machine are 10-50x slower under
    load), restoring the previous count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
