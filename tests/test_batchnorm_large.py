"""Shapes large enough for the multithreaded paths: many channels (a thread owns whole channels),
fewer channels than threads (threads split a channel's rows and their partial sums are merged),
BatchNorm1d with a long batch or a wide channel dim. Against torch and float64 NumPy, in both
layouts. One test reruns the checks in a subprocess with more OpenMP threads than this machine
has cores, so that C=1 and C=3 are below the thread count whatever the machine."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import normkit.functional as F
import normkit.nn as nn
from helpers import (
    assert_close,
    assert_close_dtype,
    axes,
    bc,
    make_layout,
    other_layout,
    params,
    randn,
    ref_backward_train,
    ref_forward_eval,
    ref_forward_train,
    running,
    torch_batch_norm,
)

# (3, 83, 17, 19): channels-last reduces 83 = 64 + 16 + 3 channels as a group, a block and a tail,
# over chunks of rows that do not divide the rows of either thread.
SHAPES = [(8, 16, 33, 35), (3, 83, 17, 19), (64, 1, 50, 50), (64, 3, 50, 50), (4, 3, 9, 17, 19), (5, 7, 3001),
          (20001, 3), (7, 2049)]


def _layouts(ndim):
    return ["contiguous", "fortran", "strided"] if ndim == 2 else \
        ["contiguous", "channels_last", "strided"]


CASES = [(s, lay) for s in SHAPES for lay in _layouts(len(s))]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]
EPS = 1e-5


def _sum_scale(dy, x, mean, invstd):
    """sum |dy * xhat| per channel: the natural error scale of dweight (a sum that cancels)."""
    nd = x.ndim
    xhat = (x.astype(np.float64) - bc(mean, nd)) * bc(invstd, nd)
    return (np.abs(dy.astype(np.float64)) * np.abs(xhat)).sum(axis=axes(x))


@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_large_training_forward_backward(shape, layout, dtype):
    C = shape[1]
    x0 = randn(shape, 701, dtype, offset=0.6, scale=1.4)
    dy0 = randn(shape, 702, dtype, offset=-0.2)
    x, dy = make_layout(x0, layout), make_layout(dy0, other_layout(layout, len(shape)))
    w, b = params(C, 703, dtype)
    rm0, rv0 = running(C, 704, dtype)
    rm, rv = rm0.copy(), rv0.copy()

    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.2, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)

    ty, tdx, tdw, tdb, trm, trv = torch_batch_norm(x0, w, b, rm0, rv0, True, 0.2, EPS, dy=dy0)
    ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, EPS)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    for name, got, t, r in [("y", y, ty, ry), ("dx", dx, tdx, rdx), ("db", db, tdb, rdb),
                            ("running_mean", rm, trm, None), ("running_var", rv, trv, None)]:
        assert_close_dtype(got, t, dtype, f"{name} vs torch")
        if r is not None:
            assert_close_dtype(got, r, dtype, f"{name} vs numpy")
    assert_close_dtype(mean, rmean, dtype)
    assert_close_dtype(invstd, rinvstd, dtype)
    scale = _sum_scale(dy0, x0, rmean, rinvstd)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.all(np.abs(dw - rdw) <= rtol * scale), "dweight vs numpy"
    assert np.all(np.abs(dw - tdw) <= 2 * rtol * scale), "dweight vs torch"


@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_large_eval_forward_backward(shape, layout, dtype):
    C = shape[1]
    x0 = randn(shape, 711, dtype, offset=-0.3, scale=0.8)
    dy0 = randn(shape, 712, dtype, offset=0.4)
    x, dy = make_layout(x0, layout), make_layout(dy0, other_layout(layout, len(shape)))
    w, b = params(C, 713, dtype)
    rm, rv = running(C, 714, dtype)
    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=False, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=False)
    ty, tdx, tdw, tdb, _, _ = torch_batch_norm(x0, w, b, rm, rv, False, 0.1, EPS, dy=dy0)
    assert_close_dtype(y, ty, dtype)
    assert_close_dtype(y, ref_forward_eval(x0, w, b, rm, rv, EPS), dtype)
    assert_close_dtype(dx, tdx, dtype)
    assert_close_dtype(db, tdb, dtype)
    scale = _sum_scale(dy0, x0, rm, 1 / np.sqrt(rv.astype(np.float64) + EPS))
    assert np.all(np.abs(dw - tdw) <= (2e-5 if dtype == np.float32 else 1e-12) * scale)


@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_large_float16(shape, layout):
    C = shape[1]
    x0 = randn(shape, 721, np.float16, offset=0.6, scale=1.4)
    dy0 = randn(shape, 722, np.float16, offset=-0.2)
    x, dy = make_layout(x0, layout), make_layout(dy0, other_layout(layout, len(shape)))
    w, b = params(C, 723, np.float32)
    y, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    ry, rmean, _, rinvstd = ref_forward_train(x0, w, b, EPS)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert y.dtype == np.float16 and dx.dtype == np.float16
    assert_close_dtype(y, ry, np.float16)
    assert_close_dtype(dx, rdx, np.float16)
    assert_close(mean, rmean, 1e-5, 1e-5)
    assert_close(invstd, rinvstd, 1e-5, 1e-5)
    assert_close(db, rdb, 1e-5, 1e-5)
    assert np.all(np.abs(dw - rdw) <= 1e-5 * _sum_scale(dy0, x0, rmean, rinvstd))


@pytest.mark.parametrize("shape,layout", [((20001, 3), "contiguous"), ((20001, 3), "fortran"),
                                          ((7, 2049), "contiguous"),
                                          ((64, 1, 50, 50), "channels_last"),
                                          ((64, 3, 50, 50), "contiguous")],
                         ids=["20001x3", "20001x3-fortran", "7x2049", "64x1x50x50-cl",
                              "64x3x50x50"])
def test_large_layers_match_torch(shape, layout):
    C = shape[1]
    cls, tcls = ((nn.BatchNorm1d, torch.nn.BatchNorm1d) if len(shape) == 2
                 else (nn.BatchNorm2d, torch.nn.BatchNorm2d))
    layer, ref = cls(C), tcls(C)
    w, b = params(C, 731, np.float32)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    for step in range(2):
        x0 = randn(shape, 732 + step, np.float32, offset=step - 0.5, scale=1 + step)
        dy0 = randn(shape, 742 + step, np.float32)
        tx = torch.from_numpy(x0.copy()).requires_grad_(True)
        y = layer(make_layout(x0, layout))
        ty = ref(tx)
        dx = layer.backward(make_layout(dy0, other_layout(layout, len(shape))))
        ty.backward(torch.from_numpy(dy0))
        assert_close_dtype(y, ty.detach().numpy(), np.float32)
        assert_close_dtype(dx, tx.grad.numpy(), np.float32)
        assert_close_dtype(layer.bias.grad, ref.bias.grad.numpy(), np.float32)
        assert_close_dtype(layer.running_mean, ref.running_mean.numpy(), np.float32)
        assert_close_dtype(layer.running_var, ref.running_var.numpy(), np.float32)
    layer.eval()
    ref.eval()
    x0 = randn(shape, 750, np.float32, offset=0.3)
    assert_close_dtype(layer(make_layout(x0, layout)), ref(torch.from_numpy(x0)).detach().numpy(),
                       np.float32)


_THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import normkit.functional as F
    from helpers import (make_layout, other_layout, params, randn, ref_backward_train,
                         ref_forward_train)
    import os
    tasks = "/proc/self/task"
    most_threads = -1
    checked = 0
    for shape in [(64, 1, 50, 50), (64, 3, 50, 50), (8, 16, 33, 35), (20001, 3), (7, 2049),
                  (3, 5, 9, 17, 19), (5, 7, 3001)]:
        layouts = (["contiguous", "fortran", "strided"] if len(shape) == 2
                   else ["contiguous", "channels_last", "strided"])
        for layout in layouts:
            for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-10)):
                C = shape[1]
                x0 = randn(shape, 801, dt, offset=0.6, scale=1.4)
                dy0 = randn(shape, 802, dt, offset=-0.2)
                x = make_layout(x0, layout)
                dy = make_layout(dy0, other_layout(layout, len(shape)))
                w, b = params(C, 803, dt)
                mean, var = F.batch_norm_stats(x)
                y, m, invstd = F.batch_norm_forward(x, w, b, training=True, eps=1e-5)
                dx, dw, db = F.batch_norm_backward(dy, x, m, invstd, w)
                s1, s2 = F.batch_norm_backward_reduce(dy, x, m)
                ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, 1e-5)
                rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-5)
                for name, got, want in [("mean", mean, rmean), ("var", var, rvar), ("y", y, ry),
                                        ("invstd", invstd, rinvstd), ("dx", dx, rdx),
                                        ("db", db, rdb), ("sum_dy", s1, rdb)]:
                    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
                    assert err < tol, (shape, layout, dt, name, err)
                checked += 1
                if os.path.isdir(tasks):
                    most_threads = max(most_threads, len(os.listdir(tasks)))
    print("checked", checked)
    print("threads", most_threads)
""")


