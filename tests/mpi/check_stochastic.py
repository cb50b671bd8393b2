"""Synchronized StochNorm and cross-rank MixStyle of normkit.nn, run by tests/test_stochastic_mpi.py
under `mpiexec -n P` (P = 2 or 3), with uneven batches and an empty rank.

Each check runs the layer on each rank's slice of a global batch with a generator seeded alike on
every rank, and compares with the same layer in one process on the whole batch with the same
generator state, in float64. Each rank prints "rank R: ok NAME" per check and "rank R: ALL OK" at
the end; any failure raises.
"""
import numpy as np

import normkit.nn as nkn
from normkit.distributed import MPICommunicator

world = MPICommunicator()
rank, size = world.rank, world.size


class Counting:
    """A communicator that counts its collectives."""

    def __init__(self, inner):
        self.inner, self.debug, self.calls = inner, inner.debug, 0

    rank = property(lambda self: self.inner.rank)
    size = property(lambda self: self.inner.size)

    def allreduce_sum(self, a):
        self.calls += 1
        return self.inner.allreduce_sum(a)

    def allgather(self, a):
        self.calls += 1
        return self.inner.allgather(a)


def close(name, a, b, tol=1e-11):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float((np.abs(a - b) / (1 + np.abs(b))).max()) if b.size else 0.0
    if a.shape != b.shape or not err <= tol:
        raise AssertionError(f"rank {rank}: {name}: shapes {a.shape} {b.shape}, error {err}")


def split(sizes, a):
    start = sum(sizes[:rank])
    return np.ascontiguousarray(a[start:start + sizes[rank]])


def sizes_for(kind):
    if kind == "uneven":
        return [3 + 2 * r for r in range(size)]
    return [0] + [4] * (size - 1)  # rank 0 empty


def check_stochnorm(kind, p, cl):
    sizes = sizes_for(kind)
    B, C = sum(sizes), 5
    g = np.random.default_rng(100)
    xs = [g.standard_normal((B, C, 4, 3)) * 2 + 1 for _ in range(3)]
    dys = [g.standard_normal((B, C, 4, 3)) for _ in range(3)]
    ref = nkn.StochNorm2d(C, p=p, dtype=np.float64, generator=np.random.default_rng(7))
    comm = Counting(world)
    sync = nkn.StochNorm2d(C, p=p, dtype=np.float64, generator=np.random.default_rng(7), comm=comm)
    for step in range(3):
        x, dy = xs[step], dys[step]
        if cl:
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        want_y, want_dx = ref(x), ref.backward(dy)
        before = comm.calls
        y = sync(split(sizes, x))
        dx = sync.backward(split(sizes, dy))
        assert comm.calls - before == 2, comm.calls - before  # one all-reduce each way
        name = f"stochnorm {kind} p={p} cl={cl} step {step}"
        close(name + " y", y, split(sizes, want_y))
        close(name + " dx", dx, split(sizes, want_dx))
        close(name + " running_var", sync.running_var, ref.running_var)
        close(name + " running_mean", sync.running_mean, ref.running_mean)
    # weight/bias grads are each rank's share: their sum over ranks is the one-process grad
    total = np.concatenate([sync.weight.grad, sync.bias.grad])
    world.allreduce_sum(total)
    close(f"stochnorm {kind} p={p} summed grads", total,
          np.concatenate([ref.weight.grad, ref.bias.grad]))
    print(f"rank {rank}: ok stochnorm {kind} p={p} cl={cl}", flush=True)


def check_mixstyle(kind, mix):
    sizes = sizes_for(kind)
    B, C = sum(sizes), 3
    g = np.random.default_rng(200)
    x = g.standard_normal((B, C, 5, 2)) * 3 + 2
    dy = g.standard_normal(x.shape)
    ref = nkn.MixStyle(p=1.0, mix=mix, generator=np.random.default_rng(9))
    comm = Counting(world)
    layer = nkn.MixStyle(p=1.0, mix=mix, generator=np.random.default_rng(9), comm=comm)
    want_y, want_dx = ref(x), ref.backward(dy)
    y = layer(split(sizes, x))
    dx = layer.backward(split(sizes, dy))
    assert comm.calls == 1, comm.calls  # one all-gather forward, none backward
    close(f"mixstyle {kind} {mix} y", y, split(sizes, want_y))
    close(f"mixstyle {kind} {mix} dx", dx, split(sizes, want_dx))
    np.testing.assert_array_equal(layer.last_draw[0], ref.last_draw[0])
    print(f"rank {rank}: ok mixstyle {kind} {mix}", flush=True)


def check_untracked(kind):
    """track_running_stats=False: synchronized plain batch norm (no draw, no buffers)."""
    sizes = sizes_for(kind)
    g = np.random.default_rng(300)
    x = g.standard_normal((sum(sizes), 3, 5)) * 2 - 1
    dy = g.standard_normal(x.shape)
    ref = nkn.BatchNorm1d(3, track_running_stats=False, dtype=np.float64)
    layer = nkn.StochNorm1d(3, track_running_stats=False, dtype=np.float64, comm=world,
                            generator=np.random.default_rng(0))
    layer.load_state_dict(ref.state_dict())
    close(f"untracked {kind} y", layer(split(sizes, x)), split(sizes, ref(x)))
    close(f"untracked {kind} dx", layer.backward(split(sizes, dy)), split(sizes, ref.backward(dy)))
    print(f"rank {rank}: ok stochnorm untracked {kind}", flush=True)


for kind in ("uneven", "empty"):
    for p in (0.0, 0.5, 1.0):
        check_stochnorm(kind, p, cl=(p == 0.5))
    check_untracked(kind)
    for mix in ("random", "crossdomain"):
        check_mixstyle(kind, mix)

# a communicator of the wrong kind is a clear error, not a hang
for make in (lambda: nkn.StochNorm1d(3, comm=world.comm), lambda: nkn.MixStyle(comm=object())):
    try:
        make()
        raise AssertionError("a comm of the wrong kind was accepted")
    except TypeError as e:
        assert "comm must be a normkit communicator" in str(e), e
print(f"rank {rank}: ok wrong comm", flush=True)
print(f"rank {rank}: ALL OK", flush=True)
