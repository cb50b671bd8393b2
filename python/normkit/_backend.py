"""Array-library plumbing shared by the functional ops and the layers: which library an array
belongs to (NumPy or CuPy), dtypes of parameters, layouts the kernels can read, devices."""
import numpy as np

from . import _C


def cuda_available():
    """Whether GPU ops can run: normkit was built with CUDA and a CUDA device is present."""
    return bool(_C.built_with_cuda()) and _C.cuda_device_count() > 0


def array_module(x, name="x"):
    """numpy or cupy, whichever `x` belongs to; a TypeError naming `name` for anything else."""
    if isinstance(x, np.ndarray):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise TypeError(
        f"{name} must be a NumPy or CuPy array, got {type(x).__module__}.{type(x).__qualname__}"
    )


def param_dtype(dtype):
    """Dtype of parameters and statistics for inputs of `dtype`: float16 inputs run with float32
    parameters (mixed precision); float32 and float64 use their own."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def kernel_input(x, name="x"):
    """`x` itself when the kernels can read its strides, else one contiguous copy of it."""
    xp = array_module(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C, ...), got {x.ndim}D input of shape "
                         f"{tuple(x.shape)}")
    if x.ndim >= 3 and not x.flags.c_contiguous and not _C.ncs_collapsible(x):
        return xp.ascontiguousarray(x)
    return x


def like(x, src):
    """`src` laid out like `x` (same strides) so that both take the same fast path; `src` itself
    when it already is, or when its dtype or shape differ (the core then names the mismatch)."""
    if src.strides == x.strides or src.dtype != x.dtype or src.shape != x.shape:
        return src
    out = array_module(x).empty_like(x)
    out[...] = src
    return out


def parse_device(device):
    """'cpu' or 'cuda' (device ids are accepted and ignored: arrays follow CuPy's current device)."""
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return kind


def to_device(x, device):
    """`x` on `device` ('cpu' -> NumPy, 'cuda' -> CuPy); `x` itself when it is already there."""
    if parse_device(device) == "cpu":
        return x if isinstance(x, np.ndarray) else x.get()
    if not cuda_available():
        raise RuntimeError(
            "normkit: CUDA is not available (normkit was built without CUDA, or no GPU is present)"
        )
    import cupy

    return cupy.asarray(x)
