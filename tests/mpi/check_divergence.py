"""Ranks that diverge around a SyncBatchNorm end with a clear error, never a hang; run by
tests/test_sync_divergence.py as

    mpiexec -n P python check_divergence.py nn SCENARIOS      (normkit.nn over MPICommunicator)
    torchrun --nproc_per_node=2 check_divergence.py torch SCENARIOS   (normkit.torch over gloo)

SCENARIOS is "report" or one "uncaught-*" case. "report" runs every divergence of issue 16, each
without and with the debug check, on a fresh communicator (a timed-out collective leaves its
communicator unusable) with NORMKIT_SYNC_TIMEOUT's short timeout and no abort, catches each
rank's error and prints "rank R: CASE/MODE: ERROR Type: message (T s)" or "rank R: CASE/MODE:
no error (T s)"; the test asserts each rank's line. The odd rank is the last one. The
"uncaught-*" cases let the error propagate, so that the aborting excepthook must end the job;
"uncaught-noabort-*" opt out of that abort, so that the other ranks must end by their timeout.
"""
import os
import sys
import time

import numpy as np

KIND, WHAT = sys.argv[1], sys.argv[2]
C = 3

if KIND == "nn":
    from mpi4py import MPI

    import normkit as nk
    from normkit.distributed import MPICommunicator

    WORLD = MPI.COMM_WORLD
    rank, size = WORLD.Get_rank(), WORLD.Get_size()

    def new_comm(debug, timeout=None, abort=False):
        return MPICommunicator(WORLD.Dup(), debug=debug, timeout=timeout,
                               abort_on_exception=abort)

    def new_layer(channels, comm, dtype=np.float64):
        return nk.nn.SyncBatchNorm(channels, comm=comm, dtype=dtype)

    def forward(layer, x):
        return layer(x.astype(layer.weight.data.dtype, copy=False))

    def backward(layer, y, dy):
        return layer.backward(dy)

    def reference(x, dy):
        """Single-process batch norm on the whole batch: y and dx."""
        bn = nk.nn.BatchNorm1d(C, dtype=np.float64)
        return bn(x), bn.backward(dy)
else:
    import datetime

    import torch
    import torch.distributed as dist

    import normkit.torch as nkt

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, size = dist.get_rank(), dist.get_world_size()

    def new_comm(debug, timeout=None, abort=False):
        group = dist.new_group(list(range(size)))
        return nkt.TorchCommunicator(group, debug=debug, timeout=timeout,
                                     abort_on_exception=abort)

    def new_layer(channels, comm, dtype=np.float64):
        return nkt.SyncBatchNorm(channels, comm=comm, dtype=getattr(torch, np.dtype(dtype).name))

    def forward(layer, x):
        return layer(torch.from_numpy(x).to(layer.weight.dtype).requires_grad_())

    def backward(layer, y, dy):
        y.backward(torch.from_numpy(dy).to(y.dtype))

    def reference(x, dy):
        bn = torch.nn.BatchNorm1d(C, dtype=torch.float64)
        xt = torch.from_numpy(x).requires_grad_()
        y = bn(xt)
        y.backward(torch.from_numpy(dy))
        return y.detach().numpy(), xt.grad.numpy()

ODD = size - 1
rng = np.random.default_rng(5)
X = rng.standard_normal((4 * size, C + 1)) * 1.3 + 0.4  # rank r's rows: 4r .. 4r + 3
DY = rng.standard_normal(X.shape)


def mine(a, channels=C):
    return np.ascontiguousarray(a[4 * rank:4 * rank + 4, :channels])


def step(layer, channels=C, do_backward=True, extra_forward=False):
    y = forward(layer, mine(X, channels))
    if extra_forward:
        y = forward(layer, mine(X, channels))
    if do_backward:
        backward(layer, y, mine(DY, channels))
    return y


# Each case: (debug) -> runs on this rank; the odd rank diverges in iteration 0 of two.
def train_eval(comm):
    layer = new_layer(C, comm)
    layer.train(rank != ODD)
    for _ in range(2):
        step(layer)


def skip_backward(comm):
    layer = new_layer(C, comm)
    for it in range(2):
        step(layer, do_backward=not (rank == ODD and it == 0))


def extra_forward(comm):
    layer = new_layer(C, comm)
    for it in range(2):
        step(layer, extra_forward=rank == ODD and it == 0)


def raise_before(comm):
    layer = new_layer(C, comm)
    for _ in range(2):
        step(layer, channels=C + 1 if rank == ODD else C)  # fails the odd rank's channel check


def channels(comm):
    n = C + 1 if rank == ODD else C
    layer = new_layer(n, comm)
    for _ in range(2):
        step(layer, channels=n)


