"""Helpers of the GPU tests: NumPy arrays moved to CuPy with their exact memory layout, bfloat16
arrays (which CuPy lacks) presented through DLPack, and the skip conditions.

Nothing here calls normkit's kernels: it only moves and relabels memory.
"""
import ctypes

import numpy as np

import normkit


def gpu_skip_reason():
    """Why GPU tests cannot run here, or None when they can."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda13x, the 'cuda' extra)"
    if not normkit._C.built_with_cuda():
        return "normkit was built without CUDA"
    if not normkit.cuda_available():
        return "no CUDA device: normkit.cuda_available() is False"
    return None


def to_gpu(a):
    """`a` (a NumPy array or view) as a CuPy array with the same shape, strides and byte offset
    into a device copy of the buffer it views: every layout (channels-last, strided, sliced,
    negative strides) arrives as it is, holes included."""
    import cupy as cp

    if a is None:
        return None
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert root.flags.owndata and (root.flags.c_contiguous or root.flags.f_contiguous), \
        "to_gpu needs a view of an array that owns contiguous memory"
    raw = cp.asarray(root.ravel(order="A").view(np.uint8))
    offset = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return cp.ndarray(a.shape, a.dtype, memptr=raw.data + offset, strides=a.strides)


def to_host(a):
    """A CuPy array (or None, or a NumPy array) as NumPy."""
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.get()


# --------------------------------------------------------------------------------------------------
# bfloat16: the top 16 bits of a float32, rounded to nearest even.


def bf16_bits(x):
    """float32 values -> uint16 bfloat16 bit patterns (round to nearest even; finite inputs)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits):
    """uint16 bfloat16 bit patterns -> their float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


class BFloat16:
    """A CuPy uint16 array of bfloat16 bits, exported through DLPack as a bfloat16 tensor: the
    exporter's capsule with its dtype code changed from unsigned int to bfloat (same bits, same
    size). It records the streams consumers asked for."""

    _DTYPE_CODE_OFFSET = 20  # DLTensor: data (8), device (8), ndim (4), then dtype.code
    _BFLOAT = 4

    def __init__(self, bits):
        assert bits.dtype == np.uint16
        self.bits = bits
        self.streams = []

    def __dlpack_device__(self):
        return self.bits.__dlpack_device__()

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        capsule = self.bits.__dlpack__(stream=stream)
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.py_object, ctypes.c_char_p]
        tensor = get(capsule, b"dltensor")
        ctypes.c_uint8.from_address(tensor + self._DTYPE_CODE_OFFSET).value = self._BFLOAT
        return capsule


class CudaArrayInterface:
    """A CuPy array exported through __cuda_array_interface__ v3 with a chosen `stream` field
    (and, if asked, marked read-only, which CuPy arrays never are)."""

    def __init__(self, array, stream=None, readonly=False):
        self.array, self.stream, self.readonly = array, stream, readonly

    @property
    def __cuda_array_interface__(self):
        cai = dict(self.array.__cuda_array_interface__)
        cai["stream"] = self.stream
        cai["data"] = (cai["data"][0], self.readonly)
        return cai
