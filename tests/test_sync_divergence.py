"""Divergent ranks end with a clear error on every rank within the timeout, never a hang (issue
16): tests/mpi/check_divergence.py under `mpiexec -n 2` and `-n 3` (normkit.nn over MPI) and
`torchrun --nproc_per_node=2` (normkit.torch over gloo). One launch runs every case ("report"),
each "uncaught" launch checks that the aborting excepthook ends the job. Plus the timeout option's
validation in one process. Launchers are skipped (or failed, with NORMKIT_REQUIRE_MPI=1) where
missing, as in test_syncbn_mpi.py."""
import importlib.util
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normkit.distributed import _MPI_MISSING, sync_timeout

SCRIPT = Path(__file__).parent / "mpi" / "check_divergence.py"
TIMEOUTS = {"nn": 2, "torch": 3}  # seconds: short, yet longer than a slow rank's first step
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
           OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
ENV.pop("NORMKIT_SYNC_DEBUG", None)
ENV.pop("NORMKIT_SYNC_ABORT", None)


def _mpiexec():
    exe = shutil.which("mpiexec")
    found = (("mpiexec", exe), ("mpi4py", importlib.util.find_spec("mpi4py")))
    missing = [what for what, ok in found if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not found; {_MPI_MISSING}"
        if os.environ.get("NORMKIT_REQUIRE_MPI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


def _launch(kind, ranks, what, limit, **env):
    """Runs the script (with `env` added to the environment); returns (returncode, output,
    seconds). The job must end within `limit` seconds (the subprocess timeout turns a hang into a
    failure)."""
    if kind == "nn":
        cmd = [_mpiexec(), "-n", str(ranks), "--oversubscribe", sys.executable, str(SCRIPT)]
    else:
        if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
            pytest.skip("this torch build has no torch.distributed gloo backend")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(SCRIPT)]
    env = dict(ENV, NORMKIT_SYNC_TIMEOUT=str(TIMEOUTS[kind]), **env)
    start = time.monotonic()
    proc = subprocess.run(cmd + [kind, what], capture_output=True, text=True, timeout=limit,
                          env=env, errors="replace")
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _outcomes(out, ranks):
    """{(rank, "case/mode"): (message, seconds)} from the report's lines."""
    found = {}
    for m in re.finditer(r"rank (\d+): (\w+/\w+): (.*) \(([\d.]+) s\)$", out, re.M):
        found[int(m[1]), m[2]] = (m[3], float(m[4]))
    found["output"] = out
    return found


def _expect(found, rank, case, *parts, within):
    message, took = found.get((rank, case), (None, None))
    lines = [line for line in found["output"].splitlines() if case in line]
    assert message is not None, f"rank {rank} printed nothing for {case}: {lines}"
    for part in parts:
        assert part in message, f"rank {rank}, {case}: {part!r} not in {message!r}"
    assert took <= within, f"rank {rank}, {case}: took {took} s"


def _check_report(found, kind, ranks):
    T = TIMEOUTS[kind]
    odd, rest = ranks - 1, range(ranks - 1)
    others = ", ".join(map(str, rest))
    rs = "s" if ranks > 2 else ""
    comm = "MPICommunicator(rank=" if kind == "nn" else "TorchCommunicator(rank="
    timed_out = ("SyncTimeoutError", "SyncBatchNorm(3) forward", comm,
                 f"not joined by every rank within {T} s")
    slack = T + 5.0
    # One rank in eval: without debug the training ranks time out (the eval rank has nothing
    # to wait for; an uncaught error then aborts it, see the uncaught tests); with debug all say.
    for r in rest:
        _expect(found, r, "train_eval/plain", *timed_out, within=slack)
    _expect(found, odd, "train_eval/plain", "no error", within=slack)
    for r in range(ranks):
        _expect(found, r, "train_eval/debug",
                f"mode: train on rank{rs} {others}; eval on rank {odd}", within=slack)
    # Backward skipped on one rank, or an extra forward on one rank: its forward's all-reduce
    # meets the others' backward: the agreement header tells every rank; debug says what.
    for case in ("skip_backward", "extra_forward"):
        for r in range(ranks):
            phase = "forward" if r == odd else "backward"
            _expect(found, r, f"{case}/plain", f"SyncBatchNorm(3) {phase}",
                    "made different calls", within=slack)
            _expect(found, r, f"{case}/debug", f"SyncBatchNorm(3) {phase}",
                    f"call: backward on rank{rs} {others}; forward on rank {odd}", within=slack)
    # One rank raising before the collective (its channel check): it raises, the others time
    # out; with debug the check comes first and every rank names the channels.
    _expect(found, odd, "raise_before/plain", "ValueError", "input has 4 channels", within=slack)
    for r in rest:
        _expect(found, r, "raise_before/plain", *timed_out, within=slack)
    for r in range(ranks):
        _expect(found, r, "raise_before/debug",
                f"input channels: 3 on rank{rs} {others}; 4 on rank {odd}", within=slack)
    # Layers of different channel counts: with debug every rank names them.
    for r in range(ranks):
        _expect(found, r, "channels/debug",
                f"num_features: 3 on rank{rs} {others}; 4 on rank {odd}", within=slack)
    # float32 on one rank, float64 on the others (same buffer length): the agreement header tells
    # every rank; debug names the dtypes.
    for r in range(ranks):
        _expect(found, r, "dtype/plain", "SyncBatchNorm(3) forward", "made different calls",
                within=slack)
        _expect(found, r, "dtype/debug",
                f"dtype: float64 on rank{rs} {others}; float32 on rank {odd}", within=slack)
    # Every rank does the forward, the odd rank never calls backward: the others time out in
    # backward (in debug, in its check), the odd rank has nothing to wait for.
    for mode, who in (("plain", "backward: "), ("debug", "backward (debug check): ")):
        for r in rest:
            _expect(found, r, f"backward_timeout/{mode}", "SyncTimeoutError",
                    f"SyncBatchNorm(3) {who}{comm}", f"not joined by every rank within {T} s",
                    within=slack)
            assert found[r, f"backward_timeout/{mode}"][1] >= T - 0.5, found[r, "output"]
        _expect(found, odd, f"backward_timeout/{mode}", "no error", within=slack)
    # Two alike layers called in another order on the odd rank (after one step in the same
    # order): only debug's layer identity (order of first call) sees it, on every rank.
    pattern = (rf"layer \(order of first call\): (\d+) on rank{rs} {others}; (\d+) on rank "
               rf"{odd} \(")
    for r in range(ranks):
        _expect(found, r, "layer_order/debug", "SyncBatchNorm(3) forward", within=slack)
        m = re.search(pattern, found[r, "layer_order/debug"][0])
        assert m and int(m[2]) == int(m[1]) + 1, found[r, "layer_order/debug"]
    # One more layer constructed on one rank is no divergence (the old construction counter
    # raised here): no error, and the values equal one process's (checked in the script).
    for r in range(ranks):
        for mode in ("plain", "debug"):
            _expect(found, r, f"extra_layer/{mode}", "no error", within=slack)


@pytest.mark.parametrize("ranks", [2, 3])
def test_divergence_report_mpi(ranks):
    _, out, _ = _launch("nn", ranks, "report", limit=120)
    # The ranks leave with os._exit, not MPI_Finalize (requests that timed out stay posted), so
    # the launcher's status is not the verdict: every rank's last line is.
    for r in range(ranks):
        assert f"rank {r}: REPORT DONE" in out, out[-5000:]
    found = _outcomes(out, ranks)
    _check_report(found, "nn", ranks)
    # Different channel counts without debug: all-reduces of different lengths, which MPI does
    # not define; Open MPI fails the collective on a rank whose buffer is shorter, which names
    # the layer, and the other ranks wait out their timeout: an error on every rank.
    for r in range(ranks):
        message, took = found[r, "channels/plain"]
        assert message.startswith("ERROR"), (r, message)
        assert "SyncBatchNorm(" in message and "MPICommunicator(rank=" in message, message
        assert took <= TIMEOUTS["nn"] + 5.0
    assert any("CollectiveError" in found[r, "channels/plain"][0] for r in range(ranks)), out


def test_divergence_report_torch():
    rc, out, _ = _launch("torch", 2, "report", limit=240)
    found = _outcomes(out, 2)
    _check_report(found, "torch", 2)
    # Different channel counts without debug, the last case: gloo aborts the process receiving
    # the longer message (std::terminate, not an exception) and torchrun ends the job.
    assert rc != 0, out[-5000:]
    assert "Received data size doesn't match expected size" in out, out[-5000:]


@pytest.mark.parametrize("kind", ["nn", "torch"])
def test_uncaught_error_before_collective_ends_the_job(kind):
    """The odd rank's channel check raises, uncaught; the others wait in the collective with a
    120 s timeout, so only the abort of the excepthook ends the job this early."""
    rc, out, took = _launch(kind, 2, "uncaught-raise", limit=100)
    assert rc != 0, out[-5000:]
    assert "ValueError: SyncBatchNorm(3): input has 4 channels" in out, out[-5000:]
    if kind == "nn":
        assert "MPI_ABORT was invoked on rank 1" in out, out[-5000:]
    assert took < 100


def test_uncaught_timeout_ends_the_job_mpi():
    """Train against eval without debug: the training ranks' timeout, uncaught, aborts the job,
    also the eval rank that had nothing to wait for (it sleeps 60 s unless killed)."""
    rc, out, took = _launch("nn", 3, "uncaught-timeout", limit=55)
    assert rc != 0, out[-5000:]
    # Either training rank may time out first; its abort can end the other before it prints.
    assert "SyncTimeoutError: SyncBatchNorm(3) forward: MPICommunicator(rank=" in out, out[-5000:]
    assert "MPI_ABORT was invoked" in out, out[-5000:]


@pytest.mark.parametrize("how", ["env", "option"])
def test_uncaught_error_without_abort_leaves_the_others_to_time_out_mpi(how):
    """The abort opted out of (NORMKIT_SYNC_ABORT=0, or abort_on_exception=False): the odd rank's
    uncaught channel error does not end the job; the other rank goes on to its collective and
    ends by SyncTimeoutError after its timeout."""
    T = TIMEOUTS["nn"]
    extra = {"NORMKIT_SYNC_ABORT": "0"} if how == "env" else {}
    rc, out, _ = _launch("nn", 2, f"uncaught-noabort-{how}", limit=60, **extra)
    assert rc != 0, out[-5000:]
    assert "ValueError: SyncBatchNorm(3): input has 4 channels" in out, out[-5000:]
    assert "MPI_ABORT was invoked" not in out, out[-5000:]
    m = re.search(r"rank 0: noabort: ERROR (\w+): (.*) \(([\d.]+) s\)$", out, re.M)
    assert m, out[-5000:]
    assert m[1] == "SyncTimeoutError", m[0]
    assert "SyncBatchNorm(3) forward: MPICommunicator(rank=0" in m[2], m[0]
    assert f"not joined by every rank within {T} s" in m[2], m[0]
    assert T - 0.5 <= float(m[3]) <= T + 5.0, m[0]


def test_sync_timeout_option(monkeypatch):
    monkeypatch.delenv("NORMKIT_SYNC_TIMEOUT", raising=False)
    assert sync_timeout() == 300.0
    assert sync_timeout(2.5) == 2.5 and sync_timeout(math.inf) == math.inf
    monkeypatch.setenv("NORMKIT_SYNC_TIMEOUT", "7")
    assert sync_timeout() == 7.0 and sync_timeout(1) == 1.0
    monkeypatch.setenv("NORMKIT_SYNC_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NORMKIT_SYNC_TIMEOUT must be a number"):
        sync_timeout()
    monkeypatch.setenv("NORMKIT_SYNC_TIMEOUT", "0")
    with pytest.raises(ValueError, match="NORMKIT_SYNC_TIMEOUT must be a positive"):
        sync_timeout()
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="timeout must be a positive"):
            sync_timeout(bad)
    with pytest.raises(TypeError, match="timeout must be a number"):
        sync_timeout("5")


