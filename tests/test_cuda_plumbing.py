"""The plumbing around the CUDA kernels (issue 18): which device an op runs on and which it leaves
current, how arrays are taken (DLPack before the CUDA Array Interface, alignment before any device
query), producer-stream waits and graph capture.

The tests of the protocol order and of the argument checks run everywhere, on host memory
presented through honest stand-ins (they fire before any device is asked about the memory); the
rest are marked `gpu` and skip with a reason without CuPy and a GPU, the two-device ones on a
machine with one GPU.
"""
import contextlib
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


class CountsInterfaceReads(BothProtocols):
    """An exporter of both protocols (as CuPy, whose __cuda_array_interface__ builds its dict on
    each access) that counts how often the interface is read, and has no torch is_neg/is_conj."""

    reads = 0

    @property
    def __cuda_array_interface__(self):
        type(self).reads += 1
        return HostCudaArray(self.a).__cuda_array_interface__


def test_an_op_does_not_read_the_interface_of_a_dlpack_exporter():
    """Taking a DLPack array runs none of its other protocol: the interface was read (its dict
    built and dropped) for every array of every call, besides two missing-attribute lookups
    (is_neg, is_conj) that raised and cleared an AttributeError each: ~3 us per array."""
    from normkit import _C

    x = np.random.default_rng(15).standard_normal((4, 2, 3))
    arrays = [CountsInterfaceReads(a, device_type=1)
              for a in (x, np.zeros(2), np.ones(2), np.ones(2), np.zeros(2), np.empty_like(x))]
    _C.batch_norm_normalize(*arrays)
    assert CountsInterfaceReads.reads == 0
    np.testing.assert_allclose(arrays[-1].a, x, rtol=1e-12)
    # a size query looks for the interface (its fallback) on the type: still never read
    _C.batch_norm_workspace_size(arrays[0])
    assert CountsInterfaceReads.reads == 0


def test_a_host_dlpack_exporter_is_not_asked_for_a_stream():
    from normkit import _C

    x = np.random.default_rng(5).standard_normal((4, 2, 3))
    X = BothProtocols(x, device_type=1)  # kDLCPU
    mean, var = np.empty(2), np.empty(2)
    _C.batch_norm_stats(X, mean, var, stream=0x5EED)
    assert X.streams == ["absent"]
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-12)


def test_a_managed_memory_exporter_gets_the_consumer_stream():
    """kDLCUDAManaged (13) is CUDA memory: its exporter is asked to order its work before the
    consumer's stream, as for kDLCUDA."""
    from normkit import _C

    x = np.random.default_rng(6).standard_normal((4, 2, 3))
    X = BothProtocols(x, device_type=13)
    mean, var = np.empty(2), np.empty(2)
    _C.batch_norm_stats(X, mean, var, stream=0x5EED)
    assert X.streams == [0x5EED]
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-12)


def dlpack_capsule(a, device_type, device_id=0):
    """A legacy "dltensor" capsule describing NumPy array `a` (kept alive by the caller) as living
    on DLPack device (`device_type`, `device_id`); no deleter."""
    import ctypes

    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                    ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                    ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                    ("shape", ctypes.POINTER(ctypes.c_int64)),
                    ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]

    class DLManagedTensor(ctypes.Structure):
        _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                    ("deleter", ctypes.c_void_p)]

    shape = (ctypes.c_int64 * a.ndim)(*a.shape)
    managed = DLManagedTensor(DLTensor(a.ctypes.data, device_type, device_id, a.ndim, 2,
                                       a.itemsize * 8, 1, shape, None, 0), None, None)
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_void_p]
    capsule = new(ctypes.addressof(managed), b"dltensor", None)
    return capsule, (managed, shape)


@pytest.mark.parametrize("device_type", [2, 13], ids=["kDLCUDA", "kDLCUDAManaged"])
def test_a_cuda_capsule_names_its_device_without_a_driver_query(device_type):
    """A CUDA or managed-memory capsule is a CUDA array on the device it names: taken as such
    without asking the driver about its pointer (here: host memory, never read), so without CUDA
    the size query is the plain 'needs CUDA' error, not a refusal of the device type."""
    import normkit
    from normkit import _C

    if normkit.cuda_available():
        pytest.skip("a GPU is present: the host pointer would be taken for device memory")
    a = np.zeros((2, 3, 4), np.float32)
    capsule, keep = dlpack_capsule(a, device_type)
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        _C.batch_norm_workspace_size(capsule)
    assert _C.batch_norm_workspace_size(dlpack_capsule(a, 1)[0]) == 0  # kDLCPU: no workspace


