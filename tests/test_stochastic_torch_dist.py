"""normkit.torch's synchronized StochNorm and cross-rank MixStyle across processes:
tests/torch_dist/check_stochastic_torch.py under `torchrun --nproc_per_node=2` (gloo,
process_group=) and under `mpiexec -n 2` (normkit's MPICommunicator), launched as
tests/test_torch_dist.py launches the SyncBatchNorm checks; both layers compiled too."""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from normkit.distributed import _MPI_MISSING

from test_torch_dist import _free_port, _run

SCRIPT = Path(__file__).parent / "torch_dist" / "check_stochastic_torch.py"
CHECKS = ("stochnorm empty p=0.5", "stochnorm uneven p=1.0", "mixstyle empty crossdomain",
          "mixstyle uneven random", "compiled stochnorm track=True",
          "compiled stochnorm track=False", "compiled mixstyle random p=1.0",
          "compiled mixstyle crossdomain p=0.5")


@pytest.mark.timeout(600)
def test_under_torchrun_with_gloo():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), "gloo"],
               timeout=540)
    for check in CHECKS:
        assert f"rank 1: ok {check}" in out and f"rank 0: ok {check}" in out, out[-5000:]


@pytest.mark.timeout(600)
def test_under_mpiexec_with_normkit_communicator():
    exe = shutil.which("mpiexec")
    missing = [what for what, ok in (("mpiexec", exe),
                                     ("mpi4py", importlib.util.find_spec("mpi4py"))) if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not found; {_MPI_MISSING}"
        if os.environ.get("NORMKIT_REQUIRE_MPI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    out = _run([exe, "-n", "2", sys.executable, str(SCRIPT), "mpi"], timeout=540)
    for check in CHECKS:
        assert f"rank 1: ok {check}" in out, out[-5000:]
