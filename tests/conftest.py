from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def samples() -> Path:
    return SAMPLES


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run far faster on one thread (and CI machines have 2 cores)."""
    torch.set_num_threads(1)
    yield