def dtype(comm):
    """float32 on the odd rank, float64 on the others: same channels, same buffer length."""
    layer = new_layer(C, comm, np.float32 if rank == ODD else np.float64)
    for _ in range(2):
        step(layer)


def backward_timeout(comm):
    """Every rank does the forward; the odd rank never calls backward (nor anything after)."""
    layer = new_layer(C, comm)
    step(layer, do_backward=rank != ODD)


def layer_order(comm):
    """Two layers alike in channels, dtype and mode: every rank calls A then B once; then the odd
    rank calls B then A. Only the debug check's layer identity (the order of first calls) tells
    them apart. (Swapped from the very first call they are indistinguishable by design.)"""
    a, b = new_layer(C, comm), new_layer(C, comm)
    for it in range(2):
        for layer in ((b, a) if rank == ODD and it == 1 else (a, b)):
            step(layer)


def extra_layer(comm):
    """Not a divergence: the odd rank constructs one more layer than the others, never called;
    the results must equal one process's batch norm of the whole batch."""
    if rank == ODD:
        new_layer(C, comm)
    layer = new_layer(C, comm)
    y = forward(layer, mine(X))
    dx = backward(layer, y, mine(DY))
    x, dy = np.ascontiguousarray(X[:, :C]), np.ascontiguousarray(DY[:, :C])
    ref_y, ref_dx = reference(x, dy)
    got_y = y.detach().numpy() if KIND == "torch" else y
    if KIND == "torch":
        dx = None  # torch leaves dx in the input's .grad; y is compared
    err = np.abs(got_y - ref_y[4 * rank:4 * rank + 4]).max()
    if dx is not None:
        err = max(err, np.abs(dx - ref_dx[4 * rank:4 * rank + 4]).max())
    if not err < 1e-12:
        raise AssertionError(f"extra_layer: results differ from one process's by {err:.3g}")


CASES = [train_eval, skip_backward, extra_forward, raise_before, channels, extra_layer, dtype,
         backward_timeout, layer_order]
DEBUG_ONLY = {layer_order}  # without the debug check nothing identifies a layer across ranks


def say(line):
    """One write per line: print() writes the newline apart, which unbuffered output (torchrun)
    lets the other ranks' lines split."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report():
    control = new_comm(False, timeout=120)
    extra_layer(new_comm(False))  # a warm-up: no rank's first call (imports) may take a timeout
    runs = [(case, debug) for case in CASES for debug in (False, True)
            if debug or case not in DEBUG_ONLY]
    # Last: all-reduces of different lengths, on which gloo terminates a process (see the test).
    runs.remove((channels, False))
    runs.append((channels, False))
    for case, debug in runs:
        start = time.monotonic()
        try:
            case(new_comm(debug))
            outcome = "no error"
        except Exception as e:  # noqa: BLE001 - each rank reports what it got
            outcome = f"ERROR {type(e).__name__}: {e}"
        took = time.monotonic() - start
        mode = "debug" if debug else "plain"
        say(f"rank {rank}: {case.__name__}/{mode}: {outcome} ({took:.1f} s)")
        control.allreduce_sum(np.zeros(1))  # the next case starts on every rank together
    say(f"rank {rank}: REPORT DONE")
    os._exit(0)  # timed-out requests stay posted: an orderly shutdown could wait on them (mpiexec
    # calls this exit abnormal, without MPI_Finalize: the test reads "REPORT DONE" instead)


if WHAT == "report":
    report()
elif WHAT == "uncaught-raise":
    # The odd rank's channel check raises before the collective, uncaught; the others wait with
    # a long timeout: only the abort on the uncaught exception ends the job early.
    raise_before(new_comm(False, timeout=120, abort=True))
elif WHAT == "uncaught-timeout":
    # Without debug the training ranks time out (uncaught) while the eval rank finishes: their
    # abort ends the job.
    train_eval(new_comm(False, abort=True))
    time.sleep(60)  # a rank that would otherwise exit cleanly waits here for the abort
elif WHAT in ("uncaught-noabort-env", "uncaught-noabort-option"):
    # The abort opted out of, by NORMKIT_SYNC_ABORT=0 (abort_on_exception=None reads it) or by
    # abort_on_exception=False: the odd rank's uncaught error must not end the job; the others
    # go on and end by their timeout.
    start = time.monotonic()
    try:
        raise_before(new_comm(False, abort=None if WHAT.endswith("env") else False))
    except Exception as e:
        if rank == ODD:
            raise
        say(f"rank {rank}: noabort: ERROR {type(e).__name__}: {e} "
            f"({time.monotonic() - start:.1f} s)")
        os._exit(1)  # the timed-out request stays posted: MPI_Finalize could wait on it
else:
    raise SystemExit(f"unknown {WHAT!r}")
