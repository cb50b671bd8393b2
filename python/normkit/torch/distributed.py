"""A normkit communicator over a ``torch.distributed`` process group.

It follows the protocol of ``normkit.distributed`` (``rank``, ``size``, in-place
``allreduce_sum``, ``split``, ``debug``), so it serves ``normkit.torch.SyncBatchNorm`` and the
NumPy layers of ``normkit.nn`` alike: ``allreduce_sum`` takes torch tensors and NumPy arrays.
"""
import datetime
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import (CollectiveError, SyncTimeoutError, abort_from_env, debug_from_env,
                           failure_message, install_abort_hook, sync_timeout, timeout_message)


def _end_job():
    """Ends this process after an uncaught exception: aborts the default process group (its
    pending collectives can no longer block the exit), then exits at once (an orderly interpreter
    exit could wait on them). torchrun sees a failed worker and stops the others."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - the process is going down whatever happens here
        pass
    os._exit(1)


def _host_backend(backend):
    """Whether a backend ("gloo", "nccl", "mpi" or a "cpu:gloo,cuda:nccl" map) reduces CPU
    tensors."""
    return "gloo" in backend or "mpi" in backend


class TorchCommunicator:
    """Sums over the processes of a ``torch.distributed`` group (default: the whole world).

    ``torch.distributed.init_process_group`` must have run. Tensors go to the backend as they are;
    NumPy arrays are reduced in place, through a device copy when the group's backend reduces only
    CUDA tensors (NCCL).
    ``debug`` (default: the environment variable NORMKIT_SYNC_DEBUG) makes the synchronized
    layers (of ``normkit.torch`` and ``normkit.nn``) check that all ranks call the same layer
    alike.

    ``timeout`` (seconds, default ``NORMKIT_SYNC_TIMEOUT`` or 300; ``math.inf``: none): each
    all-reduce is issued asynchronously and its work waited for with that timeout, then a
    ``SyncTimeoutError``. ``abort_on_exception`` (default ``NORMKIT_SYNC_ABORT``, on): an
    uncaught exception aborts the process group and exits this process, so that the launcher
    (torchrun) ends the job.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None
        The group; None: the default (whole world) group.
    debug : bool or None
        The layers' cross-rank consistency check; None: NORMKIT_SYNC_DEBUG.
    timeout : float or None
        Seconds each collective waits; None: NORMKIT_SYNC_TIMEOUT, else 300.
    abort_on_exception : bool or None
        Whether an uncaught exception aborts the group and exits; None: NORMKIT_SYNC_ABORT (on).

    Raises
    ------
    RuntimeError
        torch.distributed is not initialized.
    TypeError, ValueError
        A bad ``timeout`` (see ``normkit.distributed.sync_timeout``).
    """

    def __init__(self, group=None, debug=None, timeout=None, abort_on_exception=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCommunicator needs torch.distributed to be initialized: call "
                               "torch.distributed.init_process_group first (or run under torchrun)")
        self.group = group
        self.debug = debug_from_env() if debug is None else bool(debug)
        self.timeout = sync_timeout(timeout)
        abort = abort_from_env() if abort_on_exception is None else bool(abort_on_exception)
        self.abort_on_exception = abort
        if abort:
            install_abort_hook("torch", _end_job)
        self._broken = None  # the message of a timed-out collective

    @property
    def rank(self):
        return dist.get_rank(self.group)

    @property
    def size(self):
        return dist.get_world_size(self.group)

    def _device(self):
        """Where this group's backend wants tensors: the CPU, or the current CUDA device."""
        if _host_backend(dist.get_backend(self.group)):
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def allreduce_sum(self, array):
        """Sums ``array`` (a contiguous torch tensor or NumPy array) over the group, in place.

        Parameters
        ----------
        array : torch.Tensor or numpy.ndarray
            Contiguous (and writable); every rank passes the same length and dtype.

        Returns
        -------
        array
            The same tensor or array, now holding the sum.

        Raises
        ------
        TypeError, ValueError
            Neither a tensor nor an array; not contiguous (and writable).
        SyncTimeoutError
            Some rank did not join within the timeout (the communicator is unusable after it).
        CollectiveError
            The backend failed the collective, or an earlier one timed out or failed.
        """
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError("TorchCommunicator.allreduce_sum needs a contiguous, writable "
                                 "array")
            host = torch.from_numpy(array)  # shares the array's memory
            device = self._device()
            tensor = host if device.type == "cpu" else host.to(device)
            self._allreduce(tensor)
            if tensor is not host:
                host.copy_(tensor)
            return array
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"TorchCommunicator.allreduce_sum takes torch tensors or NumPy arrays, "
                            f"got {type(array).__name__}")
        if not array.is_contiguous():
            raise ValueError("TorchCommunicator.allreduce_sum needs a contiguous tensor")
        self._allreduce(array)
        return array

    def allgather(self, array):
        """The concatenation along dim 0, in rank order, of every rank's ``array`` (a torch tensor
        or NumPy array; leading sizes may differ, the other dims and the dtype must agree), as the
        same kind of array on its device. Two all-reduces within the timeout (of the leading
        sizes, then of a zero table each rank fills its rows of: adding zeros is exact) of small
        arrays (per-instance statistics).

        Parameters
        ----------
        array : torch.Tensor or numpy.ndarray
            This rank's rows.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            Every rank's rows, rank 0's first.

        Raises
        ------
        TypeError
            Neither a tensor nor an array.
        SyncTimeoutError, CollectiveError
            As ``allreduce_sum``.
        """
        if isinstance(array, torch.Tensor):
            host = array.detach().cpu()
        elif isinstance(array, np.ndarray):
            host = torch.from_numpy(np.ascontiguousarray(array))
        else:
            raise TypeError(f"TorchCommunicator.allgather takes torch tensors or NumPy arrays, "
                            f"got {type(array).__name__}")
        device = self._device()
        sizes = torch.zeros(self.size, dtype=torch.int64, device=device)
        sizes[self.rank] = host.shape[0]
        self._allreduce(sizes)
        sizes = sizes.tolist()
        table = torch.zeros((sum(sizes),) + tuple(host.shape[1:]), dtype=host.dtype,
                            device=device)
        start = sum(sizes[:self.rank])
        table[start:start + host.shape[0]] = host
        self._allreduce(table)
        if isinstance(array, torch.Tensor):
            return table.to(array.device)
        return table.cpu().numpy()

    def _allreduce(self, tensor):
        """The sum, waited for within the timeout (the work handle's wait(timeout) blocks the
        host until the collective is done, also on NCCL)."""
        if self._broken:
            raise CollectiveError(f"{self!r} is unusable after a failed collective "
                                  f"({self._broken})")
        if math.isinf(self.timeout):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return
        start = time.monotonic()
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:  # the backends' errors (DistBackendError and others)
            if time.monotonic() - start < self.timeout:  # a failure, not the timeout
                self._broken = failure_message(self, tensor.numel(), e)
                raise CollectiveError(self._broken) from None
            self._broken = timeout_message(self, tensor.numel(), self.timeout)
            raise SyncTimeoutError(self._broken) from None

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same ``color``, ranked by ``key``
        (default: their rank here). Every rank of this group must call it; each color becomes a new
        torch.distributed group, created by its own members only. The colors are agreed by an
        all-reduce within the timeout first, so a rank that never calls it is a
        ``SyncTimeoutError`` on the others.

        Parameters
        ----------
        color : int
            Ranks passing the same color form one sub-communicator.
        key : int or None
            Orders the ranks in it (ties by rank); None: this rank.

        Returns
        -------
        TorchCommunicator
            Over the ranks of this rank's color, with this one's debug, timeout and abort
            settings.

        Raises
        ------
        SyncTimeoutError, CollectiveError
            As ``allreduce_sum``.
        """
        rank, size = self.rank, self.size
        table = torch.zeros(2, size, dtype=torch.float64, device=self._device())
        table[0, rank] = float(color)
        table[1, rank] = float(rank if key is None else key)
        self.allreduce_sum(table)
        colors, keys = table.cpu().tolist()
        members = sorted((r for r in range(size) if colors[r] == colors[rank]),
                         key=lambda r: (keys[r], r))
        global_ranks = [dist.get_global_rank(self.group, r) if self.group is not None else r
                        for r in members]
        sub = dist.new_group(global_ranks, use_local_synchronization=True, sort_ranks=False)
        return TorchCommunicator(sub, debug=self.debug, timeout=self.timeout,
                                 abort_on_exception=self.abort_on_exception)

    def __repr__(self):
        return (f"TorchCommunicator(rank={self.rank}, size={self.size}, debug={self.debug}, "
                f"timeout={self.timeout:g})")


__all__ = ["TorchCommunicator"]
