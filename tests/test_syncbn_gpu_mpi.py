"""SyncBatchNorm on CuPy arrays across two processes: runs tests/mpi/check_syncbn_gpu.py under
mpiexec. Marked `gpu`; skipped with a reason where CuPy, a GPU, mpiexec or mpi4py is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_helpers import gpu_skip_reason
from test_syncbn_mpi import mpiexec

SCRIPT = Path(__file__).parent / "mpi" / "check_syncbn_gpu.py"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None,
                                                  reason=str(gpu_skip_reason()))]


def test_syncbn_on_gpu_matches_single_process_batchnorm():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec(), "-n", "2", "--oversubscribe", sys.executable, str(SCRIPT)],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(2):
        assert f"rank {r}: ok MPI via pinned host memory" in out, out[-4000:]
        assert f"rank {r}: ALL OK" in out, out[-4000:]
