"""normkit.functional batch-norm ops against torch.nn.functional.batch_norm (CPU), float64 NumPy
references and float64 finite differences, over every dtype and memory layout."""
import numpy as np
import pytest
import torch

import normkit.functional as F
from helpers import (
    assert_close,
    assert_close_dtype,
    bc,
    channels_last,
    count,
    fd_grad,
    layouts_for,
    make_layout,
    other_layout,
    params,
    randn,
    ref_backward_eval,
    ref_backward_train,
    ref_forward_eval,
    ref_forward_train,
    ref_formula,
    ref_running_update,
    ref_stats,
    running,
    to_torch,
    torch_batch_norm,
)

SHAPES = [(5, 3), (2, 3, 5), (3, 5, 7, 9), (2, 3, 5, 4, 3)]
CASES = [(s, lay) for s in SHAPES for lay in layouts_for(len(s))]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]

# Smaller shapes for finite differences (every element is perturbed twice).
FD_SHAPES = [(5, 3), (3, 4, 5), (2, 3, 4, 5), (2, 3, 3, 2, 3)]
FD_CASES = [(s, lay) for s in FD_SHAPES for lay in layouts_for(len(s))[:2]] + [
    ((3, 4, 5), "strided"), ((2, 3, 4, 5), "non_collapsible")]
FD_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in FD_CASES]

EPS = 1e-3
MOMENTUM = 0.3


def _inputs(shape, layout, dtype, seed=1):
    x0 = randn(shape, seed, dtype, offset=0.7, scale=1.3)
    return x0, make_layout(x0, layout)


def _dy(shape, layout, dtype, seed=5):
    dy0 = randn(shape, seed, dtype, offset=0.2, scale=0.9)
    return dy0, make_layout(dy0, other_layout(layout, len(shape)))


# --------------------------------------------------------------------------------------------------
# batch_norm_forward


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_training(shape, layout, affine, dtype):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype)
    w, b = params(C, 2, dtype) if affine else (None, None)
    rm0, rv0 = running(C, 3, dtype)
    rm, rv = rm0.copy(), rv0.copy()

    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                           eps=EPS)

    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dtype
    assert mean.shape == (C,) and mean.dtype == dtype
    assert invstd.shape == (C,) and invstd.dtype == dtype
    np.testing.assert_array_equal(x, x0)  # input untouched
    if layout in ("contiguous", "channels_last", "fortran"):
        assert y.strides == x.strides, "output not allocated in the input's layout"

    ty, _, _, _, trm, trv = torch_batch_norm(x0, w, b, rm0, rv0, True, MOMENTUM, EPS)
    assert_close_dtype(y, ty, dtype, "y vs torch")
    assert_close_dtype(rm, trm, dtype, "running_mean vs torch")
    assert_close_dtype(rv, trv, dtype, "running_var vs torch")

    ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, EPS)
    assert_close_dtype(y, ry, dtype, "y vs numpy")
    assert_close_dtype(mean, rmean, dtype, "mean")
    assert_close_dtype(invstd, rinvstd, dtype, "invstd")
    erm, erv = ref_running_update(rm0, rv0, rmean, rvar, count(x0), MOMENTUM)
    assert_close_dtype(rm, erm, dtype, "running_mean (momentum)")
    assert_close_dtype(rv, erv, dtype, "running_var (momentum, unbiased)")


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_training_without_running_stats(shape, layout, dtype):
    x0, x = _inputs(shape, layout, dtype, seed=21)
    w, b = params(shape[1], 22, dtype)
    y, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    ry, rmean, _, rinvstd = ref_forward_train(x0, w, b, EPS)
    assert_close_dtype(y, ry, dtype)
    assert_close_dtype(mean, rmean, dtype)
    assert_close_dtype(invstd, rinvstd, dtype)


