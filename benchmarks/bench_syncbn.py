"""SyncBatchNorm under MPI vs local BatchNorm on the same per-rank batch, and vs its all-reduces.

    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/bench_syncbn.py [--shape 16,64,56,56]

Each rank times, on its own batch (float32, NCHW), the training forward+backward of
normkit.nn.SyncBatchNorm (one all-reduce each way) and of normkit.nn.BatchNorm2d (no
communication), plus the two all-reduces alone (2C+5 float64 values each), as the layer issues
them (nonblocking, polled against the timeout) and as blocking MPI_Allreduce calls (timeout=inf),
which shows what the timeout costs. Medians over rounds, all ranks in lockstep (a barrier before
each timed call); rank 0 prints the table.
"""
import argparse
import math
import time

import numpy as np
from mpi4py import MPI

import normkit as nk
from normkit.distributed import MPICommunicator


def timed(fn, comm, repeat):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The slowest rank sets the pace of a synchronized step.
    return comm.allreduce(float(np.median(times)), op=MPI.MAX)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16,64,56,56")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    C = shape[1]
    comm = MPICommunicator()
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    sync = nk.nn.SyncBatchNorm(C, comm=comm)
    local = nk.nn.BatchNorm2d(C)

    def step(layer):
        def run():
            layer(x)
            layer.backward(dy)
            layer.zero_grad()
        return run

    blocking = MPICommunicator(timeout=math.inf)
    fwd_buf, bwd_buf = np.ones(2 * C + 5), np.ones(2 * C + 5)
    rows = []
    for _ in range(args.rounds):  # alternating, against drift
        rows.append([timed(step(local), comm.comm, args.repeat),
                     timed(step(sync), comm.comm, args.repeat),
                     timed(lambda: (comm.allreduce_sum(fwd_buf), comm.allreduce_sum(bwd_buf)),
                           comm.comm, args.repeat),
                     timed(lambda: (blocking.allreduce_sum(fwd_buf),
                                    blocking.allreduce_sum(bwd_buf)), comm.comm, args.repeat)])
    local_t, sync_t, reduce_t, blocking_t = np.median(np.array(rows), axis=0)
    if comm.rank == 0:
        print(f"{comm.size} ranks, per-rank batch {shape} float32, medians in ms")
        print(f"{'local BatchNorm2d fwd+bwd':>34} {local_t * 1e3:8.3f}")
        print(f"{'SyncBatchNorm fwd+bwd':>34} {sync_t * 1e3:8.3f}   "
              f"{sync_t / local_t:.2f}x local")
        print(f"{'its two all-reduces alone':>34} {reduce_t * 1e3:8.3f}   "
              f"({(4 * C + 10) * 8} bytes, polled to the timeout)")
        print(f"{'the same, blocking (timeout=inf)':>34} {blocking_t * 1e3:8.3f}   "
              f"{reduce_t / blocking_t:.2f}x")
        print(f"{'sync - local - all-reduces':>34} {(sync_t - local_t - reduce_t) * 1e3:8.3f}   "
              f"(the split passes' extra memory traffic)")


if __name__ == "__main__":
    main()