def test_split_times_out_when_a_rank_never_calls_it():
    """MPICommunicator.split (a blocking MPI_Comm_split underneath) agrees first, within the
    timeout: alike on every rank it splits as MPI does; with one rank never calling it, the other
    raises SyncTimeoutError naming the communicator within the timeout
    (tests/mpi/check_split.py)."""
    T = TIMEOUTS["nn"]
    cmd = [_mpiexec(), "-n", "2", "--oversubscribe", sys.executable,
           str(Path(__file__).parent / "mpi" / "check_split.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, errors="replace",
                          env=dict(ENV, NORMKIT_SYNC_TIMEOUT=str(T)))
    out = proc.stdout + proc.stderr
    for r in range(2):
        assert f"rank {r}: DONE" in out, out[-5000:]
        # key = size - rank reverses the order: rank 0 is the sub-communicator's rank 1.
        assert f"rank {r}: together: size 2 rank {1 - r} sum 3" in out, out[-5000:]
        assert f"rank {r}: apart: size 1 rank 0 sum {r + 1}" in out, out[-5000:]
    m = re.search(r"rank 0: diverge: ERROR (\w+): (.*) \(([\d.]+) s\)$", out, re.M)
    assert m, out[-5000:]
    assert m[1] == "SyncTimeoutError", m[0]
    assert "MPICommunicator(rank=0, size=2" in m[2] and "split()" in m[2], m[0]
    assert f"not joined by every rank within {T} s" in m[2], m[0]
    assert T - 0.5 <= float(m[3]) <= T + 3.0, m[0]
