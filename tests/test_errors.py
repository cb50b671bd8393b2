"""Errors: the right exception type, and a message that names the problem."""
import numpy as np
import pytest

import normkit.functional as F
import normkit.nn as nn
from helpers import channels_last, params, randn, running


def _x(shape=(3, 5, 7, 9), dtype=np.float32, seed=601):
    return randn(shape, seed, dtype, offset=0.4, scale=1.2)


# --------------------------------------------------------------------------------------------------
# Layers: input rank, channels, dtype, kind


@pytest.mark.parametrize("cls,ndim,expected", [
    (nn.BatchNorm1d, 4, "2D or 3D"), (nn.BatchNorm1d, 1, "2D or 3D"), (nn.BatchNorm1d, 5, "2D or 3D"),
    (nn.BatchNorm2d, 3, "4D"), (nn.BatchNorm2d, 5, "4D"), (nn.BatchNorm2d, 2, "4D"),
    (nn.BatchNorm3d, 4, "5D"), (nn.BatchNorm3d, 3, "5D"), (nn.BatchNorm3d, 6, "5D"),
])
def test_layer_wrong_ndim(cls, ndim, expected):
    shape = (3, 4, 5, 3, 2, 3)[:ndim]
    layer = cls(4)
    with pytest.raises(ValueError, match=rf"expected {expected} input \(got {ndim}D input\)"):
        layer(_x(shape))
    if layer.track_running_stats:
        assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (6, 4)), (nn.BatchNorm1d, (3, 4, 5)),
                                       (nn.BatchNorm2d, (3, 4, 5, 3)),
                                       (nn.BatchNorm3d, (2, 4, 3, 2, 3))])
def test_layer_wrong_channel_count(cls, shape):
    layer = cls(5)
    with pytest.raises(ValueError, match=r"BatchNorm\dd\(5\): input has 4 channels"):
        layer(_x(shape))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(5))


def test_layer_dtype_mismatch():
    with pytest.raises(TypeError, match="float64 input needs float64 parameters, this layer's "
                                        "are float32"):
        nn.BatchNorm2d(5)(_x(dtype=np.float64))
    with pytest.raises(TypeError, match="float32"):
        nn.BatchNorm2d(5, dtype=np.float64)(_x(dtype=np.float32))
    # without affine parameters the running statistics carry the dtype
    layer = nn.BatchNorm2d(5, affine=False, dtype=np.float64).eval()
    with pytest.raises(TypeError, match="float64"):
        layer(_x(dtype=np.float32))


@pytest.mark.parametrize("dt", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_layer_rejects_non_float_arrays(dt):
    x = _x().astype(dt)
    with pytest.raises(TypeError, match="dtype"):
        nn.BatchNorm2d(5)(x)
    with pytest.raises(TypeError, match="dtype"):
        nn.BatchNorm2d(5).eval()(x)


@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], 3.0, "x", None],
                         ids=["list", "float", "str", "None"])
def test_layer_rejects_non_arrays(bad):
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        nn.BatchNorm1d(2)(bad)


def test_layer_rejects_torch_tensor_input():
    import torch

    with pytest.raises(TypeError, match="torch.Tensor"):
        nn.BatchNorm1d(2)(torch.ones(3, 2))


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (1, 4)), (nn.BatchNorm1d, (1, 4, 1)),
                                       (nn.BatchNorm2d, (1, 4, 1, 1)),
                                       (nn.BatchNorm3d, (1, 4, 1, 1, 1))])
