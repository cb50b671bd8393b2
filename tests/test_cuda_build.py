"""The CUDA side of the build, on any machine: the module is compiled when CI requires it, CUDA
arrays are checked (dtype, mask, stream, strides) before any device is touched, and without a
usable GPU they give a clear RuntimeError; communicators explain what they are missing. No test
here needs a GPU."""
import importlib.util
import os

import numpy as np
import pytest

import normkit
from normkit import _C


class FakeCudaArray:
    """Something that exports __cuda_array_interface__ v3 (pointing at host memory: the checks
    under test fire before any device is asked about it)."""

    def __init__(self, a, readonly=False, **fields):
        self.a, self.readonly, self.fields = a, readonly, fields

    @property
    def __cuda_array_interface__(self):
        cai = {"shape": self.a.shape, "typestr": self.a.dtype.str, "version": 3,
               "data": (self.a.ctypes.data, self.readonly), "strides": None}
        cai.update(self.fields)
        return cai


def test_cuda_module_is_built_where_ci_requires_it():
    """.ci/run sets NORMKIT_REQUIRE_CUDA_BUILD=1 where nvcc is found: a CUDA compile error, or a
    build that silently skipped CUDA, then fails CI."""
    if os.environ.get("NORMKIT_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("NORMKIT_REQUIRE_CUDA_BUILD is not set (CI sets it where nvcc is present)")
    assert _C.built_with_cuda()


def test_cpu_arrays_need_no_workspace_and_ignore_the_stream():
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    assert _C.batch_norm_workspace_size(x) == 0
    m, v = np.empty(4, np.float32), np.empty(4, np.float32)
    _C.batch_norm_stats(x, m, v, stream=12345, workspace=None)
    np.testing.assert_allclose(m, x.mean(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("typestr,match", [("<i4", "'<i4'"), (">f4", "'>f4'"),
                                           ("<V2", "bfloat16 arrays through DLPack")])
def test_cuda_array_dtype_is_checked_first(typestr, match):
    x = FakeCudaArray(np.zeros((3, 4), np.float32), typestr=typestr)
    with pytest.raises(TypeError, match=match):
        _C.batch_norm_workspace_size(x)


def test_cuda_array_mask_stream_and_strides_are_checked_first():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="masked"):
        _C.batch_norm_workspace_size(FakeCudaArray(x, mask=FakeCudaArray(x)))
    with pytest.raises(ValueError, match="stream 0"):
        _C.batch_norm_workspace_size(FakeCudaArray(x, stream=0))
    with pytest.raises(ValueError, match="multiple of its item size"):
        _C.batch_norm_workspace_size(FakeCudaArray(x, strides=(16, 2)))


def test_cuda_array_without_usable_cuda_is_a_runtime_error():
    if normkit.cuda_available():
        pytest.skip("a GPU is present: CUDA arrays are usable here")
    x = FakeCudaArray(np.zeros((3, 4), np.float32))
    expected = ("CUDA cannot run here" if _C.built_with_cuda()
                else "this build of normkit has none")
    with pytest.raises(RuntimeError, match=expected):
        _C.batch_norm_workspace_size(x)


def test_encoding_and_im2col_on_cuda_arrays_without_usable_cuda_are_runtime_errors():
    """The Encoding and im2col families dispatch CUDA arrays like batch norm: to their CUDA
    kernels in a CUDA build (here a clear error, with no GPU), never to the CPU kernels."""
    if normkit.cuda_available():
        pytest.skip("a GPU is present: CUDA arrays are usable here")
    expected = ("CUDA cannot run here" if _C.built_with_cuda()
                else "this build of normkit has none")
    B, N, D, K = 2, 5, 3, 4
    X, XC, D2 = (FakeCudaArray(np.zeros(shape, np.float32))
                 for shape in ((B, N, D), (B, N, K), (B, N, K)))
    C, s = FakeCudaArray(np.zeros((K, D), np.float32)), FakeCudaArray(np.zeros(K, np.float32))
    ws = FakeCudaArray(np.zeros(_C.encoding_workspace_size(B, N, K)))
    with pytest.raises(RuntimeError, match=expected):
        _C.scaled_l2_forward(X, C, s, XC, D2, None, workspace=ws)
    x, cols = FakeCudaArray(np.zeros((1, 2, 5, 5), np.float32)), FakeCudaArray(
        np.zeros((1, 18, 9), np.float32))
    with pytest.raises(RuntimeError, match=expected):
        _C.im2col(x, cols, [3, 3], [1, 1], [0, 0], [1, 1])


def test_mpi_cuda_awareness_can_be_forced(monkeypatch):
    from normkit.distributed import mpi_cuda_aware

    monkeypatch.setenv("NORMKIT_MPI_CUDA_AWARE", "1")
    assert mpi_cuda_aware() is True
    monkeypatch.setenv("NORMKIT_MPI_CUDA_AWARE", "0")
    assert mpi_cuda_aware() is False


def test_nccl_communicator_names_what_is_missing():
    from normkit.distributed import NCCLCommunicator

    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(ImportError, match="needs CuPy"):
            NCCLCommunicator()
        return
    from cupy.cuda import nccl

    if nccl.available:
        pytest.skip("NCCL is installed: its absence cannot be shown here")
    with pytest.raises(ImportError, match="needs the NCCL library"):
        NCCLCommunicator()


def test_module_to_cuda_needs_cuda():
    if normkit.cuda_available():
        pytest.skip("a GPU is present: to('cuda') works here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        normkit.nn.BatchNorm1d(3).to("cuda:0")
    with pytest.raises(ValueError, match="device must be"):
        normkit.nn.BatchNorm1d(3).to("cuda:x")
    with pytest.raises(ValueError, match="device must be"):
        normkit.nn.BatchNorm1d(3).to("cpu:1")


def test_group_norm_on_cuda_arrays_without_usable_cuda_is_a_runtime_error():
    """The per-sample statistics family dispatches CUDA arrays to its CUDA kernels (here a clear
    error, with no GPU), never to the CPU kernels."""
    if normkit.cuda_available():
        pytest.skip("a GPU is present: CUDA arrays are usable here")
    expected = ("CUDA cannot run here" if _C.built_with_cuda()
                else "this build of normkit has none")
    N, C, G = 2, 4, 2
    x, y = (FakeCudaArray(np.zeros((N, C, 5), np.float32)) for _ in range(2))
    mean, var, rstd = (FakeCudaArray(np.zeros((N, G), np.float32)) for _ in range(3))
    s1, s2 = (FakeCudaArray(np.zeros((N, C), np.float32)) for _ in range(2))
    ws = FakeCudaArray(np.zeros(64))
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_workspace_size(x, G)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_stats(x, mean, var, workspace=ws)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_affine(x, mean, s1, s2, y)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_forward(x, None, None, 1e-5, y, mean, var, rstd, workspace=ws)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_backward_reduce(y, x, mean, s1, s2, workspace=ws)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_backward_elemt(y, x, mean, s1, None, None, y)
    with pytest.raises(RuntimeError, match=expected):
        _C.group_norm_backward(y, x, mean, rstd, None, y, s1, s2, workspace=ws)