def test_running_var_is_unbiased_and_mean_exact():
    """A tiny hand-checkable case: values 1, 2, 4, 9 in one channel; momentum 1 copies the batch
    statistics into the running buffers; eps = 1e-300 (training needs eps > 0, as in torch)
    leaves invstd exact in float64."""
    x = np.array([[1.0, -3.0], [2.0, -3.5], [4.0, -2.0], [9.0, -6.5]])
    rm, rv = np.array([0.25, 0.5]), np.array([1.5, 2.0])
    y, mean, invstd = F.batch_norm_forward(x, None, None, rm, rv, training=True, momentum=1.0,
                                           eps=1e-300)
    np.testing.assert_allclose(mean, [4.0, -3.75], rtol=1e-15)
    np.testing.assert_allclose(rm, [4.0, -3.75], rtol=1e-15)
    np.testing.assert_allclose(rv, [np.var(x[:, 0], ddof=1), np.var(x[:, 1], ddof=1)], rtol=1e-14)
    np.testing.assert_allclose(invstd, 1 / np.sqrt([np.var(x[:, 0]), np.var(x[:, 1])]),
                               rtol=1e-14)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_eval(shape, layout, affine, dtype):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype, seed=7)
    w, b = params(C, 8, dtype) if affine else (None, None)
    rm0, rv0 = running(C, 9, dtype)
    rm, rv = rm0.copy(), rv0.copy()

    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=False, momentum=MOMENTUM,
                                           eps=EPS)

    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(rm, rm0)  # eval never touches the running stats
    np.testing.assert_array_equal(rv, rv0)
    assert_close_dtype(mean, rm0, dtype)
    assert_close_dtype(invstd, 1 / np.sqrt(rv0.astype(np.float64) + EPS), dtype)
    ty = torch_batch_norm(x0, w, b, rm0, rv0, False, MOMENTUM, EPS)[0]
    assert_close_dtype(y, ty, dtype, "y vs torch")
    assert_close_dtype(y, ref_forward_eval(x0, w, b, rm0, rv0, EPS), dtype, "y vs numpy")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_float16(shape, layout, training):
    """float16 input, float32 parameters and statistics; compared with float64 on the same
    (float16-representable) values."""
    C = shape[1]
    x0, x = _inputs(shape, layout, np.float16, seed=31)
    w, b = params(C, 32, np.float32)
    rm0, rv0 = running(C, 33, np.float32)
    rm, rv = rm0.copy(), rv0.copy()

    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=training, momentum=MOMENTUM,
                                           eps=EPS)

    assert y.dtype == np.float16 and y.shape == shape
    assert mean.dtype == np.float32 and invstd.dtype == np.float32
    if training:
        ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, EPS)
        # statistics are computed from exact float16 values with wide accumulators
        assert_close(mean, rmean, 1e-5, 1e-5)
        assert_close(invstd, rinvstd, 1e-5, 1e-5)
        erm, erv = ref_running_update(rm0, rv0, rmean, rvar, count(x0), MOMENTUM)
        assert_close(rm, erm, 1e-5, 1e-5)
        assert_close(rv, erv, 1e-5, 1e-5)
    else:
        ry = ref_forward_eval(x0, w, b, rm0, rv0, EPS)
        np.testing.assert_array_equal(rm, rm0)
    assert_close_dtype(y, ry, np.float16)


# --------------------------------------------------------------------------------------------------
# batch_norm_backward


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_backward_training(shape, layout, affine, dtype):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype, seed=41)
    dy0, dy = _dy(shape, layout, dtype, seed=42)
    w, b = params(C, 43, dtype) if affine else (None, None)

    _, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)

    assert dx.shape == shape and dx.dtype == dtype
    np.testing.assert_array_equal(dy, dy0)
    _, tdx, tdw, tdb, _, _ = torch_batch_norm(x0, w, b, None, None, True, 0.1, EPS, dy=dy0)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(dx, tdx, dtype, "dx vs torch")
    assert_close_dtype(dx, rdx, dtype, "dx vs numpy")
    if affine:
        assert dw.dtype == dtype and db.dtype == dtype
        assert_close_dtype(dw, tdw, dtype, "dweight vs torch")
        assert_close_dtype(db, tdb, dtype, "dbias vs torch")
        assert_close_dtype(dw, rdw, dtype, "dweight vs numpy")
        assert_close_dtype(db, rdb, dtype, "dbias vs numpy")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_backward_eval(shape, layout, affine, dtype):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype, seed=51)
    dy0, dy = _dy(shape, layout, dtype, seed=52)
    w, b = params(C, 53, dtype) if affine else (None, None)
    rm, rv = running(C, 54, dtype)

    _, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=False, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=False)

    _, tdx, tdw, tdb, _, _ = torch_batch_norm(x0, w, b, rm, rv, False, 0.1, EPS, dy=dy0)
    rdx, rdw, rdb = ref_backward_eval(dy0, x0, w, rm, rv, EPS)
    assert_close_dtype(dx, tdx, dtype, "dx vs torch")
    assert_close_dtype(dx, rdx, dtype, "dx vs numpy")
    if affine:
        assert_close_dtype(dw, tdw, dtype, "dweight vs torch")
        assert_close_dtype(db, tdb, dtype, "dbias vs torch")
        assert_close_dtype(dw, rdw, dtype)
        assert_close_dtype(db, rdb, dtype)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_backward_float16(shape, layout, training):
    C = shape[1]
    x0, x = _inputs(shape, layout, np.float16, seed=61)
    dy0, dy = _dy(shape, layout, np.float16, seed=62)
    w, b = params(C, 63, np.float32)
    rm, rv = running(C, 64, np.float32)

    _, mean, invstd = F.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training,
                                           eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=training)

    assert dx.dtype == np.float16 and dw.dtype == np.float32 and db.dtype == np.float32
    if training:
        rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    else:
        rdx, rdw, rdb = ref_backward_eval(dy0, x0, w, rm, rv, EPS)
    assert_close_dtype(dx, rdx, np.float16, "dx")
    # parameter gradients are float32 sums of exact float16 products
    assert_close(dw, rdw, 1e-5, 1e-5)
    assert_close(db, rdb, 1e-5, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_flags(training, dtype):
    shape = (3, 5, 7, 9)
    x0, x = _inputs(shape, "channels_last", dtype, seed=71)
    dy0, dy = _dy(shape, "channels_last", dtype, seed=72)
    w, b = params(5, 73, dtype)
    rm, rv = running(5, 74, dtype)
    _, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=training, eps=EPS)

    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=training)
    dx2, dw2, db2 = F.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                          input_grad=False)
    assert dx2 is None
    assert_close_dtype(dw2, dw, dtype)
    assert_close_dtype(db2, db, dtype)

    dx3, dw3, db3 = F.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                          weight_grad=False)
    assert dw3 is None and db3 is None
    assert_close_dtype(dx3, dx, dtype)

    dx4, dw4, db4 = F.batch_norm_backward(dy, x, mean, invstd, None, training=training)
    assert dw4 is None and db4 is None
    # without weight, dx is the weight-1 gradient
    ref = (ref_backward_train(dy0, x0, None, EPS) if training
           else ref_backward_eval(dy0, x0, None, rm, rv, EPS))[0]
    assert_close_dtype(dx4, ref, dtype)


