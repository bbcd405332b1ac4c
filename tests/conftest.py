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


@pytest.fixture
def exact_convs():
    """cuDNN convolutions in true float32 for the test: by default they run in TF32, whose rounding
    (~1e-3) depends on the shapes, so a padded or cached call would not match the plain one."""
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    yield
    torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="session")
def set_dir() -> Path:
    """The golden tiny-s1 set (tests/test_golden.py says how sets are found)."""
    from tests.test_golden import golden_sets
    sets = golden_sets()
    if not sets:
        pytest.fail("no golden set found: set COSY_GOLDEN_DIRS or provide ../shared/golden")
    return next((s for s in sets if s.name == "tiny-s1"), sets[0])


@pytest.fixture(scope="session")
def flow(set_dir):
    """The golden set's flow model (float32, CPU, eval mode)."""
    from engine.checkpoint import load_strict, read_state_dict
    from engine.config import ModelConfig
    from engine.flow.flow import CausalMaskedDiffWithXvec
    model = CausalMaskedDiffWithXvec(ModelConfig.load(set_dir / "model" / "config.json").flow)
    load_strict(model, read_state_dict(set_dir / "model" / "flow.pt"), set_dir / "model" / "flow.pt")
    return model.eval()
