"""SyncBatchNorm checks, run by tests/test_syncbn_mpi.py under `mpiexec -n P` (P = 2 or 3).

Every check compares the synchronized layer on each rank's slice of a global batch with normkit's
single-process BatchNorm (itself tested against torch) on the whole batch, in float64. Each rank
prints "rank R: ok NAME" per check and "rank R: ALL OK" at the end; any failure raises.
"""
import sys

import numpy as np

import normkit as nk
from normkit.distributed import MPICommunicator

world = MPICommunicator()
rank, size = world.rank, world.size


class CountingComm:
    """Wraps a communicator and counts its collectives."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.debug = inner.debug

    rank = property(lambda self: self.inner.rank)
    size = property(lambda self: self.inner.size)

    def allreduce_sum(self, a):
        self.calls += 1
        return self.inner.allreduce_sum(a)

    def split(self, color, key=None):
        return CountingComm(self.inner.split(color, key))


def channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def batch(sizes, shape_tail, seed, cl=False):
    """The global batch (same on every rank) and this communicator's slices of it."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sum(sizes),) + shape_tail) * 1.7 + 0.3
    dy = rng.standard_normal(x.shape)
    if cl:
        x, dy = channels_last(x), channels_last(dy)
    return x, dy


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"rank {rank}: {name} failed {detail}")


def close(name, a, b, tol=1e-11):
    a, b = np.asarray(a), np.asarray(b)
    check(name, a.shape == b.shape, f"shapes {a.shape} vs {b.shape}")
    err = float(np.max(np.abs(a - b) / (1 + np.abs(b)))) if a.size else 0.0
    check(name, err <= tol, f"max rel err {err:.3g}")


def run_equivalence(comm, sizes, tail, seed, cl=False, momentum=0.1, affine=True,
                    sync_grads=True, steps=2):
    """Sync layer on slices == local layer on the whole batch: y, dx, running stats, grads."""
    C = tail[0]
    me = comm.rank
    lo, hi = sum(sizes[:me]), sum(sizes[:me + 1])
    sync = nk.nn.SyncBatchNorm(C, momentum=momentum, affine=affine, comm=comm,
                               sync_param_grads=sync_grads, dtype=np.float64)
    ref = nk.nn.BatchNorm1d(C, momentum=momentum, affine=affine, dtype=np.float64) \
        if len(tail) <= 2 else {3: nk.nn.BatchNorm2d, 4: nk.nn.BatchNorm3d}[len(tail)](
            C, momentum=momentum, affine=affine, dtype=np.float64)
    if affine:
        w = np.random.default_rng(seed + 100).uniform(0.5, 1.5, C)
        sync.weight.data[...] = ref.weight.data[...] = w
        sync.bias.data[...] = ref.bias.data[...] = np.linspace(-1, 1, C)
    for step in range(steps):
        x, dy = batch(sizes, tail, seed + step, cl)
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        y = sync(x[lo:hi])
        dx = sync.backward(dy[lo:hi])
        close("y", y, y_ref[lo:hi])
        close("dx", dx, dx_ref[lo:hi])
        close("running_mean", sync.running_mean, ref.running_mean)
        close("running_var", sync.running_var, ref.running_var)
        check("num_batches_tracked", int(sync.num_batches_tracked) == int(ref.num_batches_tracked))
    if affine:
        grads = [sync.weight.grad, sync.bias.grad]
        if not sync_grads:  # local contributions: they sum to the whole batch's gradient
            grads = [comm.allreduce_sum(np.ascontiguousarray(g).copy()) for g in grads]
        close("weight.grad", grads[0], ref.weight.grad)
        close("bias.grad", grads[1], ref.bias.grad)
    sync.eval()
    ref.eval()
    x, _ = batch(sizes, tail, seed + 50, cl)
    close("eval y", sync(x[lo:hi]), ref(x)[lo:hi])


def uneven(n):
    """Uneven per-rank batch sizes with an empty rank when there are 3 or more ranks."""
    return [3 + 2 * r if r != n - 1 or n < 3 else 0 for r in range(n)]


cases = [("2D (N,C)", (5,), False), ("3D", (4, 7), False), ("4D", (3, 5, 4), False),
         ("5D", (2, 3, 4, 3), False), ("4D channels-last", (3, 5, 4), True),
         ("5D channels-last", (2, 3, 4, 3), True)]
for i, (name, tail, cl) in enumerate(cases):
    run_equivalence(world, uneven(size), tail, seed=10 * i, cl=cl)
    print(f"rank {rank}: ok equivalence {name}", flush=True)

sizes = [4] + [0] * (size - 1)  # every rank but one empty
run_equivalence(world, sizes, (3, 5), seed=7)
print(f"rank {rank}: ok empty ranks", flush=True)

run_equivalence(world, uneven(size), (4, 6), seed=3, momentum=None, sync_grads=False)
print(f"rank {rank}: ok momentum=None, local weight/bias grads", flush=True)
run_equivalence(world, uneven(size), (4, 6), seed=4, affine=False)
print(f"rank {rank}: ok affine=False", flush=True)

# Sub-groups synchronize independently: even ranks with each other, odd ranks with each other.
group = world.split(rank % 2)
run_equivalence(group, [2 + r + rank % 2 for r in range(group.size)], (3, 5), seed=20 + rank % 2)
print(f"rank {rank}: ok sub-group of {group.size}", flush=True)