@pytest.mark.parametrize("dy_layout", ["strided", "channel_slice", "non_collapsible", "reversed"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_backward_with_dy_in_odd_layouts(x_layout, dy_layout, dtype):
    """dy strided, channel-sliced, non-collapsible or reversed, against an x with a fast path."""
    shape = (3, 5, 7, 9)
    x0, x = _inputs(shape, x_layout, dtype, seed=75)
    dy0 = randn(shape, 76, dtype, offset=-0.3)
    dy = make_layout(dy0, dy_layout)
    w, b = params(5, 77, dtype)
    _, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(dx, rdx, dtype)
    assert_close_dtype(dw, rdw, dtype)
    assert_close_dtype(db, rdb, dtype)
    s1, s2 = F.batch_norm_backward_reduce(dy, x, mean)
    assert_close_dtype(s1, rdb, dtype)
    dx2 = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, s1, s2)
    assert_close_dtype(dx2, rdx, dtype)


# --------------------------------------------------------------------------------------------------
# Finite differences (float64)


@pytest.mark.parametrize("shape,layout", FD_CASES, ids=FD_IDS)
def test_training_gradients_finite_differences(shape, layout):
    C = shape[1]
    x = make_layout(randn(shape, 81, offset=0.3, scale=1.7), layout)
    w, b = params(C, 82)
    r = randn(shape, 83, scale=1.1, offset=0.4)

    def loss():
        y = F.batch_norm_forward(x, w, b, training=True, eps=EPS)[0]
        return float(np.sum(y * r))

    _, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(make_layout(r, other_layout(layout, len(shape))), x, mean,
                                       invstd, w, training=True)
    assert_close(dx, fd_grad(loss, x), 1e-6, 1e-6, "dx")
    assert_close(dw, fd_grad(loss, w), 1e-6, 1e-6, "dweight")
    assert_close(db, fd_grad(loss, b), 1e-6, 1e-6, "dbias")


@pytest.mark.parametrize("shape,layout", FD_CASES, ids=FD_IDS)
def test_eval_gradients_finite_differences(shape, layout):
    C = shape[1]
    x = make_layout(randn(shape, 91, offset=-0.4, scale=1.2), layout)
    w, b = params(C, 92)
    rm, rv = running(C, 93)
    r = randn(shape, 94, offset=0.1)

    def loss():
        y = F.batch_norm_forward(x, w, b, rm, rv, training=False, eps=EPS)[0]
        return float(np.sum(y * r))

    _, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=False, eps=EPS)
    dx, dw, db = F.batch_norm_backward(r, x, mean, invstd, w, training=False)
    assert_close(dx, fd_grad(loss, x), 1e-6, 1e-6, "dx")
    assert_close(dw, fd_grad(loss, w), 1e-6, 1e-6, "dweight")
    assert_close(db, fd_grad(loss, b), 1e-6, 1e-6, "dbias")


# --------------------------------------------------------------------------------------------------
# The split ops: stats -> normalize, backward_reduce -> backward_elemt


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_split_ops_compose_to_fused(shape, layout, dtype):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype, seed=101)
    dy0, dy = _dy(shape, layout, dtype, seed=102)
    w, b = params(C, 103, dtype)

    mean, var = F.batch_norm_stats(x)
    assert mean.dtype == dtype and var.dtype == dtype and mean.shape == var.shape == (C,)
    rmean, rvar = ref_stats(x0)
    assert_close_dtype(mean, rmean, dtype, "mean")
    assert_close_dtype(var, rvar, dtype, "biased var")

    invstd = (1.0 / np.sqrt(var + dtype.type(EPS))).astype(dtype)
    y_split = F.batch_norm_normalize(x, mean, invstd, w, b)
    y, fmean, finvstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    assert y_split.shape == shape and y_split.dtype == dtype
    assert_close_dtype(fmean, mean, dtype)
    assert_close_dtype(finvstd, invstd, dtype)
    assert_close_dtype(y_split, y, dtype, "normalize vs forward")
    assert_close_dtype(y_split, ref_forward_train(x0, w, b, EPS)[0], dtype)

    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean)
    assert sum_dy.dtype == dtype and sum_dy.shape == (C,)
    x64, dy64 = x0.astype(np.float64), dy0.astype(np.float64)
    assert_close_dtype(sum_dy, dy64.sum(axis=(0,) + tuple(range(2, len(shape)))), dtype)
    assert_close_dtype(sum_dy_xmu, (dy64 * (x64 - bc(mean, len(shape)))).sum(
        axis=(0,) + tuple(range(2, len(shape)))), dtype)

    dx_implicit = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu)
    dx_explicit = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                                              count=count(x0))
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    rdx = ref_backward_train(dy0, x0, w, EPS)[0]
    assert_close_dtype(dx_implicit, dx, dtype, "elemt vs fused backward")
    assert_close_dtype(dx_explicit, dx, dtype, "elemt with explicit count")
    assert_close_dtype(dx_implicit, rdx, dtype, "elemt vs numpy")
    assert_close_dtype(dw, sum_dy_xmu * invstd, dtype)
    assert_close_dtype(db, sum_dy, dtype)

    # without the sums, backward_elemt is the eval-mode gradient through constant statistics
    dx_eval = F.batch_norm_backward_elemt(dy, x, mean, invstd, w)
    assert_close_dtype(dx_eval, dy64 * bc(w, len(shape)) * bc(invstd, len(shape)), dtype)


