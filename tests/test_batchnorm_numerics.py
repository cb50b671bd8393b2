"""Numerical robustness: float32 data whose mean is far larger than its spread (|mean| = 1e4,
std 1) keeps its batch variance, in every layout, through batch_norm_stats, batch_norm_forward and
the layers' running_var; outputs and gradients stay close to float64."""
import numpy as np
import pytest

import normkit.functional as F
import normkit.nn as nn
from helpers import (
    assert_close,
    axes,
    count,
    make_layout,
    other_layout,
    params,
    randn,
    ref_backward_train,
    ref_forward_train,
    ref_stats,
)

OFFSET = 1e4

CASES = [
    ((16, 3, 31, 33), "contiguous"),
    ((16, 3, 31, 33), "channels_last"),
    ((16, 3, 31, 33), "strided"),
    ((16, 3, 31, 33), "non_collapsible"),
    ((4, 3, 5, 17, 19), "contiguous"),
    ((4, 3, 5, 17, 19), "channels_last"),
    ((7, 3, 1001), "contiguous"),
    ((7, 3, 1001), "channels_last"),
    ((4001, 3), "contiguous"),
    ((4001, 3), "fortran"),
]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]


def _large_mean_input(shape, seed, sign=1.0):
    """|mean| = 1e4 plus per-channel offsets of a few units, std about 1, stored in float32."""
    g = np.random.default_rng(seed)
    C = shape[1]
    ch = g.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    spread = g.uniform(0.7, 1.3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    return (sign * OFFSET + ch + spread * g.standard_normal(shape)).astype(np.float32)


def test_the_data_defeats_a_naive_float32_variance():
    """The test data is hard: E[x^2] - E[x]^2 in float32 gets its variance wrong by far more than
    the 1e-3 the tests demand."""
    x = _large_mean_input((16, 3, 31, 33), 500)
    naive = ((x * x).mean(axis=axes(x), dtype=np.float32)
             - x.mean(axis=axes(x), dtype=np.float32) ** 2)
    _, var = ref_stats(x)
    assert np.max(np.abs(naive / var - 1)) > 1e-1


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus", "minus"])
@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_stats_keep_variance_with_large_mean(shape, layout, sign):
    x0 = _large_mean_input(shape, 501, sign)
    x = make_layout(x0, layout)
    mean, var = F.batch_norm_stats(x)
    rmean, rvar = ref_stats(x0)  # float64 on the same float32 values
    assert np.max(np.abs(var / rvar - 1)) < 1e-3, (var, rvar)
    assert np.max(np.abs(mean / rmean - 1)) < 1e-6, (mean, rmean)


@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_forward_and_backward_with_large_mean(shape, layout):
    x0 = _large_mean_input(shape, 502)
    x = make_layout(x0, layout)
    C = shape[1]
    w, b = params(C, 503, np.float32)
    dy0 = randn(shape, 504, np.float32, offset=0.3)
    dy = make_layout(dy0, other_layout(layout, len(shape)))

    y, mean, invstd = F.batch_norm_forward(x, w, b, training=True, eps=1e-5)
    ry, rmean, rvar, rinvstd = ref_forward_train(x0, w, b, 1e-5)
    assert np.max(np.abs(invstd / rinvstd - 1)) < 5e-4  # variance to 1e-3 -> invstd to 5e-4
    assert np.max(np.abs(mean / rmean - 1)) < 1e-6
    # y is O(1); storing the mean in float32 at 1e4 costs up to half an ulp (~5e-4) of x - mean
    assert np.max(np.abs(y - ry)) < 3e-3

    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-5)
    assert np.max(np.abs(dx - rdx)) < 3e-3 * np.max(np.abs(rdx))
    xhat_abs = np.abs((x0.astype(np.float64) - rmean.reshape((1, C) + (1,) * (len(shape) - 2)))
                      * rinvstd.reshape((1, C) + (1,) * (len(shape) - 2)))
    # a sum's natural error scale is the sum of its terms' magnitudes
    assert np.all(np.abs(dw - rdw) < 1e-3 * (np.abs(dy0) * xhat_abs).sum(axis=axes(x0)))
    assert_close(db, rdb, 1e-5, 1e-5)


@pytest.mark.parametrize("momentum", [1.0, 0.1])
@pytest.mark.parametrize("shape,layout", CASES, ids=IDS)
def test_layer_running_var_with_large_mean(shape, layout, momentum):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    x0 = _large_mean_input(shape, 505)
    layer = cls(shape[1], momentum=momentum)
    y = layer(make_layout(x0, layout))
    rmean, rvar = ref_stats(x0)
    n = count(x0)
    unbiased = rvar * n / (n - 1)
    expected_var = (1 - momentum) * 1.0 + momentum * unbiased
    expected_mean = momentum * rmean
    # with momentum 1 the running variance IS the unbiased batch variance
    assert np.max(np.abs(layer.running_var / expected_var - 1)) < 1e-3 * momentum + 1e-6
    assert np.max(np.abs(layer.running_mean / expected_mean - 1)) < 1e-6
    assert np.max(np.abs(y - ref_forward_train(x0, None, None, 1e-5)[0])) < 3e-3


def test_float64_with_huge_mean():
    """float64 data at 1e8 with std 1: the variance is exact to ~1e-7 (the data's own rounding
    is 1.5e-8)."""
    g = np.random.default_rng(506)
    x0 = 1e8 + g.standard_normal((6, 3, 17, 19))
    for layout in ("contiguous", "channels_last", "strided"):
        mean, var = F.batch_norm_stats(make_layout(x0, layout))
        rmean, rvar = ref_stats(x0)
        assert np.max(np.abs(var / rvar - 1)) < 1e-7, layout
        np.testing.assert_allclose(mean, rmean, rtol=1e-15)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_near_its_range_keeps_statistics(layout):
    """float16 values near 1000 (ulp 0.5..1) with spread ~20: float32 statistics from exact
    float16 values match float64."""
    g = np.random.default_rng(507)
    x0 = (1000 + 20 * g.standard_normal((8, 3, 15, 17))).astype(np.float16)
    mean, var = F.batch_norm_stats(make_layout(x0, layout))
    rmean, rvar = ref_stats(x0)
    assert np.max(np.abs(var / rvar - 1)) < 1e-4
    assert np.max(np.abs(mean / rmean - 1)) < 1e-6


@pytest.mark.parametrize("shape,layout", [((2001, 3), "fortran"), ((2001, 3), "contiguous"),
                                          ((16, 3, 31, 33), "contiguous"),
                                          ((16, 3, 31, 33), "channels_last")],
                         ids=["2001x3-fortran", "2001x3-contiguous", "4d-contiguous",
                              "4d-channels_last"])
def test_variance_exact_when_first_value_is_an_outlier(shape, layout):
    """Large-mean float32 data whose very first value per channel is an outlier 300 units above
    the bulk. The variance is still well conditioned (std ~ 1.5 .. 7 with the outlier in it), so
    the 1e-3 bound of the large-mean tests applies; torch's float32 Welford reduction gets it to
    1e-7. A shifted one-pass sum that shifts by that first value loses digits here."""
    x0 = _large_mean_input(shape, 508)
    x0[(0, slice(None)) + (0,) * (len(shape) - 2)] = OFFSET + 300
    mean, var = F.batch_norm_stats(make_layout(x0, layout))
    rmean, rvar = ref_stats(x0)
    assert np.max(np.abs(var / rvar - 1)) < 1e-3, (var, rvar)
