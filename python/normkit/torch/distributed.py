"""A normkit communicator over a ``torch.distributed`` process group.

It follows the protocol of ``normkit.distributed`` (``rank``, ``size``, in-place
``allreduce_sum``, ``split``, ``debug``), so it serves ``normkit.torch.SyncBatchNorm`` and the
NumPy layers of ``normkit.nn`` alike: ``allreduce_sum`` takes torch tensors and NumPy arrays.
"""
import numpy as np
import torch
import torch.distributed as dist

from ..distributed import debug_from_env


def _host_backend(backend):
    """Whether a backend ("gloo", "nccl", "mpi" or a "cpu:gloo,cuda:nccl" map) reduces CPU
    tensors."""
    return "gloo" in backend or "mpi" in backend


class TorchCommunicator:
    """Sums over the processes of a ``torch.distributed`` group (default: the whole world).

    ``torch.distributed.init_process_group`` must have run. Tensors go to the backend as they are;
    NumPy arrays are reduced in place, through a device copy when the group's backend reduces only
    CUDA tensors (NCCL).
    ``debug`` (default: the environment variable NORMKIT_SYNC_DEBUG) is read by the layers of
    ``normkit.nn``, which then check that all ranks call the same layer alike.
    """

    def __init__(self, group=None, debug=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCommunicator needs torch.distributed to be initialized: call "
                               "torch.distributed.init_process_group first (or run under torchrun)")
        self.group = group
        self.debug = debug_from_env() if debug is None else bool(debug)

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
        """Sums ``array`` (a contiguous torch tensor or NumPy array) over the group, in place."""
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise ValueError("TorchCommunicator.allreduce_sum needs a contiguous, writable "
                                 "array")
            host = torch.from_numpy(array)  # shares the array's memory
            device = self._device()
            tensor = host if device.type == "cpu" else host.to(device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            if tensor is not host:
                host.copy_(tensor)
            return array
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"TorchCommunicator.allreduce_sum takes torch tensors or NumPy arrays, "
                            f"got {type(array).__name__}")
        if not array.is_contiguous():
            raise ValueError("TorchCommunicator.allreduce_sum needs a contiguous tensor")
        dist.all_reduce(array, op=dist.ReduceOp.SUM, group=self.group)
        return array

    def allgather(self, array):
        """The concatenation along dim 0, in rank order, of every rank's ``array`` (a torch tensor
        or NumPy array; leading sizes may differ), as the same kind of array on its device. One
        ``all_gather_object`` of small host arrays (per-instance statistics)."""
        if isinstance(array, torch.Tensor):
            host = array.detach().cpu().numpy()
        elif isinstance(array, np.ndarray):
            host = array
        else:
            raise TypeError(f"TorchCommunicator.allgather takes torch tensors or NumPy arrays, "
                            f"got {type(array).__name__}")
        parts = [None] * self.size
        dist.all_gather_object(parts, host, group=self.group)
        out = np.concatenate(parts, axis=0)
        return torch.from_numpy(out).to(array.device) if isinstance(array, torch.Tensor) else out

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same ``color``, ranked by ``key``
        (default: their rank here). Every rank of this group must call it; each color becomes a new
        torch.distributed group, created by its own members only."""
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
        return TorchCommunicator(sub, debug=self.debug)

    def __repr__(self):
        return f"TorchCommunicator(rank={self.rank}, size={self.size}, debug={self.debug})"


__all__ = ["TorchCommunicator"]