@pytest.mark.parametrize("shape,layout", [(s, lay) for s, lay in CASES if s[0] >= 3] + [
    ((4, 3, 5), "channels_last"), ((4, 3, 5), "contiguous")])
def test_split_ops_over_uneven_shards_equal_whole_batch(shape, layout, dtype):
    """A synchronized batch norm over 'ranks' holding uneven parts of the batch: local stats,
    combined by count, normalize per shard; backward_reduce per shard, sums added,
    backward_elemt per shard with the global count. Must equal batch norm over the whole batch."""
    C = shape[1]
    x0, _ = _inputs(shape, layout, dtype, seed=111)
    dy0, _ = _dy(shape, layout, dtype, seed=112)
    w, b = params(C, 113, dtype)
    cut = 1
    shards = [make_layout(x0[:cut], layout), make_layout(x0[cut:], layout)]
    dshards = [make_layout(dy0[:cut], other_layout(layout, len(shape))),
               make_layout(dy0[cut:], other_layout(layout, len(shape)))]

    stats = [F.batch_norm_stats(s) for s in shards]
    ns = [count(s) for s in shards]
    n = sum(ns)
    mean64 = sum(k * m.astype(np.float64) for k, (m, _) in zip(ns, stats)) / n
    var64 = sum(k * (v.astype(np.float64) + (m.astype(np.float64) - mean64) ** 2)
                for k, (m, v) in zip(ns, stats)) / n
    mean = mean64.astype(dtype)
    invstd = (1.0 / np.sqrt(var64 + EPS)).astype(dtype)
    y = np.concatenate([F.batch_norm_normalize(s, mean, invstd, w, b) for s in shards])

    ry, rmean, rvar, _ = ref_forward_train(x0, w, b, EPS)
    assert_close_dtype(mean64, rmean, dtype)
    assert_close_dtype(var64, rvar, dtype)
    assert_close_dtype(y, ry, dtype, "sharded forward")

    sums = [F.batch_norm_backward_reduce(d, s, mean) for d, s in zip(dshards, shards)]
    sum_dy = (sums[0][0] + sums[1][0]).astype(dtype)
    sum_dy_xmu = (sums[0][1] + sums[1][1]).astype(dtype)
    dx = np.concatenate([
        F.batch_norm_backward_elemt(d, s, mean, invstd, w, sum_dy, sum_dy_xmu, count=n)
        for d, s in zip(dshards, shards)])
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(dx, rdx, dtype, "sharded dx")
    assert_close_dtype(sum_dy_xmu * invstd, rdw, dtype)
    assert_close_dtype(sum_dy, rdb, dtype)
    # the local count instead of the global one gives a different (wrong) gradient
    wrong = F.batch_norm_backward_elemt(dshards[1], shards[1], mean, invstd, w, sum_dy, sum_dy_xmu)
    assert not np.allclose(wrong, rdx[cut:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_normalize_into_out_of_another_layout(layout, dtype):
    shape = (3, 5, 7, 9)
    x0, x = _inputs(shape, layout, dtype, seed=121)
    w, b = params(5, 122, dtype)
    mean, invstd = running(5, 123, dtype)
    out = make_layout(np.empty(shape, dtype), other_layout(layout, 4))
    y = F.batch_norm_normalize(x, mean, invstd, w, b, out=out)
    assert y is out
    expected = (x0.astype(np.float64) - bc(mean, 4)) * bc(invstd, 4) * bc(w, 4) + bc(b, 4)
    assert_close_dtype(out, expected, dtype)
    # weight and bias are optional
    y2 = F.batch_norm_normalize(x, mean, invstd)
    assert_close_dtype(y2, (x0.astype(np.float64) - bc(mean, 4)) * bc(invstd, 4), dtype)


def test_backward_elemt_into_out(dtype):
    shape = (2, 3, 5)
    x0, x = _inputs(shape, "channels_last", dtype, seed=131)
    dy0, dy = _dy(shape, "channels_last", dtype, seed=132)
    w, _ = params(3, 133, dtype)
    mean, var = F.batch_norm_stats(x)
    invstd = (1 / np.sqrt(var + EPS)).astype(dtype)
    s1, s2 = F.batch_norm_backward_reduce(dy, x, mean)
    out = np.empty(shape, dtype)
    dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, s1, s2, out=out)
    assert dx is out
    assert_close_dtype(out, ref_backward_train(dy0, x0, w, EPS)[0], dtype)


# --------------------------------------------------------------------------------------------------
# Empty batches


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 5, 4), (2, 3, 0, 4), (0, 3, 2, 3, 4)])
@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64])
def test_stats_of_empty_batch_are_zeros(shape, dt):
    x = np.empty(shape, dt)
    mean, var = F.batch_norm_stats(x)
    pdt = np.float64 if dt == np.float64 else np.float32
    assert mean.shape == (3,) and var.shape == (3,)
    assert mean.dtype == pdt and var.dtype == pdt
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(var, np.zeros(3))


