"""MPICommunicator.split within the timeout; run by tests/test_sync_divergence.py as

    mpiexec -n 2 python check_split.py

First every rank splits alike (one group of both ranks, then one group per rank) and sums over the
sub-communicator; then rank 1 never calls split, and rank 0's split must raise SyncTimeoutError
within NORMKIT_SYNC_TIMEOUT seconds instead of waiting forever. Each rank prints
"rank R: CASE: RESULT (T s)" lines, which the test asserts.
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from normkit.distributed import MPICommunicator

WORLD = MPI.COMM_WORLD
rank, size = WORLD.Get_rank(), WORLD.Get_size()
TIMEOUT = float(os.environ["NORMKIT_SYNC_TIMEOUT"])


def say(line):
    sys.stdout.write(f"rank {rank}: {line}\n")
    sys.stdout.flush()


def new_comm():
    return MPICommunicator(WORLD.Dup(), abort_on_exception=False)


comm = new_comm()
for case, color in (("together", 0), ("apart", rank)):
    sub = comm.split(color, key=size - rank)  # key reverses the order of the ranks
    total = sub.allreduce_sum(np.array([rank + 1.0]))
    say(f"{case}: size {sub.size} rank {sub.rank} sum {total[0]:g}")

comm = new_comm()
start = time.monotonic()
if rank == 0:
    try:
        comm.split(0)
        say("diverge: no error")
    except Exception as e:  # noqa: BLE001 - the test reads the type and message
        say(f"diverge: ERROR {type(e).__name__}: {e} ({time.monotonic() - start:.1f} s)")
else:
    time.sleep(TIMEOUT + 3.0)  # never calls split: rank 0 must not wait for it
    say(f"diverge: skipped split ({time.monotonic() - start:.1f} s)")
WORLD.Barrier()  # on another communicator than the timed-out one; an exit ends both ranks
say("DONE")
# The timed-out all-gather stays posted (MPI cannot cancel a collective): an orderly
# MPI_Finalize could wait on it.
os._exit(0)