class StreamZeroCai(HostCudaArray):
    @property
    def __cuda_array_interface__(self):
        return dict(super().__cuda_array_interface__, stream=0)


def test_the_cuda_array_interface_still_serves_exporters_without_dlpack():
    """An exporter of the interface alone is read through it (here: its stream field checked)."""
    from normkit import _C

    with pytest.raises(ValueError, match="stream 0"):
        _C.batch_norm_workspace_size(StreamZeroCai(np.zeros((3, 4), np.float32)))


# --- (1) every op on its array's device ------------------------------------------------------------

class FakeCupy:
    """A stand-in for the few CuPy services the device selection uses: a current device per
    thread, `Device(i)` contexts, a current stream per device and `empty`, each of which records
    the device that was current when it was called."""

    def __init__(self):
        fake = self
        self.current, self.log = 0, []

        class Device:
            def __init__(self, index=None):
                self.id = fake.current if index is None else index

            def __enter__(self):
                self.previous, fake.current = fake.current, self.id
                fake.log.append(("enter", self.id))
                return self

            def __exit__(self, *exc):
                fake.current = self.previous
                fake.log.append(("exit", self.id))

        class Stream:
            def __init__(self, device):
                self.ptr = 0x1000 + device

        class Runtime:
            @staticmethod
            def getDevice():
                return fake.current

            @staticmethod
            def setDevice(device):
                fake.current = device
                fake.log.append(("set", device))

        class Cuda:
            pass

        class MemoryPool:
            def malloc(self, n):
                return ("block of", self, n)

        @contextlib.contextmanager
        def using_allocator(malloc):
            fake.log.append(("allocator", malloc.__self__))
            yield
            fake.log.append(("allocator done", malloc.__self__))

        self.cuda = Cuda()
        self.cuda.Device, self.cuda.runtime = Device, Runtime
        self.cuda.MemoryPool, self.cuda.using_allocator = MemoryPool, using_allocator
        self.cuda.get_current_stream = lambda: Stream(fake.current)
        self.float64 = np.float64

    def empty(self, n, dtype):
        self.log.append(("empty", self.current, n))
        return ("workspace on", self.current)


def fake_cupy_array(cupy, device, shape=(2, 3), dtype=np.float32):
    """An object that the backend takes for a CuPy array on `device`."""
    cls = type("ndarray", (), {"__module__": "cupy._core.core"})
    a = cls()
    a.device = cupy.cuda.Device(device)
    a.shape, a.dtype = shape, np.dtype(dtype)
    return a


@pytest.fixture
def fake_cupy(monkeypatch):
    from normkit import _backend

    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_backend, "_WORKSPACE_SIZES", {})  # sizes remembered by other tests
    # its streams are not real: none captures (the capture test sets its own answer), and every
    # device has a context (the restore test sets its own answer)
    monkeypatch.setattr(_backend._C, "cuda_capture_id", lambda stream: 0)
    monkeypatch.setattr(_backend._C, "cuda_has_primary_context", lambda device: True)
    return cupy


def test_launch_args_take_the_stream_and_workspace_of_the_arrays_device(fake_cupy):
    from normkit._backend import launch_args

    x = fake_cupy_array(fake_cupy, 1)  # device 0 is current
    args = launch_args(x, lambda a: 7)
    assert args == {"stream": 0x1001, "workspace": ("workspace on", 1)}
    assert fake_cupy.current == 0  # restored
    assert ("empty", 1, 7) in fake_cupy.log


# --- (7) host overhead per op ---------------------------------------------------------------------