@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (0, 3, 5, 4, 2)])
def test_stats_of_empty_channels_last_batch_are_zeros(shape, dtype):
    x = make_layout(np.empty(shape, dtype), "channels_last")
    mean, var = F.batch_norm_stats(x)
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(var, np.zeros(3))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5, 4), (2, 3, 0, 4)])
def test_normalize_and_backward_on_empty_input(shape, dtype):
    x = np.empty(shape, dtype)
    mean, invstd = running(3, 141, dtype)
    w, b = params(3, 142, dtype)
    y = F.batch_norm_normalize(x, mean, invstd, w, b)
    assert y.shape == shape and y.dtype == dtype
    s1, s2 = F.batch_norm_backward_reduce(x, x, mean)
    np.testing.assert_array_equal(s1, np.zeros(3))
    np.testing.assert_array_equal(s2, np.zeros(3))
    dx = F.batch_norm_backward_elemt(x, x, mean, invstd, w)
    assert dx.shape == shape
    # an empty shard in a synchronized backward: the global count is positive
    dx = F.batch_norm_backward_elemt(x, x, mean, invstd, w, s1, s2, count=10)
    assert dx.shape == shape


# --------------------------------------------------------------------------------------------------
# Channels-last rows back to back: the flat kernels, with the channel pattern in registers where
# lcm(C, 16) <= 64 (C = 1, 8, 16, 32, 64 and 3, 24, 48 here), from tiles elsewhere (C = 5, 100).
# 41 x 43 positions per sample: an odd row count, so runs end in partial steps and scalars, and
# with 5 samples each lane gets more than 2048 values (a flush within the run).

FLAT_C = [1, 3, 8, 16, 24, 32, 48, 64, 5, 100]
FLAT_SHAPE = (5, 41, 43)  # (N, H, W)


def _flat_layout(x0, samples_apart):
    """x0 stored channels-last ((N, C) arrays as they are); samples_apart: every other sample of a
    twice-as-long batch (a batch slice, so that samples are not back to back and each one is a run
    of its own)."""
    if not samples_apart:
        return channels_last(x0) if x0.ndim > 2 else x0
    twice = np.repeat(x0, 2, axis=0)
    base = channels_last(twice) if x0.ndim > 2 else twice
    base[1::2] = np.nan
    return base[::2]


def _flat_shape(C, rank):
    """(N, C, H, W), or (N*H*W, C): rows of one value each, the only channels-last C = 1."""
    N, H, W = FLAT_SHAPE
    return (N, C, H, W) if rank == 4 else (N * H * W, C)


@pytest.mark.parametrize("samples_apart", [False, True], ids=["adjacent", "apart"])
@pytest.mark.parametrize("rank", [4, 2], ids=["nhwc", "nc"])
@pytest.mark.parametrize("C", FLAT_C)
def test_channels_last_flat_kernels(C, rank, samples_apart, dtype):
    shape = _flat_shape(C, rank)
    x0 = randn(shape, 171, dtype, offset=0.7, scale=1.3)
    dy0 = randn(shape, 172, dtype, offset=0.2, scale=0.9)
    x, dy = _flat_layout(x0, samples_apart), _flat_layout(dy0, samples_apart)
    assert C == 1 or x.strides[1] == x.itemsize
    w, b = params(C, 173, dtype)

    mean, var = F.batch_norm_stats(x)
    y, fmean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, EPS)
    assert_close_dtype(mean, rmean, dtype, "stats mean")
    assert_close_dtype(var, rvar, dtype, "stats var")
    assert_close_dtype(fmean, rmean, dtype, "forward mean")
    assert_close_dtype(invstd, rinvstd, dtype, "invstd")
    assert_close_dtype(y, ry, dtype, "y")

    dx, dw, db = F.batch_norm_backward(dy, x, fmean, invstd, w, training=True)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(dx, rdx, dtype, "dx")
    # dweight and dbias sum N*H*W terms of size ~1: their error scales with the count
    assert_close_dtype(dw, rdw, dtype, "dweight", factor=count(x0) ** 0.5)
    assert_close_dtype(db, rdb, dtype, "dbias", factor=count(x0) ** 0.5)


