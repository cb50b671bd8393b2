"""Array-library plumbing shared by the functional ops and the layers: which library an array
belongs to (NumPy or CuPy), dtypes of parameters, layouts the kernels can read, devices, and the
stream and workspace GPU ops run with."""
import contextlib
import functools
import itertools
import math
import numbers

import numpy as np

from . import _C


def cuda_available():
    """Whether GPU ops can run: normkit was built with CUDA and a CUDA device is present."""
    return bool(_C.built_with_cuda()) and _C.cuda_device_count() > 0


def array_module(x, name="x"):
    """numpy or cupy, whichever `x` belongs to; a TypeError naming `name` for anything else
    (masked arrays too: the kernels would read the masked values)."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a NumPy masked array; the kernels read every value, masked "
                        f"or not: pass x.filled(...) or x.compressed() as you mean it")
    if isinstance(x, np.ndarray):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise TypeError(
        f"{name} must be a NumPy or CuPy array, got {type(x).__module__}.{type(x).__qualname__}"
    )


def param_dtype(dtype):
    """Dtype of parameters and statistics for inputs of `dtype`: float16 (and bfloat16) inputs run
    with float32 parameters (mixed precision); float32 and float64 use their own."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def kernel_input(x, name="x"):
    """`x` itself when the kernels can read its strides and it is aligned to its items, else one
    contiguous copy of it."""
    xp = array_module(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C, ...), got {x.ndim}D input of shape "
                         f"{tuple(x.shape)}")
    if not getattr(x.flags, "aligned", True):  # a view at a byte offset: the core refuses it
        return x.copy()  # (ascontiguousarray returns a contiguous x itself, misaligned)
    if x.ndim >= 3 and not x.flags.c_contiguous and not _C.ncs_collapsible(x):
        return xp.ascontiguousarray(x)
    return x


def _cupy_array(a):
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "device")


def on_device(x):
    """A context in which CuPy's current device is `x`'s (a CuPy array): streams, workspaces and
    outputs then come from the array's device, whichever device is current outside. A no-op
    context for NumPy arrays and where `x`'s device is current already (the common case: no
    device switch)."""
    if isinstance(x, np.ndarray) or not _cupy_array(x):
        return contextlib.nullcontext()
    import cupy

    if x.device.id == cupy.cuda.runtime.getDevice():
        return contextlib.nullcontext()
    return _DeviceScope(x.device.id)


class _DeviceScope:
    """Makes `device` current; on exit restores the previous device only where its context
    exists. (cupy.cuda.Device's exit restores unconditionally, and with CUDA 12+ that creates a
    context, hundreds of MB, on a device the thread never used: GPU 0 for a thread that never chose
    one.)"""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import cupy

        self.previous = cupy.cuda.runtime.getDevice()
        cupy.cuda.runtime.setDevice(self.device)
        return self

    def __exit__(self, *exc):
        import cupy

        if _C.cuda_has_primary_context(self.previous):
            cupy.cuda.runtime.setDevice(self.previous)