# Exactly one collective per training pass, none in eval.
counting = CountingComm(world)
layer = nk.nn.SyncBatchNorm(3, comm=counting, dtype=np.float64)
x, dy = batch(uneven(size), (3, 4), seed=5)
lo, hi = sum(uneven(size)[:rank]), sum(uneven(size)[:rank + 1])
layer(x[lo:hi])
check("one all-reduce in forward", counting.calls == 1, counting.calls)
layer.backward(dy[lo:hi])
check("one all-reduce in backward", counting.calls == 2, counting.calls)
layer.eval()
layer(x[lo:hi])
layer.backward(dy[lo:hi])
check("no collective in eval", counting.calls == 2, counting.calls)
print(f"rank {rank}: ok collective counts", flush=True)

# The global-count error is raised on every rank (one value per channel over all ranks).
layer = nk.nn.SyncBatchNorm(3, comm=world, dtype=np.float64)
x = np.random.default_rng(9).standard_normal((1 if rank == 0 else 0, 3))
try:
    layer(x)
    check("global count error", False, "no error raised")
except ValueError as e:
    check("global count message", "more than 1 value per channel" in str(e), str(e))
print(f"rank {rank}: ok global count error", flush=True)

# Debug mode: a channel mismatch raises a clear error on every rank instead of hanging.
debug = MPICommunicator(debug=True)
C = 4 if rank == 0 else 5
layer = nk.nn.SyncBatchNorm(C, comm=debug, dtype=np.float64)
try:
    layer(np.random.default_rng(rank).standard_normal((3, C, 2)))
    check("debug channel mismatch", False, "no error raised")
except RuntimeError as e:
    check("debug message", "input channels: 4 on rank 0; 5 on rank" in str(e), str(e))
print(f"rank {rank}: ok debug mode caught a channel mismatch", flush=True)

# Debug mode passes when the ranks agree, and convert_sync_batchnorm keeps parameters and buffers.
net = nk.nn.Sequential(nk.nn.BatchNorm2d(3, dtype=np.float64), nk.nn.BatchNorm2d(3, dtype=np.float64))
net[0].weight.data[...] = [0.5, 1.0, 2.0]
net[1].running_mean[...] = [0.1, 0.2, 0.3]
net = nk.nn.convert_sync_batchnorm(net, debug)
check("converted", all(isinstance(m, nk.nn.SyncBatchNorm) for m in net))
close("kept weight", net[0].weight.data, [0.5, 1.0, 2.0])
close("kept running_mean", net[1].running_mean, [0.1, 0.2, 0.3])
ref = nk.nn.Sequential(nk.nn.BatchNorm2d(3, dtype=np.float64), nk.nn.BatchNorm2d(3, dtype=np.float64))
ref[0].weight.data[...] = [0.5, 1.0, 2.0]
ref[1].running_mean[...] = [0.1, 0.2, 0.3]
x, dy = batch(uneven(size), (3, 2, 3), seed=11)
lo, hi = sum(uneven(size)[:rank]), sum(uneven(size)[:rank + 1])
close("converted y", net(x[lo:hi]), ref(x)[lo:hi])
close("converted dx", net.backward(dy[lo:hi]), ref.backward(dy)[lo:hi])
close("converted running_mean", net[1].running_mean, ref[1].running_mean)
print(f"rank {rank}: ok convert_sync_batchnorm and debug mode on agreeing ranks", flush=True)

# |mean| >> std in float64: the cross-rank sums are taken about a common shift, so the global
# variance stays within float64's rounding of the per-rank means (ulp(mean) * |mean_r - mean| /
# var) of one process's batch norm: 1e-7 and 2e-3 relative before, ~1e-13 and ~4e-12 after.
for mean, tol in ((1e5, 2e-12), (1e7, 1e-10)):
    sizes = uneven(size)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    rng = np.random.default_rng(21)
    x = rng.standard_normal((sum(sizes), 3, 40)) * 3.0 + mean
    dy = rng.standard_normal(x.shape)
    counting = CountingComm(world)
    sync = nk.nn.SyncBatchNorm(3, comm=counting, momentum=1.0, dtype=np.float64)
    for step in range(2):  # the first forward sums twice (its shift, zero, is far off), then once
        ref = nk.nn.BatchNorm1d(3, momentum=1.0, dtype=np.float64)
        calls = counting.calls
        y = sync(x[lo:hi])
        check(f"mean {mean:g} collectives", counting.calls - calls == (2 if step == 0 else 1),
              f"{counting.calls - calls}")
        y_ref = ref(x)
        err = float(np.max(np.abs(sync.running_var - ref.running_var) / ref.running_var))
        check(f"mean {mean:g} var step {step}", err <= tol, f"relative error {err:.3g}")
        close(f"mean {mean:g} running_mean", sync.running_mean, ref.running_mean, 1e-15)
        close(f"mean {mean:g} y", y, y_ref[lo:hi], 1e-8)
        close(f"mean {mean:g} dx", sync.backward(dy[lo:hi]), ref.backward(dy)[lo:hi], 1e-8)
    print(f"rank {rank}: ok exact combine with mean {mean:g}, std 3", flush=True)

print(f"rank {rank}: ALL OK", flush=True)
sys.exit(0)
