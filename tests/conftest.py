"""Test configuration: Triton runs in interpreter mode on machines without a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
