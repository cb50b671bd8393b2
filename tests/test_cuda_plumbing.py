"""The plumbing around the CUDA kernels (issue 18): which device an op runs on and which it leaves
current, how arrays are taken (DLPack before the CUDA Array Interface, alignment before any device
query), producer-stream waits and graph capture.

The tests of the protocol order and of the argument checks run everywhere, on host memory
presented through honest stand-ins (they fire before any device is asked about the memory); the
rest are marked `gpu` and skip with a reason without CuPy and a GPU, the two-device ones on a
machine with one GPU.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpu_helpers import gpu_skip_reason


def device_count():
    if gpu_skip_reason() is not None:
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


def gpu(test):
    """A `gpu` test: skipped with a reason without CuPy and a CUDA device."""
    skip = pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
    return pytest.mark.gpu(skip(test))


def two_gpus(test):
    """A `gpu` test that needs two devices: skipped with a reason on a machine with one."""
    reason = gpu_skip_reason() or "needs two CUDA devices (this machine has one)"
    return pytest.mark.gpu(pytest.mark.skipif(device_count() < 2, reason=reason)(test))


def run_fresh(code):
    """`code` in a fresh interpreter (no CUDA context yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- (2) the device guard --------------------------------------------------------------------------

@two_gpus
@pytest.mark.parametrize("func", ["normkit.functional.batch_norm_forward",
                                  "normkit.functional.group_norm_forward"])
def test_an_op_on_cuda1_from_a_fresh_thread_creates_no_context_on_gpu0(func):
    """A thread that never chose a device reports device 0 as current; an op on cuda:1 makes
    device 1 current for its launches and must not 'restore' device 0 afterwards (which would
    create a context there: hundreds of MB on GPU 0 in every rank of a DDP job)."""
    module, name = func.rsplit(".", 1)
    out = run_fresh(f"""
        import ctypes, threading
        import cupy, numpy as np
        import {module} as m
        cuda = ctypes.CDLL("libcuda.so.1")
        def active(d):
            f, a = ctypes.c_uint(), ctypes.c_int()
            cuda.cuDevicePrimaryCtxGetState(d, ctypes.byref(f), ctypes.byref(a))
            return a.value
        with cupy.cuda.Device(1):
            x = cupy.asarray(np.random.default_rng(0).standard_normal((4, 6, 5)), cupy.float32)
        before = active(0)
        def work():
            args = (x, 2) if "{name}" == "group_norm_forward" else (x,)
            getattr(m, "{name}")(*args)
            cupy.cuda.runtime.deviceSynchronize()
            print("current", cupy.cuda.runtime.getDevice())
        t = threading.Thread(target=work)
        t.start(); t.join()
        print("ctx0", before, active(0))
    """)
    assert "ctx0 0 0" in out, out


@two_gpus
def test_the_guard_restores_a_device_whose_context_exists():
    """With device 0 current and its context alive, an op on cuda:1 leaves device 0 current."""
    import cupy

    import normkit.functional as F

    with cupy.cuda.Device(0):
        cupy.zeros(1)  # device 0's context exists
        with cupy.cuda.Device(1):
            x = cupy.asarray(np.random.default_rng(1).standard_normal((3, 4, 5)), cupy.float32)
        F.batch_norm_stats(x)
        assert cupy.cuda.runtime.getDevice() == 0