def on_array_device(fn):
    """`fn` run on the device of its first CuPy array argument (see on_device), and, while that
    device's current stream captures a CUDA graph, with CuPy allocating from the capture's own
    pool (see capture_allocator)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        for a in itertools.chain(args, kwargs.values()):
            if isinstance(a, np.ndarray):
                return fn(*args, **kwargs)
            if _cupy_array(a):
                with on_device(a), capture_allocator():
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


# One CuPy memory pool per CUDA-graph capture, kept for the life of the process. Memory an op
# allocates while capturing (workspaces, statistics it does not return, temporaries) is written at
# its address by every replay of the graph, so it must never go back to the pool that serves
# everything else, nor to another capture's graph; a capture cannot see when its graph is
# destroyed, so the pools are never released: capture a step once and replay it. (torch needs
# none of this: it allocates during a capture from a pool that the graph owns.)
_CAPTURE_POOLS = {}


def capture_allocator():
    """A context that makes CuPy allocate from the current capture's pool while the current
    stream captures; a no-op context otherwise (one cudaStreamGetCaptureInfo)."""
    import cupy

    key = _C.cuda_capture_id(cupy.cuda.get_current_stream().ptr)
    if not key:
        return contextlib.nullcontext()
    key = (cupy.cuda.runtime.getDevice(), key)
    pool = _CAPTURE_POOLS.get(key)
    if pool is None:
        pool = _CAPTURE_POOLS[key] = cupy.cuda.MemoryPool()
    return cupy.cuda.using_allocator(pool.malloc)


# Workspace sizes by (size query, its other arguments, shape, dtype, device). A reducing family's
# size is a function of those alone: its grids are planned from the shape, the dtype's kernels'
# occupancy and the device's SM count, never from strides or data. Asking the core through the
# array costs the binding's DLPack protocol calls and CuPy's export of a capsule on every call
# (benchmarks/bench_binding.py: 0.5 us with a stand-in whose export is NumPy's, so before CuPy's
# own); the table takes 0.4 us, whatever the exporter. (normkit.torch asks every time: torch's
# to_dlpack and the query take less than building the key.) Bounded: a stream of new shapes
# (varying sequence lengths) starts it afresh rather than growing without end.
_WORKSPACE_SIZES = {}
_MOST_WORKSPACE_SIZES = 4096


def remembered_workspace_size(key, query):
    """`query()`, an op family's workspace-size query, asked once per `key` (see
    _WORKSPACE_SIZES for what the key must hold)."""
    size = _WORKSPACE_SIZES.get(key)
    if size is None:
        if len(_WORKSPACE_SIZES) >= _MOST_WORKSPACE_SIZES:
            _WORKSPACE_SIZES.clear()
        size = _WORKSPACE_SIZES[key] = query()
    return size


def launch_args(x, workspace_size=None, *args):
    """Keyword arguments that run a core op on `x`'s device: nothing for NumPy arrays; for CuPy
    arrays the current stream of `x`'s device and, when the op reduces (`workspace_size` given,
    e.g. ``_C.batch_norm_workspace_size``, called as ``workspace_size(x, *args)`` once per shape,
    dtype and device), a float64 workspace from that device's memory pool."""
    if isinstance(x, np.ndarray):
        return {}
    import cupy

    with on_device(x):
        out = {"stream": cupy.cuda.get_current_stream().ptr}
        if workspace_size is not None:
            key = (workspace_size, args, x.shape, x.dtype, x.device.id)
            size = remembered_workspace_size(key, lambda: workspace_size(x, *args))
            out["workspace"] = cupy.empty(size, cupy.float64)
    return out


def check_eps(op, eps, training):
    """eps as torch.nn.functional.batch_norm takes it: positive in training, >= 0 in eval (a
    constant channel with eps = 0 then gives inf or NaN, as in torch); a float either way."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if training and not eps > 0:
        raise ValueError(f"{op}: eps must be positive during training, got {eps}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be non-negative, got {eps}")
    return eps


def check_num_features(layer, num_features):
    """`num_features` as a positive int (an integral float is taken too); a TypeError for what is
    not a number (None, strings, bools), a ValueError for inf, NaN, fractions and values < 1."""
    value = num_features
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise TypeError(f"{layer}: num_features must be a positive integer, got "
                        f"{type(value).__name__} {value!r}")
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"{layer}: num_features must be a positive integer, got {value!r}")
    return int(value)


def writeable(a):
    """Whether `a` may be written (CuPy arrays have no read-only flag: always)."""
    return getattr(a.flags, "writeable", True)


def like(x, src):
    """`src` laid out like `x` (same strides) so that both take the same fast path; `src` itself
    when it already is, or when its dtype or shape differ (the core then names the mismatch)."""
    if src.strides == x.strides or src.dtype != x.dtype or src.shape != x.shape:
        return src
    out = array_module(x).empty_like(x)
    out[...] = src
    return out


def parse_device(device):
    """'cpu' or 'cuda' for a device string 'cpu', 'cuda' or 'cuda:N'."""
    return _split_device(device)[0]


def _split_device(device):
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return kind, int(index) if index else None


def to_device(x, device):
    """`x` on `device` ('cpu' -> NumPy; 'cuda' -> CuPy on the current device, 'cuda:N' on device
    N); `x` itself when it is already there."""
    kind, index = _split_device(device)
    if kind == "cpu":
        return x if isinstance(x, np.ndarray) else x.get()
    if not cuda_available():
        raise RuntimeError(
            "normkit: CUDA is not available (normkit was built without CUDA, or no GPU is present)"
        )
    import cupy

    target = cupy.cuda.Device(index) if index is not None else cupy.cuda.Device()
    if isinstance(x, cupy.ndarray) and x.device.id == target.id:
        return x
    with target:
        # from another GPU through the host: simple, and moving a layer is rare
        return cupy.asarray(x if isinstance(x, np.ndarray) else x.get())