@pytest.mark.parametrize("C", FLAT_C)
@pytest.mark.parametrize("rank", [4, 2], ids=["nhwc", "nc"])
def test_channels_last_flat_kernels_keep_variance_with_large_mean(C, rank):
    """float32 at |mean| = 1e4, std about 1: the flat lanes sum x - shift and flush into float64
    like the other paths, so the variance keeps its digits."""
    shape = _flat_shape(C, rank)
    g = np.random.default_rng(174)
    per_channel = (1, C) + (1,) * (rank - 2)
    x0 = (1e4 + g.uniform(-3, 3, C).reshape(per_channel) + g.uniform(0.7, 1.3, C).reshape(
        per_channel) * g.standard_normal(shape)).astype(np.float32)
    x = _flat_layout(x0, False)
    rmean, rvar = ref_stats(x0)
    mean, var = F.batch_norm_stats(x)
    assert np.max(np.abs(var / rvar - 1)) < 1e-3, (var, rvar)
    assert np.max(np.abs(mean / rmean - 1)) < 1e-6, (mean, rmean)
    y, fmean, invstd = F.batch_norm_forward(x, None, None, training=True, eps=1e-5)
    assert np.max(np.abs(invstd * np.sqrt(rvar + 1e-5) - 1)) < 5e-4
    assert np.max(np.abs(fmean / rmean - 1)) < 1e-6
    # y is O(1); the float32 mean at 1e4 costs up to half an ulp (~5e-4) of x - mean
    assert np.max(np.abs(y - ref_forward_train(x0, None, None, 1e-5)[0])) < 3e-3