def test_a_workspace_size_is_asked_once_per_shape_dtype_device_and_arguments(fake_cupy):
    """The size query goes through DLPack (a capsule per call); its answer depends on the shape,
    dtype, device and the query's own arguments alone, so each is asked once, while every call
    still gets a fresh workspace of that size on the array's device."""
    from normkit._backend import launch_args

    asked = []

    def query(a, *args):
        asked.append((a.shape, a.dtype, a.device.id, args))
        return 10 * len(asked)

    for _ in range(3):
        assert launch_args(fake_cupy_array(fake_cupy, 0), query)["workspace"] == ("workspace on", 0)
    assert len(asked) == 1
    launch_args(fake_cupy_array(fake_cupy, 0, shape=(2, 4)), query)
    launch_args(fake_cupy_array(fake_cupy, 0, dtype=np.float64), query)
    launch_args(fake_cupy_array(fake_cupy, 1), query)
    launch_args(fake_cupy_array(fake_cupy, 0), query, 3)  # group norm's groups
    launch_args(fake_cupy_array(fake_cupy, 0), lambda a: 99)  # another family's query
    launch_args(fake_cupy_array(fake_cupy, 1), query)
    launch_args(fake_cupy_array(fake_cupy, 0), query, 3)
    assert asked == [((2, 3), np.float32, 0, ()), ((2, 4), np.float32, 0, ()),
                     ((2, 3), np.float64, 0, ()), ((2, 3), np.float32, 1, ()),
                     ((2, 3), np.float32, 0, (3,))]
    sizes = [e[2] for e in fake_cupy.log if e[0] == "empty"]
    assert sizes == [10, 10, 10, 20, 30, 40, 50, 99, 40, 50]
    devices = [e[1] for e in fake_cupy.log if e[0] == "empty"]
    assert devices == [0, 0, 0, 0, 0, 1, 0, 0, 1, 0]


def test_the_remembered_sizes_are_bounded(fake_cupy, monkeypatch):
    from normkit import _backend

    monkeypatch.setattr(_backend, "_MOST_WORKSPACE_SIZES", 3)
    for n in range(1, 8):
        _backend.launch_args(fake_cupy_array(fake_cupy, 0, shape=(n, 3)), lambda a: a.shape[0])
        assert len(_backend._WORKSPACE_SIZES) <= 3
    assert [e[2] for e in fake_cupy.log if e[0] == "empty"] == list(range(1, 8))


def test_the_functional_ops_query_each_workspace_size_once(fake_cupy, monkeypatch):
    """batch norm, group norm and encoding through launch_args: one query per shape."""
    import importlib

    from normkit import _backend

    batchnorm, encoding, groupnorm = (importlib.import_module(f"normkit.functional.{m}")
                                      for m in ("batchnorm", "encoding", "groupnorm"))

    asked = []
    monkeypatch.setattr(_backend._C, "batch_norm_workspace_size",
                        lambda a: asked.append("batch") or 11)
    monkeypatch.setattr(_backend._C, "group_norm_workspace_size",
                        lambda a, g: asked.append(("group", g)) or 12)
    monkeypatch.setattr(_backend._C, "encoding_workspace_size",
                        lambda B, N, K: asked.append(("encoding", B, N, K)) or 13)
    x = fake_cupy_array(fake_cupy, 0)
    for _ in range(2):
        assert batchnorm._reducing(x)["workspace"] == ("workspace on", 0)
        groupnorm._reducing(x, 4)
        groupnorm._reducing(x, 2)
        encoding._launch(x, 1, 2, 3)
    assert asked == ["batch", ("group", 4), ("group", 2), ("encoding", 1, 2, 3)]
    assert [e[2] for e in fake_cupy.log if e[0] == "empty"] == [11, 12, 12, 13] * 2


def test_launch_args_switch_no_device_when_the_arrays_is_current(fake_cupy):
    from normkit._backend import launch_args

    fake_cupy.current = 1
    args = launch_args(fake_cupy_array(fake_cupy, 1))
    assert args == {"stream": 0x1001}
    assert not [e for e in fake_cupy.log if e[0] == "set"]


