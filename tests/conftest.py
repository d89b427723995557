"""Shared pytest fixtures: parity-fixture lookup, deterministic seeds, CPU defaults."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """Directory of the parity fixtures: $SOLQ_D2_FIXTURES, else ../shared/fixtures next to the repo.

    A missing directory fails the test (it is never skipped): CI always has ../shared.
    """
    d = Path(os.environ.get("SOLQ_D2_FIXTURES") or ROOT.parent / "shared" / "fixtures")
    if not d.is_dir():
        pytest.fail(f"parity fixtures not found at {d}; set SOLQ_D2_FIXTURES to their directory")
    return d


def load_fixture(name: str):
    """torch.load a parity fixture safely (weights_only=True)."""
    path = fixtures_dir() / name
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
