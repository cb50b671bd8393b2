"""pytest configuration: makes tests/helpers.py importable and pins torch's CPU reference to
deterministic settings."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# torch.use_deterministic_algorithms(True) (below) makes cuBLAS calls on CUDA tensors raise unless
# cuBLAS has a fixed workspace configuration, which it reads when CUDA starts: before any test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _torch_reference():
    import torch

    torch.use_deterministic_algorithms(True)
    yield torch


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)
