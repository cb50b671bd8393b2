"""normkit.functional's per-sample statistics ops (group norm, instance norm) against a float64
NumPy reference and torch's F.group_norm / F.instance_norm: every layout, dtype and odd shape,
finite differences in float64, exactness at |mean| >> std, bfloat16 through DLPack, and the
errors of bad input. The `dev` parameter runs each test on NumPy and (marked `gpu`) on CuPy."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normkit
import normkit.functional as F
from gpu_helpers import gpu_skip_reason, to_gpu, to_host
from helpers import assert_close, assert_close_dtype, fd_grad, make_layout, randn, rng

DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))])]

# (shape, groups): C not a multiple of 16, N*G = 1, a spatial size of 2, (N, C) input (S = 1);
# C = 83 and 144 with S > 128 reach every part of the channels-last reduction (runs of 64 and of 16
# channels, a scalar tail, prefetches for rows longer than 64 channels, several row chunks)
CASES = [
    ((4, 6, 5, 7), 3),
    ((3, 10, 7), 5),
    ((2, 6, 2), 6),
    ((1, 4, 2), 1),
    ((2, 3, 4, 5, 3), 3),
    ((5, 12), 4),
    ((2, 20, 9, 11), 20),
    ((2, 83, 9, 15), 83),
    ((2, 144, 9, 15), 48),
]
IDS = [f"{'x'.join(map(str, s))}-G{g}" for s, g in CASES]
TOL16 = 4.0  # float16 results are rounded to float16 twice (input and output)


def layouts(ndim):
    if ndim == 2:
        return ["contiguous", "fortran", "strided"]
    out = ["contiguous", "channels_last", "strided", "channel_slice"]
    return out + (["non_collapsible"] if ndim >= 4 else [])


def dev_array(a, dev):
    return to_gpu(a) if dev == "gpu" else a


def same_layout(a, b):
    """Same strides wherever they matter (dims of size > 1)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides) if n > 1)


def pdtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# --- float64 references ---------------------------------------------------------------------------

def ref_forward(x, G, w, b, eps):
    x = np.asarray(x, np.float64)
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mean = xg.mean(axis=2)
    var = ((xg - mean[..., None]) ** 2).mean(axis=2)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    y = xhat * (1.0 if w is None else np.asarray(w, np.float64).reshape(bshape))
    y = y + (0.0 if b is None else np.asarray(b, np.float64).reshape(bshape))
    return y, mean, var, rstd