def test_one_value_per_channel_in_training(cls, shape):
    layer = cls(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(_x(shape))
    np.testing.assert_array_equal(layer.running_var, np.ones(4))  # stats untouched
    # track_running_stats=False uses batch statistics in eval too: same error, as in torch
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cls(4, track_running_stats=False).eval()(_x(shape))
    # eval with running statistics normalizes a single value fine
    y = cls(4).eval()(_x(shape))
    assert y.shape == shape


def test_functional_one_value_per_channel_and_empty_batch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(_x((1, 5)), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(_x((1, 5, 1, 1)), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(np.empty((0, 5, 3, 3), np.float32), training=True)


# --------------------------------------------------------------------------------------------------
# Layer backward


def test_backward_before_forward_and_twice():
    layer = nn.BatchNorm2d(5)
    x = _x()
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(x)
    layer(x)
    layer.backward(x)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(x)
    layer.eval()(x)
    layer.backward(x)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(x)


def test_layer_backward_wrong_dy_shape():
    layer = nn.BatchNorm2d(5)
    x = _x()
    layer(x)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 5, 6, 9\).*\(3, 5, 7, 9\)"):
        layer.backward(x[:, :, :6])
    with pytest.raises(ValueError, match="dy has shape"):
        layer.backward(x[0])
    # the failed backward kept what the real one needs
    dx = layer.backward(x)
    assert dx.shape == x.shape


def test_layer_backward_non_array_dy():
    layer = nn.BatchNorm1d(2)
    layer(_x((4, 2)))
    with pytest.raises(TypeError, match="dy must be a NumPy or CuPy array"):
        layer.backward([[1.0, 2.0]] * 4)


def test_layer_backward_dy_dtype_mismatch():
    """dy must have the input's dtype, as x, y, dy and dx do in the core (a TypeError there);
    it must not depend on dy's strides whether that is checked or silently cast."""
    layer = nn.BatchNorm2d(5)
    x = _x()
    layer(x)
    with pytest.raises(TypeError, match="dtype"):
        layer.backward(x.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# Functional ops


def test_read_only_out_is_rejected():
    x = _x()
    mean, var = F.batch_norm_stats(x)
    out = np.empty_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        F.batch_norm_normalize(x, mean, var, out=out)
    with pytest.raises(ValueError, match="read-only"):
        F.batch_norm_backward_elemt(x, x, mean, var, out=out)


def test_out_of_wrong_shape_dtype_or_strides():
    x = _x()
    mean, var = F.batch_norm_stats(x)
    with pytest.raises(ValueError, match=r"y has shape \(3, 5, 7, 8\) but x has shape \(3, 5, 7, 9\)"):
        F.batch_norm_normalize(x, mean, var, out=np.empty((3, 5, 7, 8), np.float32))
    with pytest.raises(TypeError, match="y has dtype float64 but x has float32"):
        F.batch_norm_normalize(x, mean, var, out=np.empty(x.shape, np.float64))
    bad = np.empty((3, 5, 14, 27), np.float32)[:, :, ::2, ::3]
    with pytest.raises(ValueError, match="cannot be flattened"):
        F.batch_norm_normalize(x, mean, var, out=bad)


@pytest.mark.parametrize("op", ["backward", "backward_reduce", "backward_elemt",
                                "batchnormtrain_backward", "batchnormeval_backward"])
def test_dy_shape_mismatch(op):
    x = _x()
    w, _ = params(5, 602, np.float32)
    mean, var = F.batch_norm_stats(x)
    invstd = 1 / np.sqrt(var + 1e-5)
    dy = x[:, :, :6]
    call = {
        "backward": lambda: F.batch_norm_backward(dy, x, mean, invstd, w),
        "backward_reduce": lambda: F.batch_norm_backward_reduce(dy, x, mean),
        "backward_elemt": lambda: F.batch_norm_backward_elemt(dy, x, mean, invstd, w),
        "batchnormtrain_backward": lambda: F.batchnormtrain_backward(dy, x, w, mean, var + 1),
        "batchnormeval_backward": lambda: F.batchnormeval_backward(dy, x, w, mean, var + 1),
    }[op]
    with pytest.raises(ValueError, match=r"dy has shape \(3, 5, 6, 9\) but x has shape \(3, 5, 7, 9\)"):
        call()


@pytest.mark.parametrize("op", ["backward", "backward_reduce", "backward_elemt"])
def test_dy_dtype_mismatch(op):
    """x, y, dy and dx share one dtype (include/normkit/batchnorm.h): float64 dy with float32 x
    is a TypeError, whatever dy's strides (see the next test)."""
    x = channels_last(_x())
    mean, var = F.batch_norm_stats(x)
    invstd = 1 / np.sqrt(var + 1e-5)
    dy = _x(seed=603, dtype=np.float64)
    call = {
        "backward": lambda: F.batch_norm_backward(dy, x, mean, invstd),
        "backward_reduce": lambda: F.batch_norm_backward_reduce(dy, x, mean),
        "backward_elemt": lambda: F.batch_norm_backward_elemt(dy, x, mean, invstd),
    }[op]
    with pytest.raises(TypeError, match="dy has dtype float64 but x has float32"):
        call()


def test_dy_dtype_mismatch_same_strides_is_type_error():
    """The companion of test_dy_dtype_mismatch: here dy's byte strides happen to equal x's (x is a
    float32 slice with 8-byte steps), so no copy hides the mismatch and the core's check fires."""
    x = np.ascontiguousarray(_x((3, 5, 7, 18)))[..., ::2]
    dy = _x((3, 5, 7, 9), dtype=np.float64, seed=604)
    assert x.strides == dy.strides
    mean, var = F.batch_norm_stats(x)
    with pytest.raises(TypeError, match="dy has dtype float64 but x has float32"):
        F.batch_norm_backward_reduce(dy, x, mean)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_parameter_wrong_shape_or_dtype(which):
    x = _x()
    good = np.ones(5, np.float32)

    def run(p):
        kw = {"weight": good, "bias": good}
        kw[which] = p
        return F.batch_norm_forward(x, kw["weight"], kw["bias"], training=True)

    with pytest.raises(ValueError, match=rf"{which} must have shape \(5,\) to match the 5 channels of x, got \(4,\)"):
        run(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=rf"{which} must have shape \(5,\).*got \(5, 1\)"):
        run(np.ones((5, 1), np.float32))
    with pytest.raises(TypeError, match=rf"{which} must be float32 for float32 input, got float64"):
        run(np.ones(5, np.float64))
    with pytest.raises(TypeError, match=rf"{which} must be an array"):
        run([1.0] * 5)
    # eval goes through batch_norm_normalize: the same checks
    rm, rv = running(5, 605, np.float32)
    kw = {"weight": good, "bias": good, which: np.ones(4, np.float32)}
    with pytest.raises(ValueError, match=rf"{which} must have shape \(5,\)"):
        F.batch_norm_forward(x, kw["weight"], kw["bias"], rm, rv, training=False)


def test_float16_input_needs_float32_parameters():
    x = _x(dtype=np.float16)
    with pytest.raises(TypeError, match="weight must be float32 for float16 input, got float16"):
        F.batch_norm_forward(x, np.ones(5, np.float16), np.zeros(5, np.float32))


def test_functional_backward_weight_checks():
    x = _x()
    mean, var = F.batch_norm_stats(x)
    invstd = 1 / np.sqrt(var + 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        F.batch_norm_backward(x, x, mean, invstd, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="weight must be float32"):
        F.batch_norm_backward(x, x, mean, invstd, np.ones(5, np.float64), training=False)
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)"):
        F.batch_norm_backward(x, x, mean[:4], invstd)
    with pytest.raises(TypeError, match="invstd must be float32"):
        F.batch_norm_backward(x, x, mean, invstd.astype(np.float64))
    with pytest.raises(ValueError, match=r"gamma|weight"):
        F.batchnormtrain_backward(x, x, np.ones(4, np.float32), mean, var + 1)


def test_normalize_statistics_checks():
    x = _x()
    mean, var = F.batch_norm_stats(x)
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\).*got \(\)"):
        F.batch_norm_normalize(x, np.array(0, np.float32), var)
    with pytest.raises(TypeError, match="mean must be float32 for float32 input, got float64"):
        F.batch_norm_normalize(x, mean.astype(np.float64), var)
    with pytest.raises(ValueError, match=r"invstd must have shape \(5,\)"):
        F.batch_norm_normalize(x, mean, var[:3])


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        F.batch_norm_forward(_x(), training=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_wrong_dtype(training):
    """Running statistics are statistics: float32 for float32 input. Eval (through
    batch_norm_normalize) rejects float64 ones; training must too, not update them silently."""
    x = _x()
    rm, rv = running(5, 606, np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(TypeError, match="running_mean|mean must be float32"):
        F.batch_norm_forward(x, None, None, rm, rv, training=training)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_wrong_shape(training):
    """A wrong-shape running_mean is a ValueError naming it, raised before anything is
    modified."""
    x = _x()
    rm, rv = running(4, 607, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)|running_mean"):
        F.batch_norm_forward(x, None, None, rm, rv, training=training)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_backward_elemt_count_and_sums_checks():
    x = _x()
    mean, var = F.batch_norm_stats(x)
    s1, s2 = F.batch_norm_backward_reduce(x, x, mean)
    with pytest.raises(ValueError, match=r"count \(10\) is smaller than the 189 values per channel"):
        F.batch_norm_backward_elemt(x, x, mean, var, None, s1, s2, count=10)
    with pytest.raises(ValueError, match="pass both sum_dy and sum_dy_xmu"):
        F.batch_norm_backward_elemt(x, x, mean, var, None, s1, None)


@pytest.mark.parametrize("op", ["stats", "forward", "normalize", "backward_reduce"])
@pytest.mark.parametrize("shape", [(5,), ()], ids=["1d", "0d"])
def test_functional_input_needs_a_channel_dim(op, shape):
    """An input without a channel dim is a ValueError saying the shape must be (N, C, ...)
    (the core's check), not an IndexError from the Python wrapper."""
    x = np.full(shape, 1.5, np.float32)
    m = np.zeros(5, np.float32)
    call = {
        "stats": lambda: F.batch_norm_stats(x),
        "forward": lambda: F.batch_norm_forward(x),
        "normalize": lambda: F.batch_norm_normalize(x, m, m),
        "backward_reduce": lambda: F.batch_norm_backward_reduce(x, x, m),
    }[op]
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        call()


def test_functional_non_arrays_and_integer_arrays():
    x = _x()
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array, got builtins.list"):
        F.batch_norm_stats(x.tolist())
    with pytest.raises(TypeError, match="buffer format 'i'"):
        F.batch_norm_stats(x.astype(np.int32))
    with pytest.raises(TypeError, match="dtype"):
        F.batch_norm_forward(x.astype(np.int64))
    with pytest.raises(TypeError, match="dy must be a NumPy or CuPy array"):
        F.batch_norm_backward_reduce(x.tolist(), x, np.zeros(5, np.float32))


def test_too_many_dims_and_negative_eps():
    with pytest.raises(ValueError, match="at most 8"):
        F.batch_norm_stats(np.ones((2,) * 9, np.float32))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        F.batch_norm_forward(_x(), eps=-1.0)