def test_the_previous_device_is_restored_only_where_its_context_exists(fake_cupy, monkeypatch):
    """A thread that never chose a device reports device 0: after an op on device 1 it is not
    made current again, which would create a context on GPU 0."""
    from normkit import _backend

    monkeypatch.setattr(_backend._C, "cuda_has_primary_context", lambda device: device != 0)
    _backend.launch_args(fake_cupy_array(fake_cupy, 1))
    assert fake_cupy.log[-1] == ("set", 1) and fake_cupy.current == 1
    fake_cupy.current = 2  # device 2 has a context: restored
    _backend.launch_args(fake_cupy_array(fake_cupy, 1))
    assert fake_cupy.log[-2:] == [("set", 1), ("set", 2)] and fake_cupy.current == 2


def test_ops_and_layers_run_on_their_first_arrays_device(fake_cupy):
    from normkit._backend import on_array_device
    from normkit.nn.module import Module

    seen = []

    @on_array_device
    def op(a, b=None, *, c=None):
        seen.append(fake_cupy.current)

    op(fake_cupy_array(fake_cupy, 2))
    op(None, fake_cupy_array(fake_cupy, 1))
    op(None, c=fake_cupy_array(fake_cupy, 3))
    op(np.zeros(2), fake_cupy_array(fake_cupy, 1))  # NumPy first: nothing to select
    assert seen == [2, 1, 3, 0] and fake_cupy.current == 0

    class Layer(Module):
        def forward(self, x):
            seen.append(("forward", fake_cupy.current))

        def backward(self, dy):
            seen.append(("backward", fake_cupy.current))

    layer = Layer()
    layer(fake_cupy_array(fake_cupy, 1))
    layer.backward(fake_cupy_array(fake_cupy, 2))
    assert seen[-2:] == [("forward", 1), ("backward", 2)] and fake_cupy.current == 0


def test_every_public_functional_op_selects_the_device():
    """Each public op of normkit.functional that takes arrays carries the device selection."""
    import inspect

    import normkit.functional as F

    takes_no_array = {"set_between_gemm_threads", "get_between_gemm_threads",
                      "conv_transpose_output_padding", "convention_id"}
    names = [n for n, f in vars(F).items() if inspect.isfunction(f) and not n.startswith("_")]
    missing = [n for n in names if n not in takes_no_array
               and getattr(getattr(F, n), "__wrapped__", None) is None]
    assert names and not missing, missing


@two_gpus
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_on_cuda1_while_cuda0_is_current(dtype):
    import cupy

    import normkit.functional as F

    rng = np.random.default_rng(6)
    xh = rng.standard_normal((4, 6, 5, 3)).astype(dtype)
    with cupy.cuda.Device(1):
        x = cupy.asarray(xh)
    with cupy.cuda.Device(0):
        y, mean, invstd = F.batch_norm_forward(x)
        dx, dw, db = F.batch_norm_backward(y, x, mean, invstd)
        g, gm, gr = F.group_norm_forward(x, 3)
    for a in (y, mean, invstd, dx, g, gm, gr):
        assert a.device.id == 1
    ye, me, ie = F.batch_norm_forward(xh)
    np.testing.assert_allclose(y.get(), ye, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean.get(), me, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.get(), F.group_norm_forward(xh, 3)[0], rtol=1e-4, atol=1e-4)


@two_gpus
def test_a_layer_moved_to_cuda1_trains_while_cuda0_is_current():
    import cupy

    import normkit.nn as nn

    rng = np.random.default_rng(7)
    xh = rng.standard_normal((4, 6, 5, 3)).astype(np.float32)
    cpu = nn.BatchNorm2d(6)
    gpu1 = nn.BatchNorm2d(6).to("cuda:1")
    with cupy.cuda.Device(0):
        y = gpu1(_on(1, xh))
        dx = gpu1.backward(_on(1, np.ones_like(xh)))
    ye = cpu(xh)
    dxe = cpu.backward(np.ones_like(xh))
    assert y.device.id == 1 and dx.device.id == 1 and gpu1.running_mean.device.id == 1
    np.testing.assert_allclose(y.get(), ye, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.get(), dxe, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu1.running_var.get(), cpu.running_var, rtol=1e-5)


def _on(device, a):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(a)


# --- (3) producer-stream waits, capture-aware ------------------------------------------------------