def ref_backward(dy, x, G, w, eps):
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    N, C = x.shape[:2]
    _, mean, _, rstd = ref_forward(x, G, None, None, eps)
    xhat = ((x.reshape(N, G, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    g = dy * (1.0 if w is None else np.asarray(w, np.float64).reshape(bshape))
    gg, xh = g.reshape(N, G, -1), xhat.reshape(N, G, -1)
    dx = rstd[..., None] * (gg - gg.mean(axis=2, keepdims=True)
                            - xh * (gg * xh).mean(axis=2, keepdims=True))
    red = (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat).sum(axis=red), dy.sum(axis=red)


def test_reference_matches_torch():
    x, dy = randn((3, 6, 5, 4), 1), randn((3, 6, 5, 4), 2)
    w, b = rng(3).standard_normal(6), rng(4).standard_normal(6)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = TF.group_norm(tx, 2, tw, tb, 1e-5)
    ty.backward(torch.tensor(dy))
    y = ref_forward(x, 2, w, b, 1e-5)[0]
    dx, dw, db = ref_backward(dy, x, 2, w, 1e-5)
    for got, want in ((y, ty), (dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
        assert_close(got, want.detach().numpy(), 1e-12, 1e-12)


def _conditioning(x, dy, G, w, dx_ref):
    """How much worse than the usual tolerance torch's own float32 dx is on this input (at least
    1): groups of two values make dx a difference of nearly equal terms, in any implementation."""
    if x.dtype == np.float64:
        return 1.0
    tx = torch.tensor(x.astype(np.float32), requires_grad=True)
    tw = None if w is None else torch.tensor(w.astype(np.float32))
    TF.group_norm(tx, G, tw).backward(torch.tensor(dy.astype(np.float32)))
    err = np.abs(tx.grad.numpy() - dx_ref).max() / max(np.abs(dx_ref).max(), 1e-30)
    return max(1.0, 2 * err / 1e-5)


# --- the fused ops -----------------------------------------------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("shape,G", CASES, ids=IDS)
def test_forward_backward(shape, G, dtype, affine, dev):
    C = shape[1]
    x0 = randn(shape, 10, dtype, offset=0.5)
    dy0 = randn(shape, 11, dtype)
    w = (rng(12).uniform(0.5, 1.5, C) * rng(13).choice([-1, 1], C)).astype(pdtype(dtype))
    b = rng(14).uniform(-1, 1, C).astype(pdtype(dtype))
    w = None if affine == "none" else w
    b = b if affine == "wb" else None
    factor = TOL16 if dtype == np.float16 else 1.0
    y_ref, m_ref, _, r_ref = ref_forward(x0, G, w, b, 1e-5)
    dx_ref, dw_ref, db_ref = ref_backward(dy0, x0, G, w, 1e-5)
    dx_factor = 4 * factor * _conditioning(x0, dy0, G, w, dx_ref)
    for layout in layouts(len(shape)):
        x = dev_array(make_layout(x0, layout), dev)
        dy = dev_array(make_layout(dy0, "contiguous" if layout != "contiguous" else
                                   layouts(len(shape))[1]), dev)
        wd, bd = dev_array(w, dev), dev_array(b, dev)
        y, mean, rstd = F.group_norm_forward(x, G, wd, bd, eps=1e-5)
        assert y.dtype == dtype and mean.dtype == pdtype(dtype) and mean.shape == (shape[0], G)
        assert_close_dtype(to_host(y), y_ref, dtype, f"{layout}: y", factor)
        assert_close_dtype(to_host(mean), m_ref, dtype, f"{layout}: mean", factor)
        assert_close_dtype(to_host(rstd), r_ref, dtype, f"{layout}: rstd", factor)
        dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, wd, bd)
        assert dx.dtype == dtype
        assert_close_dtype(to_host(dx), dx_ref, dtype, f"{layout}: dx", dx_factor)
        if w is None:
            assert dw is None
        else:
            assert_close_dtype(to_host(dw), dw_ref, dtype, f"{layout}: dweight", 4 * factor)
        if b is None:
            assert db is None
        else:
            assert_close_dtype(to_host(db), db_ref, dtype, f"{layout}: dbias", 4 * factor)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,G", CASES, ids=IDS)
def test_split_ops(shape, G, dtype, dev):
    """stats -> affine and backward_reduce -> backward_elemt compose into the fused ops."""
    C, N = shape[1], shape[0]
    x0, dy0 = randn(shape, 20, dtype), randn(shape, 21, dtype)
    x = dev_array(make_layout(x0, "channels_last" if len(shape) > 2 else "fortran"), dev)
    dy = dev_array(dy0, dev)
    _, m_ref, v_ref, r_ref = ref_forward(x0, G, None, None, 1e-5)
    mean, var = F.group_norm_stats(x, G)
    assert_close_dtype(to_host(mean), m_ref, dtype, "mean")
    assert_close_dtype(to_host(var), v_ref, dtype, "var")
    scale0 = rng(22).standard_normal((N, C)).astype(dtype)
    shift0 = rng(23).standard_normal((N, C)).astype(dtype)
    y = F.group_norm_affine(x, mean, dev_array(scale0, dev), dev_array(shift0, dev))
    mc = np.repeat(m_ref, C // G, axis=1).reshape((N, C) + (1,) * (len(shape) - 2))
    bs = (N, C) + (1,) * (len(shape) - 2)
    want = (x0.astype(np.float64) - mc) * scale0.reshape(bs) + shift0.reshape(bs)
    assert_close_dtype(to_host(y), want, dtype, "affine")
    assert same_layout(to_host(y), to_host(x))
    sum_dy, sum_dy_xmu = F.group_norm_backward_reduce(dy, x, mean)
    red = tuple(range(2, len(shape)))
    assert_close_dtype(to_host(sum_dy), dy0.astype(np.float64).sum(axis=red), dtype, "sum_dy")
    assert_close_dtype(to_host(sum_dy_xmu),
                       (dy0.astype(np.float64) * (x0 - mc)).sum(axis=red), dtype, "sum_dy_xmu")
    a0 = rng(24).standard_normal((N, C)).astype(dtype)
    b0 = rng(25).standard_normal((N, G)).astype(dtype)
    c0 = rng(26).standard_normal((N, G)).astype(dtype)
    dx = F.group_norm_backward_elemt(dy, x, mean, *(dev_array(v, dev) for v in (a0, b0, c0)))
    sp = lambda v: np.repeat(v, C // G, axis=1).reshape(bs)  # noqa: E731
    want = a0.reshape(bs) * dy0 + sp(b0) * (x0 - mc) + sp(c0)
    assert_close_dtype(to_host(dx), want, dtype, "backward_elemt")
    dx = F.group_norm_backward_elemt(dy, x, mean, dev_array(a0, dev))
    assert_close_dtype(to_host(dx), a0.reshape(bs) * dy0, dtype, "backward_elemt without b, c")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape,layout", [((1, 2, 300007), "contiguous"),
                                          ((1, 3, 401, 257), "channels_last")])
def test_split_reduction_one_huge_block(shape, layout, dev):
    """N*G = 1 with a large spatial extent: the reduction of one block is split among threads."""
    x0 = randn(shape, 30, np.float32, offset=3.0)
    dy0 = randn(shape, 31, np.float32)
    x, dy = dev_array(make_layout(x0, layout), dev), dev_array(make_layout(dy0, layout), dev)
    y, mean, rstd = F.group_norm_forward(x, 1)
    y_ref, m_ref, _, r_ref = ref_forward(x0, 1, None, None, 1e-5)
    assert_close_dtype(to_host(y), y_ref, np.float32)
    assert_close_dtype(to_host(mean), m_ref, np.float32)
    dx, _, _ = F.group_norm_backward(dy, x, mean, rstd)
    assert_close_dtype(to_host(dx), ref_backward(dy0, x0, 1, None, 1e-5)[0], np.float32,
                       factor=4)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", [((3, 8, 17, 19), 4), ((2, 80, 9, 11), 80)])
def test_exact_when_mean_dominates(shape, G, layout, dev):
    """|mean| = 1e4 with std 1 in float32: shifted sums keep the variance exact (group norm, and
    instance norm with rows longer than 64 channels)."""
    x0 = (rng(40).standard_normal(shape) + 1e4).astype(np.float32)
    x = dev_array(make_layout(x0, layout), dev)
    mean, var = F.group_norm_stats(x, G)
    _, m_ref, v_ref, _ = ref_forward(x0, G, None, None, 0)
    np.testing.assert_allclose(to_host(mean), m_ref, rtol=1e-7)
    np.testing.assert_allclose(to_host(var), v_ref, rtol=1e-5)
    y, _, _ = F.group_norm_forward(x, G)
    assert_close(to_host(y), ref_forward(x0, G, None, None, 1e-5)[0], 1e-4, 1e-4)


# --- channels-last rows of whole vectors -------------------------------------------------------
# Channels-last samples whose rows are 1-4 vectors of 16 channels keep the affine map's
# coefficients in registers (rows_affine_regs); other widths (80: five vectors, 24: a partial one)
# reload them per row. N = 1 runs the unfused passes, N = 3 the fused ones.
CL_ROWS = [((3, 16, 5, 7), 16), ((1, 32, 3, 9), 8), ((3, 48, 4, 5), 48), ((3, 64, 9, 11), 16),
           ((1, 64, 2, 3), 64), ((3, 80, 3, 5), 80), ((3, 24, 7, 3), 6)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("shape,G", CL_ROWS,
                         ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in CL_ROWS])
def test_channels_last_rows_against_reference(shape, G, dtype):
    N, C = shape[:2]
    x0 = randn(shape, 50, dtype, offset=0.5)
    dy0 = randn(shape, 51, dtype)
    w = rng(52).uniform(0.5, 1.5, C).astype(pdtype(dtype))
    b = rng(53).uniform(-1, 1, C).astype(pdtype(dtype))
    x, dy = make_layout(x0, "channels_last"), make_layout(dy0, "channels_last")
    factor = TOL16 if dtype == np.float16 else 1.0
    y_ref, m_ref, _, r_ref = ref_forward(x0, G, w, b, 1e-5)
    dx_ref, dw_ref, db_ref = ref_backward(dy0, x0, G, w, 1e-5)
    y, mean, rstd = F.group_norm_forward(x, G, w, b, eps=1e-5)
    assert same_layout(y, x)
    assert_close_dtype(y, y_ref, dtype, "y", factor)
    assert_close_dtype(rstd, r_ref, dtype, "rstd", factor)
    dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, w, b)
    assert same_layout(dx, x)
    assert_close_dtype(dx, dx_ref, dtype, "dx", 4 * factor * _conditioning(x0, dy0, G, w, dx_ref))
    assert_close_dtype(dw, dw_ref, dtype, "dweight", 4 * factor)
    assert_close_dtype(db, db_ref, dtype, "dbias", 4 * factor)
    # the split elementwise backward, with every coefficient random
    a0 = rng(54).standard_normal((N, C)).astype(pdtype(dtype))
    b0 = rng(55).standard_normal((N, G)).astype(pdtype(dtype))
    c0 = rng(56).standard_normal((N, G)).astype(pdtype(dtype))
    bs = (N, C) + (1,) * (len(shape) - 2)
    sp = lambda v: np.repeat(v, C // G, axis=1).reshape(bs)  # noqa: E731
    got = F.group_norm_backward_elemt(dy, x, mean, a0, b0, c0)
    mc = sp(np.asarray(mean, np.float64))
    want = a0.reshape(bs) * dy0.astype(np.float64) + sp(b0) * (x0.astype(np.float64) - mc) + sp(c0)
    assert_close_dtype(got, want, dtype, "backward_elemt", factor)


# --- small blocks of the fused planar path --------------------------------------------------------
# Blocks of at most 1024 values go through the fused forward and backward four at a time, the last
# blocks of a thread's range (fewer than four) one at a time.

# (shape, G): N*G = 5 (a batch, then one block alone), 9 blocks of S = 9 < 16 (no full vector),
# S = 2, groups of 3 channels, S = 1024 (the largest batched block) and 1025 (not batched), groups
# of two planes of S = 15
SMALL_BLOCKS = [((1, 5, 7, 7), 5), ((3, 3, 3, 3), 3), ((2, 7, 2), 7), ((2, 12, 3, 5), 4),
                ((1, 6, 32, 32), 6), ((1, 6, 1025), 6), ((3, 4, 15), 2)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("shape,G", SMALL_BLOCKS,
                         ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in SMALL_BLOCKS])
def test_small_blocks_against_reference(shape, G, dtype):
    C = shape[1]
    x0, dy0 = randn(shape, 90, dtype, offset=0.5), randn(shape, 91, dtype)
    w = (rng(92).uniform(0.5, 1.5, C) * rng(93).choice([-1, 1], C)).astype(pdtype(dtype))
    b = rng(94).uniform(-1, 1, C).astype(pdtype(dtype))
    factor = TOL16 if dtype == np.float16 else 1.0
    y_ref, m_ref, _, r_ref = ref_forward(x0, G, w, b, 1e-5)
    dx_ref, dw_ref, db_ref = ref_backward(dy0, x0, G, w, 1e-5)
    y, mean, rstd = F.group_norm_forward(x0, G, w, b)
    assert_close_dtype(y, y_ref, dtype, "y", factor)
    assert_close_dtype(mean, m_ref, dtype, "mean", factor)
    assert_close_dtype(rstd, r_ref, dtype, "rstd", factor)
    dx, dw, db = F.group_norm_backward(dy0, x0, mean, rstd, w, b)
    assert_close_dtype(dx, dx_ref, dtype, "dx", 4 * factor * _conditioning(x0, dy0, G, w, dx_ref))
    assert_close_dtype(dw, dw_ref, dtype, "dweight", 4 * factor)
    assert_close_dtype(db, db_ref, dtype, "dbias", 4 * factor)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("S,Cg", [(2, 1), (9, 1), (49, 1), (17, 3)])
def test_small_blocks_same_in_a_batch_and_alone(S, Cg, dtype):
    """A block's results are bit for bit the same wherever it falls: first to last in a batch of
    four, or alone after the batches. Rolling the channels of (2, 9 Cg, S) by whole groups moves
    every block through every position (18 blocks: batches 0-3 ... 12-15, one of them across the
    two samples, then 16 and 17 alone)."""
    G, C = 9, 9 * Cg
    x0, dy0 = randn((2, C, S), 95, dtype, offset=-1.0), randn((2, C, S), 96, dtype)
    w, b = rng(97).uniform(0.5, 1.5, C).astype(pdtype(dtype)), randn((C,), 98, pdtype(dtype))

    def run(k):
        def roll(a, axis, by=k * Cg):
            return np.ascontiguousarray(np.roll(a, by, axis))

        x, dy, wk = roll(x0, 1), roll(dy0, 1), roll(w, 0)
        y, mean, rstd = F.group_norm_forward(x, G, wk, roll(b, 0))
        dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, wk, True)
        return [roll(y, 1, -k * Cg), roll(mean, 1, -k), roll(rstd, 1, -k), roll(dx, 1, -k * Cg),
                roll(dw, 0, -k * Cg), roll(db, 0, -k * Cg)]

    first = run(0)
    for k in range(1, G):
        for name, a, want in zip(["y", "mean", "rstd", "dx", "dweight", "dbias"], run(k), first):
            np.testing.assert_array_equal(a, want, err_msg=f"roll {k}: {name}")


@pytest.mark.parametrize("shape,G", [((4, 9, 7, 7), 9), ((3, 6, 3, 3), 3)])
def test_small_blocks_exact_when_mean_dominates(shape, G):
    """|mean| = 1e4 with std 1 in float32 through the fused forward's small blocks: the shifted
    sums keep mean and variance exact."""
    x0 = (rng(41).standard_normal(shape) + 1e4).astype(np.float32)
    y, mean, rstd = F.group_norm_forward(x0, G, eps=0.0)
    y_ref, m_ref, _, r_ref = ref_forward(x0, G, None, None, 0.0)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-7)
    np.testing.assert_allclose(rstd, r_ref, rtol=1e-5)
    assert_close(y, y_ref, 1e-4, 1e-4)


def test_small_blocks_bfloat16_through_dlpack():
    """bfloat16 7x7 planes (torch CPU tensors into the core): against the float64 reference of the
    exact bfloat16 values, and bit for bit the same with the planes rolled by one block (each block
    then at another place in its batch, or alone)."""
    shape, G = (1, 9, 7, 7), 9
    x32 = torch.tensor(randn(shape, 84, np.float32, offset=2.0)).to(torch.bfloat16)
    dy32 = torch.tensor(randn(shape, 85, np.float32)).to(torch.bfloat16)
    w = torch.tensor(rng(86).uniform(0.5, 1.5, 9).astype(np.float32))
    b = torch.tensor(rng(87).uniform(-1, 1, 9).astype(np.float32))

    def run(k):
        x, dy = x32.roll(k, 1).contiguous(), dy32.roll(k, 1).contiguous()
        wk = w.roll(k, 0).contiguous()
        y, dx = torch.empty_like(x), torch.empty_like(x)
        mean, var, rstd = (torch.empty(1, G) for _ in range(3))
        normkit._C.group_norm_forward(x, wk, b.roll(k, 0).contiguous(), 1e-5, y, mean, var, rstd)
        sum_dy, sum_dy_xmu = torch.empty(1, 9), torch.empty(1, 9)
        normkit._C.group_norm_backward(dy, x, mean, rstd, wk, dx, sum_dy, sum_dy_xmu)
        return [a.roll(-k, 1) for a in (y, mean, rstd, dx, sum_dy, sum_dy_xmu)]

    y, mean, _, dx, _, _ = first = run(0)
    xf, dyf = x32.float().numpy(), dy32.float().numpy()
    y_ref, m_ref, _, _ = ref_forward(xf, G, w.numpy(), b.numpy(), 1e-5)
    assert_close(y.float().numpy(), y_ref, 1e-2, 1e-2, "y")  # bfloat16 has 8 mantissa bits
    assert_close(mean.numpy(), m_ref, 1e-5, 1e-5, "mean")
    assert_close(dx.float().numpy(), ref_backward(dyf, xf, G, w.numpy(), 1e-5)[0], 2e-2, 2e-2,
                 "dx")
    for k in (1, 5):
        for a, want in zip(run(k), first):
            assert torch.equal(a, want), k


_THREADS_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
import normkit.functional as F
from helpers import randn
# 111 blocks of 900 values: the threads' ranges of blocks start off multiples of four
x, dy = randn((3, 37, 30, 30), 99, np.float32, offset=0.5), randn((3, 37, 30, 30), 100, np.float32)
y, mean, rstd = F.group_norm_forward(x, 37)
dx, dw, db = F.group_norm_backward(dy, x, mean, rstd)
np.savez({out!r}, y=y, mean=mean, rstd=rstd, dx=dx)
"""


def test_fused_planar_results_independent_of_thread_count(tmp_path):
    results = []
    for threads in ("1", "2", "3"):
        out = str(tmp_path / f"t{threads}.npz")
        script = _THREADS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out)
        env = dict(os.environ, OMP_NUM_THREADS=threads, OMP_DYNAMIC="false")
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(np.load(out))
    for other in results[1:]:
        for name in ("y", "mean", "rstd", "dx"):
            np.testing.assert_array_equal(other[name], results[0][name], err_msg=name)


_STREAM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import normkit.functional as F
from helpers import make_layout, randn, rng
from test_groupnorm_functional import ref_backward, ref_forward
checked = 0
for shape, G in [((3, 83, 9, 7), 83), ((2, 48, 5, 7), 12), ((4, 64, 7, 7), 64)]:
    for layout in ("contiguous", "channels_last"):
        for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
            x0, dy0 = randn(shape, 60, dt, offset=0.5), randn(shape, 61, dt)
            w, b = (rng(62).random(shape[1]) + 0.5).astype(dt), randn((shape[1],), 63, dt)
            x, dy = make_layout(x0, layout), make_layout(dy0, layout)
            y, mean, rstd = F.group_norm_forward(x, G, w, b)
            dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, w, b)
            ry = ref_forward(x0, G, w, b, 1e-5)[0]
            rdx, rdw, rdb = ref_backward(dy0, x0, G, w, 1e-5)
            for name, got, want in (("y", y, ry), ("dx", dx, rdx), ("dw", dw, rdw)):
                err = np.max(np.abs(got - want)) / np.max(np.abs(want))
                assert err < tol, (shape, layout, dt, name, err)
            checked += 1
print("checked", checked)
"""


def test_streaming_stores_in_subprocess():
    """Outputs far larger than the last-level cache are written with streaming stores. A low
    threshold (NORMKIT_STREAM_MIN_BYTES, read once per process) puts small tensors on that path,
    planar and channels-last, with rows of channels that start anywhere in a cache line."""
    env = dict(os.environ, NORMKIT_STREAM_MIN_BYTES="4096")
    script = _STREAM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked 12" in proc.stdout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_finite_differences(layout):
    """float64 gradients of sum(y * r) match central differences in x, weight and bias."""
    shape, G = (2, 4, 3, 5), 2
    x = make_layout(randn(shape, 50), layout).copy(order="K")
    r = randn(shape, 51)
    w, b = rng(52).standard_normal(4), rng(53).standard_normal(4)
    loss = lambda: float((F.group_norm_forward(x, G, w, b)[0] * r).sum())  # noqa: E731
    _, mean, rstd = F.group_norm_forward(x, G, w, b)
    dx, dw, db = F.group_norm_backward(r, x, mean, rstd, w, b)
    assert_close(dx, fd_grad(loss, x), 1e-6, 1e-6, "dx")
    assert_close(dw, fd_grad(loss, w), 1e-6, 1e-6, "dweight")
    assert_close(db, fd_grad(loss, b), 1e-6, 1e-6, "dbias")


# --- instance norm -------------------------------------------------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (3, 7, 2), (2, 3, 4, 3, 5)])
def test_instance_norm_against_torch(shape, dtype, use_input_stats, dev):
    C = shape[1]
    x0, dy0 = randn(shape, 60, dtype), randn(shape, 61, dtype)
    w = rng(62).uniform(0.5, 1.5, C).astype(dtype)
    b = rng(63).uniform(-1, 1, C).astype(dtype)
    rm0 = rng(64).uniform(-1, 1, C).astype(dtype)
    rv0 = rng(65).uniform(0.5, 2, C).astype(dtype)
    tx = torch.tensor(x0, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    trm, trv = torch.tensor(rm0), torch.tensor(rv0)
    ty = TF.instance_norm(tx, trm, trv, tw, tb, use_input_stats, 0.3, 1e-5)
    ty.backward(torch.tensor(dy0))
    x = dev_array(make_layout(x0, "channels_last"), dev)
    rm, rv = dev_array(rm0.copy(), dev), dev_array(rv0.copy(), dev)
    wd, bd = dev_array(w, dev), dev_array(b, dev)
    y, mean, rstd = F.instance_norm_forward(x, rm, rv, wd, bd, use_input_stats, 0.3, 1e-5)
    assert_close_dtype(to_host(y), ty.detach().numpy(), dtype, "y")
    assert same_layout(to_host(y), to_host(x))  # channels-last in, channels-last out
    assert_close_dtype(to_host(rm), trm.numpy(), dtype, "running_mean")
    assert_close_dtype(to_host(rv), trv.numpy(), dtype, "running_var")
    dx, dw, db = F.instance_norm_backward(dev_array(dy0, dev), x, mean, rstd, wd,
                                          use_input_stats, bd)
    assert_close_dtype(to_host(dx), tx.grad.numpy(), dtype, "dx", 4)
    assert_close_dtype(to_host(dw), tw.grad.numpy(), dtype, "dweight", 4)
    assert_close_dtype(to_host(db), tb.grad.numpy(), dtype, "dbias", 4)


def test_instance_norm_is_group_norm_with_g_equal_c():
    x = randn((3, 5, 6, 7), 70)
    y1 = F.instance_norm_forward(x)[0]
    y2 = F.group_norm_forward(x, 5)[0]
    np.testing.assert_array_equal(y1, y2)
    assert_close(y1, TF.instance_norm(torch.tensor(x)).numpy(), 1e-12, 1e-12)


# --- bfloat16 through DLPack (NumPy has no bfloat16): torch CPU tensors into the core ------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_through_dlpack(layout):
    shape, G = (3, 6, 9, 13), 3
    x32 = torch.tensor(randn(shape, 80, np.float32, offset=2.0)).to(torch.bfloat16)
    dy32 = torch.tensor(randn(shape, 81, np.float32)).to(torch.bfloat16)
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    xf, dyf = x32.float().numpy(), dy32.float().numpy()  # the exact bfloat16 values
    w = torch.tensor(rng(82).uniform(0.5, 1.5, 6).astype(np.float32))
    b = torch.tensor(rng(83).uniform(-1, 1, 6).astype(np.float32))
    y = torch.empty_like(x32)
    mean, var, rstd = (torch.empty(3, G) for _ in range(3))
    normkit._C.group_norm_forward(x32, w, b, 1e-5, y, mean, var, rstd)
    y_ref, m_ref, v_ref, r_ref = ref_forward(xf, G, w.numpy(), b.numpy(), 1e-5)
    assert y.stride() == x32.stride()
    assert_close(y.float().numpy(), y_ref, 1e-2, 1e-2, "y")  # bfloat16 has 8 mantissa bits
    assert_close(mean.numpy(), m_ref, 1e-5, 1e-5, "mean")
    assert_close(var.numpy(), v_ref, 1e-5, 1e-5, "var")
    dx = torch.empty_like(x32)
    sum_dy, sum_dy_xmu = torch.empty(3, 6), torch.empty(3, 6)
    normkit._C.group_norm_backward(dy32, x32, mean, rstd, w, dx, sum_dy, sum_dy_xmu)
    dx_ref, _, _ = ref_backward(dyf, xf, G, w.numpy(), 1e-5)
    assert_close(dx.float().numpy(), dx_ref, 2e-2, 2e-2, "dx")
    assert_close(sum_dy.numpy(), dyf.astype(np.float64).sum(axis=(2, 3)), 1e-5, 1e-5, "sum_dy")


# --- bad input -----------------------------------------------------------------------------------

def test_errors():
    x = randn((2, 6, 4, 5), 90, np.float32)
    with pytest.raises(ValueError, match="not divisible into 4 groups"):
        F.group_norm_forward(x, 4)
    with pytest.raises(ValueError, match="num_groups"):
        F.group_norm_stats(x, 0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \.\.\.\)"):
        F.group_norm_forward(x[0, 0, 0], 1)
    with pytest.raises(TypeError, match="weight must be float32"):
        F.group_norm_forward(x, 3, np.ones(6, np.float64))
    with pytest.raises(ValueError, match="weight must have shape"):
        F.group_norm_forward(x, 3, np.ones(5, np.float32))
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        F.group_norm_forward(x.tolist(), 3)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm_forward(randn((3, 4, 1, 1), 91))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm_forward(randn((3, 4), 91))
    mean, var = F.group_norm_stats(x, 3)
    with pytest.raises(TypeError, match="dy has dtype float64 but x has float32"):
        F.group_norm_backward_reduce(x.astype(np.float64), x, mean)
    with pytest.raises(ValueError, match="dy has shape"):
        F.group_norm_backward_reduce(x[:1], x, mean)
    with pytest.raises(ValueError, match="scale must have shape"):
        F.group_norm_affine(x, mean, np.ones((2, 3), np.float32), np.ones((2, 6), np.float32))
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.group_norm_affine(x, mean, np.ones((2, 6), np.float32), np.ones((2, 6), np.float32),
                            out=out)
    with pytest.raises(ValueError, match="broadcast view"):
        normkit._C.group_norm_stats(x, np.lib.stride_tricks.as_strided(
            np.zeros(3, np.float32), (2, 3), (0, 4), writeable=True), var)
    with pytest.raises(ValueError, match=r"mean must have shape \(N, G\)"):
        normkit._C.group_norm_stats(x, np.zeros((3, 3), np.float32), var)
    with pytest.raises(ValueError, match="not divisible into 4 groups"):
        normkit._C.group_norm_stats(x, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))
    rm = np.zeros(6, np.float64)
    with pytest.raises(TypeError, match="running_mean must be float32"):
        F.instance_norm_forward(x, rm, np.ones(6, np.float32))
    ro = np.zeros(6, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.instance_norm_forward(x, ro, np.ones(6, np.float32))
    with pytest.raises(ValueError, match="use_input_stats=False needs"):
        F.instance_norm_forward(x, use_input_stats=False)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
def test_device_mismatch():
    x = to_gpu(randn((2, 6, 4, 5), 92, np.float32))
    with pytest.raises(TypeError, match="weight is on cpu"):
        F.group_norm_forward(x, 3, np.ones(6, np.float32))
