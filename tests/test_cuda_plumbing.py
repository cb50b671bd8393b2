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


# --- (8) alignment, launch errors, in-place outputs ------------------------------------------------

class HostCudaArray:
    """Host memory presented through __cuda_array_interface__ v3: the binding's checks under test
    fire before any device is asked about the pointer, so nothing is ever read through it."""

    def __init__(self, a, offset=0, typestr=None, shape=None):
        self.a, self.offset = a, offset
        self.typestr, self.shape = typestr or a.dtype.str, shape or a.shape

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.typestr, "version": 3, "strides": None,
                "data": (self.a.ctypes.data + self.offset, False)}


@pytest.mark.parametrize("dtype,offset", [(np.float32, 2), (np.float64, 4), (np.float16, 1)])
def test_a_misaligned_cuda_pointer_is_a_value_error_before_any_device_query(dtype, offset):
    from normkit import _C

    base = np.zeros(64, np.uint8)
    x = HostCudaArray(base, offset, np.dtype(dtype).str, (2, 3))
    with pytest.raises(ValueError, match=r"x is not aligned to its \d-byte items"):
        _C.batch_norm_workspace_size(x)
    with pytest.raises(ValueError, match="mean is not aligned"):
        _C.batch_norm_normalize(np.zeros((2, 3), dtype), x, x, None, None, x)


def test_a_misaligned_dlpack_capsule_is_a_value_error():
    from normkit import _C

    raw = np.zeros(13, np.uint8)
    x = np.ndarray((3,), np.float32, buffer=raw.data, offset=1)
    with pytest.raises(ValueError, match="x is not aligned to its 4-byte items"):
        _C.batch_norm_workspace_size(x.__dlpack__())


@gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_in_place_outputs_match_out_of_place(layout):
    """out=x through the elementwise kernels (no __restrict__ on pointers that may alias)."""
    import cupy as cp

    import normkit.functional as F

    rng = np.random.default_rng(3)
    x = cp.asarray(rng.standard_normal((3, 12, 7, 5)), cp.float32)
    if layout == "nhwc":
        x = cp.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    mean, var = F.batch_norm_stats(x)
    invstd = 1 / cp.sqrt(var + 1e-5)
    w, b = cp.asarray(rng.standard_normal(12), cp.float32), cp.asarray(rng.standard_normal(12),
                                                                      cp.float32)
    expected = F.batch_norm_normalize(x, mean, invstd, w, b)
    y = x.copy()
    assert F.batch_norm_normalize(y, mean, invstd, w, b, out=y) is y
    cp.testing.assert_array_equal(y, expected)
    dy = cp.asarray(rng.standard_normal(x.shape), cp.float32).reshape(x.shape)
    dy = dy if layout == "nchw" else dy.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    sums = F.batch_norm_backward_reduce(dy, x, mean)
    expected = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, *sums)
    got = dy.copy()
    F.batch_norm_backward_elemt(got, x, mean, invstd, w, *sums, out=got)
    cp.testing.assert_array_equal(got, expected)


@gpu
def test_an_earlier_fault_is_not_blamed_on_normkits_kernel():
    """After a faulting CuPy kernel (a sticky illegal address), a normkit op is a RuntimeError
    that says the error may come from earlier work, never a crash or a plain 'kernel X failed'."""
    out = run_fresh("""
        import cupy, numpy as np
        import normkit.functional as F
        x = cupy.asarray(np.random.default_rng(0).standard_normal((4, 6, 5)), cupy.float32)
        bad = cupy.RawKernel(r'extern "C" __global__ void bad(float* p) { p[threadIdx.x] = 1; }',
                             "bad")
        bad((1,), (32,), (cupy.uint64(8),))
        try:
            cupy.cuda.runtime.deviceSynchronize()
        except Exception as e:
            print("cupy:", type(e).__name__)
        try:
            F.batch_norm_stats(x)
            print("no error")
        except RuntimeError as e:
            print("normkit:", e)
    """)
    assert "normkit:" in out and "earlier" in out, out


# --- (5) DLPack before the CUDA Array Interface ----------------------------------------------------

class BothProtocols:
    """An exporter of both protocols, as CuPy, torch and JAX arrays are: __dlpack__ records the
    stream it is asked for and exports a NumPy array's capsule; the CUDA Array Interface must not
    be touched (it fails the test if it is)."""

    def __init__(self, a, device_type):
        self.a, self.device_type, self.streams = a, device_type, []

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, **kwargs):
        self.streams.append(kwargs.get("stream", "absent"))
        return self.a.__dlpack__()

    @property
    def __cuda_array_interface__(self):
        raise AssertionError("the CUDA Array Interface was read although __dlpack__ exists")


def test_dlpack_is_preferred_and_a_cuda_exporter_gets_the_consumer_stream():
    from normkit import _C

    x = np.random.default_rng(4).standard_normal((5, 3, 4)).astype(np.float32)
    X = BothProtocols(x, device_type=2)  # kDLCUDA: asked for the consumer's stream
    mean, var = np.empty(3, np.float32), np.empty(3, np.float32)
    _C.batch_norm_stats(X, mean, var, stream=0x5EED)
    assert X.streams == [0x5EED]
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-5)
    _C.batch_norm_stats(X, mean, var)  # stream 0, the legacy default stream, is 1 in DLPack
    assert X.streams[-1] == 1


def test_a_host_dlpack_exporter_is_not_asked_for_a_stream():
    from normkit import _C

    x = np.random.default_rng(5).standard_normal((4, 2, 3))
    X = BothProtocols(x, device_type=1)  # kDLCPU
    mean, var = np.empty(2), np.empty(2)
    _C.batch_norm_stats(X, mean, var, stream=0x5EED)
    assert X.streams == ["absent"]
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-12)


class StreamZeroCai(HostCudaArray):
    @property
    def __cuda_array_interface__(self):
        return dict(super().__cuda_array_interface__, stream=0)


def test_the_cuda_array_interface_still_serves_exporters_without_dlpack():
    """An exporter of the interface alone is read through it (here: its stream field checked)."""
    from normkit import _C

    with pytest.raises(ValueError, match="stream 0"):
        _C.batch_norm_workspace_size(StreamZeroCai(np.zeros((3, 4), np.float32)))