@pytest.mark.parametrize("query", [
    lambda C, X: C.batch_norm_workspace_size(X),
    lambda C, X: C.group_norm_workspace_size(X, 1),
    lambda C, X: C.ncs_collapsible(X),
], ids=["batch_norm_workspace_size", "group_norm_workspace_size", "ncs_collapsible"])
def test_size_queries_ask_dlpack_for_no_stream_synchronization(query):
    """A query reads only the array's description: stream=-1 (no synchronization), never the
    legacy default stream (stream=1), which would break a CUDA-graph capture."""
    from normkit import _C

    X = BothProtocols(np.random.default_rng(8).standard_normal((3, 2, 4)), device_type=2)
    query(_C, X)
    assert X.streams == [-1]


def _capture_case(cp, producer_stream):
    """A batch-norm training step captured on a new stream, its input presented through the CUDA
    Array Interface naming `producer_stream`; the replayed step's y against an eager one."""
    import normkit
    from gpu_helpers import CudaArrayInterface

    rng = np.random.default_rng(9)
    x = cp.asarray(rng.standard_normal((4, 6, 7, 5)), cp.float32)
    C = 6
    y, mean, var, invstd = cp.empty_like(x), *(cp.empty(C, cp.float32) for _ in range(3))
    ws = cp.empty(normkit._C.batch_norm_workspace_size(x), cp.float64)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    X = CudaArrayInterface(x, stream=producer_stream)
    with stream:
        stream.begin_capture()
        normkit._C.batch_norm_forward_train(X, None, None, 1e-5, y, mean, var, invstd,
                                            stream=stream.ptr, workspace=ws)
        graph = stream.end_capture()
    graph.launch(stream=stream)
    stream.synchronize()
    expected = normkit.functional.batch_norm_forward(x, eps=1e-5)[0]
    cp.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@gpu
def test_capture_waits_on_a_non_capturing_producer_stream_through_an_external_event():
    import cupy as cp

    producer = cp.cuda.Stream(non_blocking=True)
    _capture_case(cp, producer.ptr)


@gpu
def test_capture_never_touches_the_legacy_stream_named_by_a_producer():
    import cupy as cp

    _capture_case(cp, 1)  # interface stream 1: the legacy default stream


@gpu
def test_a_workspace_query_on_a_cupy_array_inside_a_global_capture():
    import cupy as cp

    from normkit import _C

    x = cp.ones((4, 3, 5), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture(mode=getattr(cp.cuda.runtime, "streamCaptureModeGlobal", 0))
        try:
            n = _C.batch_norm_workspace_size(x)
        finally:
            stream.end_capture()
    assert n > 0


@two_gpus
def test_a_producer_wait_for_an_array_on_cuda1_while_cuda0_is_current():
    import cupy as cp

    from gpu_helpers import CudaArrayInterface
    import normkit

    with cp.cuda.Device(1):
        x = cp.asarray(np.random.default_rng(10).standard_normal((4, 3, 5)), cp.float32)
        producer, consumer = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
        mean, var = cp.empty(3, cp.float32), cp.empty(3, cp.float32)
        ws = cp.empty(normkit._C.batch_norm_workspace_size(x), cp.float64)
    with cp.cuda.Device(0):
        normkit._C.batch_norm_stats(CudaArrayInterface(x, stream=producer.ptr), mean, var,
                                    stream=consumer.ptr, workspace=ws)
    consumer.synchronize()
    cp.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)


# --- (4) workspaces under graph capture ------------------------------------------------------------

def test_ops_allocate_from_one_retained_pool_per_capture(fake_cupy, monkeypatch):
    """While the stream captures, an op's allocations (workspace, statistics it drops) come from
    a pool of that capture's own, kept after the op: the graph replays into those addresses."""
    from normkit import _backend

    capture = {"id": 0}
    monkeypatch.setattr(_backend._C, "cuda_capture_id", lambda stream: capture["id"])
    monkeypatch.setattr(_backend, "_CAPTURE_POOLS", {})

    @_backend.on_array_device
    def op(x):
        return fake_cupy.current

    x = fake_cupy_array(fake_cupy, 0)
    op(x)  # eager: CuPy's own allocator
    assert not [e for e in fake_cupy.log if e[0] == "allocator"] and not _backend._CAPTURE_POOLS
    capture["id"] = 41
    op(x)
    op(x)
    capture["id"] = 42
    op(x)
    pools = _backend._CAPTURE_POOLS
    assert sorted(pools) == [(0, 41), (0, 42)] and pools[(0, 41)] is not pools[(0, 42)]
    used = [e[1] for e in fake_cupy.log if e[0] == "allocator"]
    assert used == [pools[(0, 41)], pools[(0, 41)], pools[(0, 42)]]