@pytest.mark.parametrize("C", [16, 24, 32, 5])
def test_channels_last_flat_kernels_bfloat16(C):
    """bfloat16 NHWC through normkit.torch (the flat kernels load and store bfloat16 lanes):
    float32 statistics of the rounded input, y and dx to bfloat16's precision."""
    import normkit.torch as nkt

    N, H, W = FLAT_SHAPE
    x0 = torch.from_numpy(randn((N, C, H, W), 175, offset=0.7, scale=1.3))
    xb = x0.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    dyb = torch.from_numpy(randn((N, C, H, W), 176, scale=0.9)).to(torch.bfloat16)
    layer = nkt.BatchNorm2d(C)
    y = layer(xb)
    y.backward(dyb)
    xr = xb.detach().double().requires_grad_()
    ref = torch.nn.functional.batch_norm(xr, None, None, training=True, eps=layer.eps)
    ref.backward(dyb.double())
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(xb.grad.double(), xr.grad, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(layer.running_mean.double(), 0.1 * xr.detach().mean((0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(),  # unbiased, as torch's
                               0.9 + 0.1 * xr.detach().var((0, 2, 3)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Inputs that are read-only or broadcast (zero strides)


def test_read_only_inputs_are_accepted(dtype):
    shape = (3, 5, 7, 9)
    x0, x = _inputs(shape, "channels_last", dtype, seed=151)
    dy0, dy = _dy(shape, "channels_last", dtype, seed=152)
    w, b = params(5, 153, dtype)
    for a in (x, dy, w, b):
        a.setflags(write=False)
    y, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w)
    assert_close_dtype(y, ref_forward_train(x0, w, b, EPS)[0], dtype)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(dx, rdx, dtype)
    assert_close_dtype(dw, rdw, dtype)


def test_broadcast_input_with_zero_strides(dtype):
    """np.broadcast_to gives zero strides (read-only): every spatial value of a channel of one
    sample is the same, the statistics must still be right."""
    g = np.random.default_rng(161)
    base = (g.standard_normal((4, 3, 1, 1)) * 1.5 + 0.5).astype(dtype)
    x = np.broadcast_to(base, (4, 3, 5, 7))
    assert 0 in x.strides
    w, b = params(3, 162, dtype)
    mean, var = F.batch_norm_stats(x)
    rmean, rvar = ref_stats(np.ascontiguousarray(x))
    assert_close_dtype(mean, rmean, dtype)
    assert_close_dtype(var, rvar, dtype)
    y = F.batch_norm_forward(x, w, b, training=True, eps=EPS)[0]
    assert_close_dtype(y, ref_forward_train(np.ascontiguousarray(x), w, b, EPS)[0], dtype)


# --------------------------------------------------------------------------------------------------
# batchnormtrain / batchnormeval (given mean and std)

TE_SHAPES = [(5, 3), (4, 3, 7)]
TE_CASES = [(s, lay) for s in TE_SHAPES for lay in layouts_for(len(s))]
TE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in TE_CASES]


def _te_inputs(shape, layout, dtype, seed):
    C = shape[1]
    x0, x = _inputs(shape, layout, dtype, seed)
    gamma, beta = params(C, seed + 1, dtype)
    g = np.random.default_rng(seed + 2)
    mean = g.uniform(-0.5, 1.2, C).astype(dtype)
    std = g.uniform(0.6, 1.9, C).astype(dtype)
    return x0, x, gamma, beta, mean, std


def _torch_formula_grads(x, gamma, beta, mean, std, dy, grad_stats):
    tx, tg, tb = (to_torch(a, True) for a in (x, gamma, beta))
    tm, ts = to_torch(mean, grad_stats), to_torch(std, grad_stats)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (tx - tm.view(shape)) / ts.view(shape) * tg.view(shape) + tb.view(shape)
    y.backward(to_torch(dy))
    out = [y.detach().numpy(), tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()]
    if grad_stats:
        out += [tm.grad.numpy(), ts.grad.numpy()]
    return out


@pytest.mark.parametrize("shape,layout", TE_CASES, ids=TE_IDS)
def test_batchnormtrain_forward_backward(shape, layout, dtype):
    x0, x, gamma, beta, mean, std = _te_inputs(shape, layout, dtype, 171)
    dy0, dy = _dy(shape, layout, dtype, seed=175)

    y = F.batchnormtrain(x, gamma, beta, mean, std)
    assert y.shape == shape and y.dtype == dtype
    assert_close_dtype(y, ref_formula(x0, gamma, beta, mean, std), dtype, "y vs numpy")

    grads = F.batchnormtrain_backward(dy, x, gamma, mean, std)
    assert len(grads) == 5
    ty, *tgrads = _torch_formula_grads(x0, gamma, beta, mean, std, dy0, grad_stats=True)
    assert_close_dtype(y, ty, dtype, "y vs torch")
    for name, got, want in zip(["dinput", "dgamma", "dbeta", "dmean", "dstd"], grads, tgrads):
        assert got.shape == want.shape, name
        assert got.dtype == dtype, name
        assert_close_dtype(got, want, dtype, name)


@pytest.mark.parametrize("shape,layout", TE_CASES, ids=TE_IDS)
def test_batchnormtrain_finite_differences(shape, layout):
    x0, x, gamma, beta, mean, std = _te_inputs(shape, layout, np.float64, 181)
    r = randn(shape, 185, offset=0.3)

    def loss():
        return float(np.sum(F.batchnormtrain(x, gamma, beta, mean, std) * r))

    dx, dgamma, dbeta, dmean, dstd = F.batchnormtrain_backward(r, x, gamma, mean, std)
    for name, got, wrt in [("dinput", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta),
                           ("dmean", dmean, mean), ("dstd", dstd, std)]:
        assert_close(got, fd_grad(loss, wrt), 1e-6, 1e-6, name)


@pytest.mark.parametrize("shape,layout", TE_CASES, ids=TE_IDS)
def test_batchnormtrain_chained_through_batch_statistics_is_batch_norm(shape, layout):
    """With mean and std computed from the input (std = sqrt(var + eps)), chaining dmean and dstd
    back to the input gives the training batch-norm gradient."""
    x0, x, gamma, beta, _, _ = _te_inputs(shape, layout, np.float64, 191)
    dy0, dy = _dy(shape, layout, np.float64, seed=195)
    mean, var = F.batch_norm_stats(x)
    std = np.sqrt(var + EPS)
    dx, dgamma, dbeta, dmean, dstd = F.batchnormtrain_backward(dy, x, gamma, mean, std)
    M, nd = count(x0), len(shape)
    total = dx + bc(dmean, nd) / M + bc(dstd, nd) * (x0 - bc(mean, nd)) / (M * bc(std, nd))
    rdx, rdw, rdb = ref_backward_train(dy0, x0, gamma, EPS)
    assert_close(total, rdx, 1e-10, 1e-10)
    assert_close(dgamma, rdw, 1e-10, 1e-10)
    assert_close(dbeta, rdb, 1e-10, 1e-10)


@pytest.mark.parametrize("shape,layout", TE_CASES, ids=TE_IDS)
def test_batchnormeval_forward_backward(shape, layout, dtype):
    x0, x, gamma, beta, mean, std = _te_inputs(shape, layout, dtype, 201)
    dy0, dy = _dy(shape, layout, dtype, seed=205)

    y = F.batchnormeval(x, gamma, beta, mean, std)
    assert_close_dtype(y, ref_formula(x0, gamma, beta, mean, std), dtype)
    grads = F.batchnormeval_backward(dy, x, gamma, mean, std)
    assert len(grads) == 3
    ty, *tgrads = _torch_formula_grads(x0, gamma, beta, mean, std, dy0, grad_stats=False)
    assert_close_dtype(y, ty, dtype)
    for name, got, want in zip(["dinput", "dgamma", "dbeta"], grads, tgrads):
        assert got.dtype == dtype
        assert_close_dtype(got, want, dtype, name)


@pytest.mark.parametrize("shape,layout", TE_CASES, ids=TE_IDS)
def test_batchnormeval_finite_differences(shape, layout):
    x0, x, gamma, beta, mean, std = _te_inputs(shape, layout, np.float64, 211)
    r = randn(shape, 215, offset=-0.2)

    def loss():
        return float(np.sum(F.batchnormeval(x, gamma, beta, mean, std) * r))

    dx, dgamma, dbeta = F.batchnormeval_backward(r, x, gamma, mean, std)
    assert_close(dx, fd_grad(loss, x), 1e-6, 1e-6, "dinput")
    assert_close(dgamma, fd_grad(loss, gamma), 1e-6, 1e-6, "dgamma")
    assert_close(dbeta, fd_grad(loss, beta), 1e-6, 1e-6, "dbeta")


def test_batchnormtrain_float16():
    shape = (6, 3, 11)
    x0, x, gamma, beta, mean, std = _te_inputs(shape, "channels_last", np.float16, 221)
    gamma, beta, mean, std = (a.astype(np.float32) for a in (gamma, beta, mean, std))
    dy0, dy = _dy(shape, "channels_last", np.float16, seed=225)
    y = F.batchnormtrain(x, gamma, beta, mean, std)
    assert y.dtype == np.float16
    assert_close_dtype(y, ref_formula(x0, gamma, beta, mean, std), np.float16)
    dx, dgamma, dbeta, dmean, dstd = F.batchnormtrain_backward(dy, x, gamma, mean, std)
    _, tdx, tdg, tdb, tdm, tds = _torch_formula_grads(
        x0.astype(np.float64), *(a.astype(np.float64) for a in (gamma, beta, mean, std)),
        dy0.astype(np.float64), grad_stats=True)
    assert dx.dtype == np.float16
    assert_close_dtype(dx, tdx, np.float16)
    for got, want in [(dgamma, tdg), (dbeta, tdb), (dmean, tdm), (dstd, tds)]:
        assert got.dtype == np.float32
        assert_close(got, want, 1e-5, 1e-5)


# --- the core's fused running update and dweight (what normkit.torch's eager path calls) ---------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_core_forward_updates_strided_running_stats(dtype):
    """batch_norm_forward_train's running_mean/running_var: views with stride 2 into larger
    buffers are updated as torch's formula says (momentum, unbiased variance) and nothing else of
    the buffers is written; var may be None."""
    from normkit import _C
    C = 5
    x0 = randn((4, C, 3, 2), 201, dtype, offset=0.6, scale=1.7)
    w, b = params(C, 202, dtype)
    rm0, rv0 = running(2 * C, 203, dtype)
    rm_buf, rv_buf = rm0.copy(), rv0.copy()
    y, mean, invstd = np.empty_like(x0), np.empty(C, dtype), np.empty(C, dtype)
    _C.batch_norm_forward_train(x0, w, b, 1e-5, y, mean, None, invstd, rm_buf[::2], rv_buf[::2],
                                0.3)
    ry, rmean, rvar, _ = ref_forward_train(x0, w, b, 1e-5)
    erm, erv = ref_running_update(rm0[::2], rv0[::2], rmean, rvar, count(x0), 0.3)
    assert_close_dtype(y, ry, dtype, "y")
    assert_close_dtype(rm_buf[::2], erm, dtype, "running_mean")
    assert_close_dtype(rv_buf[::2], erv, dtype, "running_var")
    np.testing.assert_array_equal(rm_buf[1::2], rm0[1::2])
    np.testing.assert_array_equal(rv_buf[1::2], rv0[1::2])


def test_core_forward_running_update_edge_cases():
    """An empty batch leaves the running statistics alone; one value per channel cannot update
    running_var (its unbiased variance divides by count - 1), but may update running_mean."""
    from normkit import _C
    C = 3
    rm0, rv0 = running(C, 211)
    x = np.empty((0, C, 4))
    rm, rv = rm0.copy(), rv0.copy()
    _C.batch_norm_forward_train(x, None, None, 1e-5, np.empty_like(x), np.empty(C), None,
                                np.empty(C), rm, rv, 0.5)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    x = randn((1, C), 212, np.float64)
    with pytest.raises(ValueError, match="running_var needs more than 1 value per channel"):
        _C.batch_norm_forward_train(x, None, None, 1e-5, np.empty_like(x), np.empty(C), None,
                                    np.empty(C), rm, rv, 0.5)
    np.testing.assert_array_equal(rv, rv0)
    _C.batch_norm_forward_train(x, None, None, 1e-5, np.empty_like(x), np.empty(C), None,
                                np.empty(C), rm, None, 0.5)
    np.testing.assert_allclose(rm, 0.5 * rm0 + 0.5 * x[0], rtol=1e-15)
    with pytest.raises(TypeError, match="running_mean must be float64"):
        _C.batch_norm_forward_train(x, None, None, 1e-5, np.empty_like(x), np.empty(C), None,
                                    np.empty(C), rm.astype(np.float32), None, 0.5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_core_backward_writes_dweight(layout):
    """batch_norm_backward_train's dweight is sum_dy_xmu * invstd, with sum_dy_xmu given or not
    (then dx is computed from dweight), and matches the float64 reference; without either it is
    an error."""
    from normkit import _C
    C = 4
    x0 = make_layout(randn((3, C, 5, 2), 221, np.float32, offset=0.3), layout)
    dy0 = make_layout(randn((3, C, 5, 2), 222, np.float32), layout)
    w, _ = params(C, 223, np.float32)
    _, mean, _, invstd = ref_forward_train(x0, w, None, 1e-5)
    mean, invstd = mean.astype(np.float32), invstd.astype(np.float32)
    outs = []
    for keep_xmu in (True, False):
        dx, s1, dw = np.empty_like(x0), np.empty(C, np.float32), np.empty(C, np.float32)
        s2 = np.empty(C, np.float32) if keep_xmu else None
        _C.batch_norm_backward_train(dy0, x0, mean, invstd, w, dx, s1, s2, dw)
        outs.append((dx, s1, dw))
        if keep_xmu:
            assert_close(dw, s2 * invstd, 1e-6, 1e-6)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-5)
    for dx, s1, dw in outs:
        assert_close_dtype(dx, rdx, np.float32, "dx")
        assert_close_dtype(dw, rdw, np.float32, "dweight")
        assert_close_dtype(s1, rdb, np.float32, "dbias")
    with pytest.raises(ValueError, match="sum_dy_xmu is required"):
        _C.batch_norm_backward_train(dy0, x0, mean, invstd, w, None, np.empty(C, np.float32),
                                     None)
