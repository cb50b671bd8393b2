"""Synchronized StochNorm and cross-rank MixStyle of normkit.nn across processes: runs
tests/mpi/check_stochastic.py under mpiexec with 2 and 3 ranks (uneven batches, an empty rank).
Skipped with a reason where mpiexec or mpi4py is missing, unless NORMKIT_REQUIRE_MPI=1 (CI)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_syncbn_mpi import mpiexec

SCRIPT = Path(__file__).parent / "mpi" / "check_stochastic.py"


@pytest.mark.parametrize("ranks", [2, 3])
def test_stochastic_layers_match_one_process(ranks):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec(), "-n", str(ranks), "--oversubscribe", sys.executable,
                           str(SCRIPT)], capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(ranks):
        for check in ("stochnorm empty p=0.5 cl=True", "mixstyle uneven crossdomain",
                      "wrong comm"):
            assert f"rank {r}: ok {check}" in out, out[-4000:]
        assert f"rank {r}: ALL OK" in out, out[-4000:]