@gpu
def test_a_captured_step_replays_correctly_after_the_pool_reuses_memory():
    """Captured with CuPy's default allocator current (no private pool): after capture, new
    arrays are made and filled; each replay must still give the eager result and leave those
    arrays intact (the ops' dropped statistics and workspaces live in the capture's pool)."""
    import cupy as cp

    import normkit.functional as F

    rng = np.random.default_rng(11)
    x = cp.asarray(rng.standard_normal((8, 16, 9, 7)), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        y, mean, invstd = F.batch_norm_forward(x)
        dx, dw, db = F.batch_norm_backward(y, x, mean, invstd)
        graph = stream.end_capture()
    others = [cp.full(n, 7.0, cp.float64) for n in (64, 256, 1024, 4096)]
    for step in range(3):
        x[...] = cp.asarray(rng.standard_normal(x.shape), cp.float32)
        stream.synchronize()
        with stream:
            graph.launch(stream=stream)
        stream.synchronize()
        ye, me, ie = F.batch_norm_forward(x)
        cp.testing.assert_allclose(y, ye, rtol=1e-5, atol=1e-5)
        cp.testing.assert_allclose(dx, F.batch_norm_backward(ye, x, me, ie)[0], rtol=1e-4,
                                   atol=1e-5)
        for o in others:
            assert bool((o == 7.0).all())


# --- (6) grids sized by occupancy ------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_batch_norm_plans_stay_within_one_wave(dtype):
    """The reductions' work items (workspace partials / 3) fit one wave of resident blocks: at
    most 2048 threads (8 blocks of 256) per SM, a whole number of items per channel."""
    import cupy as cp

    from normkit import _C

    C = 64
    x = cp.empty((16, C, 112, 112), dtype)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    partials = _C.batch_norm_workspace_size(x) // 3
    assert partials % C == 0 and C <= partials <= 8 * sms
    wide = cp.empty((4, 3 * 8 * sms, 9, 9), dtype)  # more channels than one wave holds: G = 1
    assert _C.batch_norm_workspace_size(wide) == 3 * wide.shape[1]


@gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,groups,channels_last", [
    ((32, 256, 28, 28), 32, False),  # maps: 256 items of 8 where 544 of 17 were before
    ((1, 32, 256, 256), 32, False),  # a few long segments: several items each
    ((2, 64, 40, 40), 8, True),      # channels-last reductions
    ((3, 12, 7), 3, False),          # odd lengths: one value per access
])
def test_group_norm_on_occupancy_sized_plans_against_float64(dtype, shape, groups, channels_last):
    """The occupancy-sized plans split each segment into a different number of work items than
    the fixed-grid ones did: forward and backward still match a float64 reference."""
    import cupy as cp

    import normkit.functional as F

    rng = np.random.default_rng(13)
    x64 = rng.standard_normal(shape) * 2 + 3
    dy64 = rng.standard_normal(shape)
    C = shape[1]
    w, b = rng.standard_normal(C) + 1, rng.standard_normal(C)
    P = np.float64 if dtype == np.float64 else np.float32
    x, dy = cp.asarray(x64.astype(dtype)), cp.asarray(dy64.astype(dtype))
    if channels_last:
        x = cp.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    x64, dy64 = cp.asnumpy(x).astype(np.float64), cp.asnumpy(dy).astype(np.float64)
    y, mean, rstd = F.group_norm_forward(x, groups, cp.asarray(w, P), cp.asarray(b, P))
    dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, cp.asarray(w, P), True)
    xg = x64.reshape(shape[0], groups, -1)
    m, v = xg.mean(axis=2, keepdims=True), xg.var(axis=2, keepdims=True)
    r = 1 / np.sqrt(v + 1e-5)
    xhat = ((xg - m) * r).reshape(shape)
    wb = (slice(None),) + (None,) * (len(shape) - 2)
    y_ref = xhat * w[wb] + b[wb]
    g = (dy64 * w[wb]).reshape(shape[0], groups, -1)
    xh = xhat.reshape(shape[0], groups, -1)
    dx_ref = (r * (g - g.mean(axis=2, keepdims=True)
                   - xh * (g * xh).mean(axis=2, keepdims=True))).reshape(shape)
    tol = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(cp.asnumpy(y).astype(np.float64), y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(cp.asnumpy(dx).astype(np.float64), dx_ref, rtol=tol,
                               atol=tol * 10)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(cp.asnumpy(db), dy64.sum(axis=axes), rtol=tol, atol=tol * 100)
    np.testing.assert_allclose(cp.asnumpy(dw), (dy64 * xhat).sum(axis=axes), rtol=tol,
                               atol=tol * 100)


@gpu
def test_cached_producer_events_serve_eager_waits_and_a_capture_alike():
    """One event per (device, producer stream) is re-recorded by every wait: an eager op, then a
    capture waiting on the same producer (external wait), its replay after more producer work,
    then eager again; x and y share the producer (one wait for both)."""
    import cupy as cp

    import normkit
    from gpu_helpers import CudaArrayInterface

    rng = np.random.default_rng(14)
    producer, consumer = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(rng.standard_normal((4, 6, 9)), cp.float32)
    y = cp.empty_like(x)
    mean, var, invstd = (cp.empty(6, cp.float32) for _ in range(3))
    ws = cp.empty(normkit._C.batch_norm_workspace_size(x), cp.float64)

    def step():
        normkit._C.batch_norm_forward_train(
            CudaArrayInterface(x, stream=producer.ptr), None, None, 1e-5,
            CudaArrayInterface(y, stream=producer.ptr), mean, var, invstd,
            stream=consumer.ptr, workspace=ws)

    def check():
        consumer.synchronize()
        xs = cp.asnumpy(x).astype(np.float64)
        m, v = xs.mean(axis=(0, 2)), xs.var(axis=(0, 2))
        ref = (xs - m[None, :, None]) / np.sqrt(v[None, :, None] + 1e-5)
        np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=1e-4, atol=1e-5)

    def produce(seed):  # new values of x, written on the producer stream
        with producer:
            x[...] = cp.asarray(np.random.default_rng(seed).standard_normal(x.shape), cp.float32)

    produce(1)
    step()
    check()
    cp.cuda.Device().synchronize()
    with consumer:
        consumer.begin_capture()
        step()
        graph = consumer.end_capture()
    for seed in (2, 3):
        produce(seed)
        producer.synchronize()  # a replay is ordered by the stream it runs on, not the capture
        graph.launch(stream=consumer)
        check()
    produce(4)
    step()
    check()


class RefusesNoSync(BothProtocols):
    """An exporter whose __dlpack__ refuses stream=-1 (older DLPack rules) and that also exports
    the CUDA Array Interface, which records that it was read."""

    read_cai = False

    def __dlpack__(self, **kwargs):
        if kwargs.get("stream") == -1:
            raise ValueError("stream -1 is not supported")
        return super().__dlpack__(**kwargs)

    @property
    def __cuda_array_interface__(self):
        type(self).read_cai = True
        return HostCudaArray(self.a).__cuda_array_interface__


def test_a_size_query_falls_back_to_the_interface_when_dlpack_refuses_no_sync():
    import normkit
    from normkit import _C

    X = RefusesNoSync(np.random.default_rng(12).standard_normal((3, 2, 4)), device_type=2)
    if normkit.cuda_available():
        pytest.skip("a GPU is present: the host pointer would be taken for device memory")
    with pytest.raises(RuntimeError, match="CUDA cannot run here|this build of normkit has none"):
        _C.batch_norm_workspace_size(X)  # the interface was read: its pointer is asked about
    assert RefusesNoSync.read_cai
