"""SyncBatchNorm on CuPy arrays across processes, run by tests/test_syncbn_gpu_mpi.py under
`mpiexec -n 2`. Rank r uses GPU r % (number of GPUs).

For each communicator that can run here (MPICommunicator through pinned host memory; through a
CUDA-aware MPI when the library is one; NCCLCommunicator when NCCL loads and every rank has its own
GPU), the synchronized layer on each rank's slice of a global batch must equal normkit's CPU
BatchNorm on the whole batch in float64. Prints "rank R: ok NAME" per check, "rank R: skip NAME
(reason)" for a communicator that cannot run, and "rank R: ALL OK" at the end.
"""
import os
import sys

import cupy as cp
import numpy as np

import normkit as nk
from normkit.distributed import MPICommunicator, NCCLCommunicator, mpi_cuda_aware

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_helpers import to_gpu  # noqa: E402

world = MPICommunicator()
rank, size = world.rank, world.size
gpus = cp.cuda.runtime.getDeviceCount()
cp.cuda.Device(rank % gpus).use()


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"rank {rank}: {name} failed {detail}")


def close(name, a, b, tol=1e-11):
    a = a.get() if isinstance(a, cp.ndarray) else np.asarray(a)
    b = np.asarray(b)
    check(name, a.shape == b.shape, f"shapes {a.shape} vs {b.shape}")
    err = float(np.max(np.abs(a - b) / (1 + np.abs(b)))) if a.size else 0.0
    check(name, err <= tol, f"max rel err {err:.3g}")


def channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


class Counting:
    def __init__(self, inner):
        self.inner, self.calls, self.debug = inner, 0, inner.debug

    rank = property(lambda self: self.inner.rank)
    size = property(lambda self: self.inner.size)

    def allreduce_sum(self, a):
        self.calls += 1
        check("device buffer", isinstance(a, cp.ndarray), type(a).__name__)
        return self.inner.allreduce_sum(a)


def equivalence(comm, tail, seed, cl=False, affine=True):
    """Uneven slices (rank 1 of 2 gets more), two training steps then eval."""
    sizes = [2 + 3 * r for r in range(size)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    C = tail[0]
    counting = Counting(comm)
    sync = nk.nn.SyncBatchNorm(C, affine=affine, comm=counting, dtype=np.float64, device="cuda",
                               sync_param_grads=True)
    layer = {1: nk.nn.BatchNorm1d, 2: nk.nn.BatchNorm1d, 3: nk.nn.BatchNorm2d}[len(tail)]
    ref = layer(C, affine=affine, dtype=np.float64)  # one process, the whole batch, on the CPU
    if affine:
        w = np.random.default_rng(seed).uniform(0.5, 1.5, C)
        ref.weight.data[...] = w
        sync.weight.data[...] = cp.asarray(w)
    rng = np.random.default_rng(seed + 1)
    for step in range(2):
        x = rng.standard_normal((sum(sizes),) + tail) * 1.7 + 0.3 * step
        dy = rng.standard_normal(x.shape)
        if cl:
            x, dy = channels_last(x), channels_last(dy)
        y_ref, dx_ref = ref(x), ref.backward(dy)
        y = sync(to_gpu(x[lo:hi]))  # channels-last slices stay channels-last
        dx = sync.backward(to_gpu(dy[lo:hi]))
        close("y", y, y_ref[lo:hi])
        close("dx", dx, dx_ref[lo:hi])
        close("running_var", sync.running_var, ref.running_var)
    check("one collective per pass", counting.calls == 4, counting.calls)
    if affine:
        close("weight.grad", sync.weight.grad, ref.weight.grad)
    sync.eval()
    ref.eval()
    x = rng.standard_normal((sum(sizes),) + tail)
    close("eval y", sync(cp.asarray(x[lo:hi])), ref(x)[lo:hi])
    check("no collective in eval", counting.calls == 4, counting.calls)


def allreduce(comm):
    for dt in (np.float32, np.float64):
        a = cp.arange(7, dtype=dt) * (rank + 1)
        comm.allreduce_sum(a)
        close(f"allreduce {np.dtype(dt).name}", a, np.arange(7) * size * (size + 1) / 2, 1e-6)
    h = np.full(3, float(rank + 1))
    comm.allreduce_sum(h)  # host arrays too (the layers' debug checks use them)
    close("allreduce numpy", h, np.full(3, size * (size + 1) / 2))


communicators = [("MPI via pinned host memory", lambda: MPICommunicator(cuda_aware=False), None)]
if mpi_cuda_aware():
    communicators.append(("CUDA-aware MPI", lambda: MPICommunicator(cuda_aware=True), None))
else:
    communicators.append(("CUDA-aware MPI", None, "the MPI library is not CUDA-aware"))
if gpus < size:
    communicators.append(("NCCL", None, f"{gpus} GPU(s) for {size} ranks; NCCL takes one each"))
else:
    communicators.append(("NCCL", NCCLCommunicator, None))

for name, make, reason in communicators:
    if make is None:
        print(f"rank {rank}: skip {name} ({reason})", flush=True)
        continue
    try:
        comm = make()
    except ImportError as e:  # NCCL not installed: say so, do not fail
        print(f"rank {rank}: skip {name} ({e})", flush=True)
        continue
    allreduce(comm)
    equivalence(comm, (5,), seed=1)
    equivalence(comm, (4, 3, 5), seed=2)
    equivalence(comm, (3, 4, 2), seed=3, cl=True)
    equivalence(comm, (4, 6), seed=4, affine=False)
    print(f"rank {rank}: ok {name}", flush=True)

print(f"rank {rank}: ALL OK", flush=True)
sys.exit(0)