def test_more_threads_than_channels_in_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="7", OMP_DYNAMIC="false")
    script = _THREADS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked 42" in proc.stdout
    # the OpenMP team really reached 7 threads (Linux: one /proc task per thread)
    threads = int(proc.stdout.split("threads")[-1])
    assert threads == -1 or threads >= 7, proc.stdout


_STREAM_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import normkit.functional as F
    from helpers import make_layout, params, randn, ref_backward_train, ref_forward_train
    checked = 0
    # Long planar rows (fused per channel), short planar rows (memory-order passes), channels-last
    # (flat runs); odd sizes, so rows start off 16-byte boundaries and end in scalar tails; planes
    # shorter than two vectors (5x5, 3x3), which once streamed from misaligned addresses (a crash).
    for shape in [(3, 5, 37, 41), (4, 6, 7, 9), (2, 35, 13, 11), (5, 6, 5, 5), (7, 3, 3, 3)]:
        for layout in ["contiguous", "channels_last"]:
            for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-10)):
                C = shape[1]
                x0 = randn(shape, 901, dt, offset=0.6, scale=1.4)
                dy0 = randn(shape, 902, dt, offset=-0.2)
                x, dy = make_layout(x0, layout), make_layout(dy0, layout)
                w, b = params(C, 903, dt)
                y, m, invstd = F.batch_norm_forward(x, w, b, training=True, eps=1e-5)
                dx, dw, db = F.batch_norm_backward(dy, x, m, invstd, w)
                s1, s2 = F.batch_norm_backward_reduce(dy, x, m)
                count = x.size // C
                dx_split = F.batch_norm_backward_elemt(dy, x, m, invstd, w, s1, s2, count)
                y_eval = F.batch_norm_normalize(x, m, invstd, w, b)
                ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, 1e-5)
                rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-5)
                for name, got, want in [("y", y, ry), ("dx", dx, rdx), ("dx split", dx_split, rdx),
                                        ("y normalize", y_eval, ry), ("db", db, rdb)]:
                    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
                    assert err < tol, (shape, layout, dt, name, err)
                checked += 1
    print("checked", checked)
""")


def test_streaming_stores_in_subprocess():
    """Outputs far larger than the last-level cache are written with streaming stores. A low
    threshold (NORMKIT_STREAM_MIN_BYTES, read once per process) puts small tensors on that path."""
    env = dict(os.environ, NORMKIT_STREAM_MIN_BYTES="4096")
    script = _STREAM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked 20" in proc.stdout
