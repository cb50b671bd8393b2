"""normkit.nn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: several training steps then
eval, gradients, running statistics, state_dict exchange both ways, dtype/device moves, and the
Module / Sequential plumbing."""
import numpy as np
import pytest
import torch

import normkit
import normkit.nn as nn
from helpers import (
    assert_close,
    assert_close_dtype,
    count,
    make_layout,
    other_layout,
    params,
    randn,
    ref_backward_train,
    ref_forward_eval,
    ref_forward_train,
    ref_running_update,
    ref_stats,
    running,
)

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

# (normkit class, torch class, input shape, layout)
LAYER_CASES = [
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5), "contiguous"),
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5), "fortran"),
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 9), "contiguous"),
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 9), "channels_last"),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 7, 9), "contiguous"),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 7, 9), "channels_last"),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 7, 9), "non_collapsible"),
    (nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 5, 4, 3), "contiguous"),
    (nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 5, 4, 3), "channels_last"),
    (nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 5, 4, 3), "strided"),
]
LAYER_IDS = [f"{nk.__name__}-{'x'.join(map(str, s))}-{lay}" for nk, _, s, lay in LAYER_CASES]


def _torch_sd(module):
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in module.state_dict().items()}


def _pair(nk_cls, t_cls, C, dtype, seed=None, **kwargs):
    """A normkit layer and a torch layer with the same (random, if seed) parameters and stats."""
    layer = nk_cls(C, dtype=dtype, **kwargs)
    ref = t_cls(C, dtype=TORCH_DTYPES[np.dtype(dtype)], **kwargs)
    if seed is not None:
        sd = {}
        if layer.affine:
            sd["weight"], sd["bias"] = params(C, seed, dtype)
        if layer.track_running_stats:
            sd["running_mean"], sd["running_var"] = running(C, seed + 1, dtype)
            sd["num_batches_tracked"] = np.array(0, np.int64)
        layer.load_state_dict(sd)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return layer, ref


def _step(layer, ref, x0, layout, dy0, dtype, what):
    """One forward/backward of both layers; compares output, dx and accumulated grads."""
    x = make_layout(x0, layout)
    dy = make_layout(dy0, other_layout(layout, x0.ndim))
    tx = torch.from_numpy(x0.copy()).requires_grad_(True)
    y = layer(x)
    ty = ref(tx)
    assert y.shape == x0.shape and y.dtype == dtype
    assert_close_dtype(y, ty.detach().numpy(), dtype, f"{what}: y")
    dx = layer.backward(dy)
    ty.backward(torch.from_numpy(dy0.copy()))
    assert dx.shape == x0.shape and dx.dtype == dtype
    assert_close_dtype(dx, tx.grad.numpy(), dtype, f"{what}: dx")
    if ref.affine:
        assert_close_dtype(layer.weight.grad, ref.weight.grad.numpy(), dtype,
                           f"{what}: weight.grad")
        assert_close_dtype(layer.bias.grad, ref.bias.grad.numpy(), dtype, f"{what}: bias.grad")
    return y, dx


def _compare_buffers(layer, ref, dtype, what):
    if ref.track_running_stats:
        assert_close_dtype(layer.running_mean, ref.running_mean.numpy(), dtype,
                           f"{what}: running_mean")
        assert_close_dtype(layer.running_var, ref.running_var.numpy(), dtype,
                           f"{what}: running_var")
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked), what
        assert layer.num_batches_tracked.dtype == np.int64
        assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
    else:
        assert layer.running_mean is None and layer.running_var is None
        assert layer.num_batches_tracked is None


def _sgd(layer, ref, lr=0.2):
    with torch.no_grad():
        for p, tp in zip(layer.parameters(), ref.parameters()):
            p.data -= lr * p.grad
            tp -= lr * tp.grad


CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "momentum_0.37": {"momentum": 0.37, "eps": 1e-3},
    "no_running_stats": {"track_running_stats": False},
    "no_affine": {"affine": False},
    "no_affine_no_stats": {"affine": False, "track_running_stats": False},
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("nk_cls,t_cls,shape,layout", LAYER_CASES, ids=LAYER_IDS)
def test_layer_training_then_eval_matches_torch(nk_cls, t_cls, shape, layout, config, dtype):
    kwargs = CONFIGS[config]
    C = shape[1]
    layer, ref = _pair(nk_cls, t_cls, C, dtype, seed=301, **kwargs)
    assert layer.training and ref.training

    for step in range(3):
        x0 = randn(shape, 310 + step, dtype, offset=0.5 * step - 0.3, scale=1.0 + 0.4 * step)
        dy0 = randn(shape, 320 + step, dtype, offset=0.1)
        _step(layer, ref, x0, layout, dy0, dtype, f"train step {step}")
        _compare_buffers(layer, ref, dtype, f"after train step {step}")
        if layer.affine:
            _sgd(layer, ref)
            assert_close_dtype(layer.weight.data, ref.weight.detach().numpy(), dtype)
        if step == 1:  # gradients accumulate (as in torch) until zeroed
            layer.zero_grad()
            ref.zero_grad(set_to_none=True)
            if layer.affine:
                assert layer.weight.grad is None and layer.bias.grad is None

    layer.eval()
    ref.eval()
    assert not layer.training
    for step in range(2):
        x0 = randn(shape, 330 + step, dtype, offset=0.2, scale=1.7)
        dy0 = randn(shape, 340 + step, dtype, offset=-0.3)
        _step(layer, ref, x0, layout, dy0, dtype, f"eval step {step}")
        _compare_buffers(layer, ref, dtype, f"after eval step {step}")


@pytest.mark.parametrize("nk_cls,t_cls,shape,layout", LAYER_CASES[::2], ids=LAYER_IDS[::2])
def test_layer_against_numpy_reference(nk_cls, t_cls, shape, layout, dtype):
    """Independent of torch: two training steps with momentum=None (cumulative average) and one
    eval step, against the float64 formulas."""
    C = shape[1]
    layer = nk_cls(C, momentum=None, eps=1e-4, dtype=dtype)
    w, b = params(C, 351, dtype)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    xs = [randn(shape, 352 + i, dtype, offset=1.0 - i, scale=0.8 + i) for i in range(2)]
    rm, rv = np.zeros(C), np.ones(C)
    for i, x0 in enumerate(xs):
        dy0 = randn(shape, 360 + i, dtype)
        y = layer(make_layout(x0, layout))
        ry, mean, var, _ = ref_forward_train(x0, w, b, 1e-4)
        assert_close_dtype(y, ry, dtype)
        rm, rv = ref_running_update(rm, rv, mean, var, count(x0), 1.0 / (i + 1))
        assert_close_dtype(layer.running_mean, rm, dtype)
        assert_close_dtype(layer.running_var, rv, dtype)
        dx = layer.backward(make_layout(dy0, other_layout(layout, len(shape))))
        rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-4)
        assert_close_dtype(dx, rdx, dtype)
        assert_close_dtype(layer.weight.grad, rdw, dtype)
        assert_close_dtype(layer.bias.grad, rdb, dtype)
        layer.zero_grad()
    # cumulative average of two batches: the plain mean of their statistics
    m0, m1 = ref_stats(xs[0])[0], ref_stats(xs[1])[0]
    assert_close_dtype(layer.running_mean, (m0 + m1) / 2, dtype)
    assert int(layer.num_batches_tracked) == 2

    layer.eval()
    x0 = randn(shape, 370, dtype, offset=0.4)
    y = layer(make_layout(x0, layout))
    assert_close_dtype(y, ref_forward_eval(x0, w, b, rm, rv, 1e-4), dtype)


@pytest.mark.parametrize("nk_cls,t_cls,shape,layout", LAYER_CASES[::3], ids=LAYER_IDS[::3])
def test_layer_float16_input(nk_cls, t_cls, shape, layout):
    """float16 inputs run with float32 parameters and buffers; gradients are float32."""
    C = shape[1]
    layer = nk_cls(C)
    w, b = params(C, 381, np.float32)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    x0 = randn(shape, 382, np.float16, offset=0.6, scale=1.4)
    dy0 = randn(shape, 383, np.float16)
    y = layer(make_layout(x0, layout))
    assert y.dtype == np.float16
    ry, mean, var, _ = ref_forward_train(x0, w, b, 1e-5)
    assert_close_dtype(y, ry, np.float16)
    rm, rv = ref_running_update(np.zeros(C), np.ones(C), mean, var, count(x0), 0.1)
    assert layer.running_mean.dtype == np.float32
    assert_close(layer.running_mean, rm, 1e-5, 1e-5)
    assert_close(layer.running_var, rv, 1e-5, 1e-5)
    dx = layer.backward(make_layout(dy0, other_layout(layout, len(shape))))
    assert dx.dtype == np.float16
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, 1e-5)
    assert_close_dtype(dx, rdx, np.float16)
    assert layer.weight.grad.dtype == np.float32
    assert_close(layer.weight.grad, rdw, 1e-5, 1e-5)
    assert_close(layer.bias.grad, rdb, 1e-5, 1e-5)
    layer.eval()
    y = layer(make_layout(x0, layout))
    assert_close_dtype(y, ref_forward_eval(x0, w, b, rm, rv, 1e-5), np.float16)


def test_gradients_accumulate_across_backward_calls(dtype):
    layer = nn.BatchNorm2d(3, dtype=dtype)
    x0 = randn((2, 3, 5, 7), 391, dtype, offset=0.3)
    dy1 = randn((2, 3, 5, 7), 392, dtype)
    dy2 = randn((2, 3, 5, 7), 393, dtype, offset=0.5)
    layer(x0)
    layer.backward(dy1)
    g1w, g1b = layer.weight.grad.copy(), layer.bias.grad.copy()
    layer(x0)
    layer.backward(dy2)
    _, w2, b2 = ref_backward_train(dy2, x0, np.ones(3), 1e-5)
    assert_close_dtype(layer.weight.grad, g1w + w2, dtype)
    assert_close_dtype(layer.bias.grad, g1b + b2, dtype)
    layer.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(layer.weight.grad, np.zeros(3))
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_defaults_match_torch():
    layer = nn.BatchNorm2d(5)
    ref = torch.nn.BatchNorm2d(5)
    assert layer.eps == ref.eps and layer.momentum == ref.momentum
    assert layer.affine and layer.track_running_stats and layer.training
    sd, tsd = layer.state_dict(), ref.state_dict()
    assert list(sd) == list(tsd)
    for k in sd:
        np.testing.assert_array_equal(sd[k], tsd[k].numpy(), err_msg=k)
        assert np.asarray(sd[k]).dtype == tsd[k].numpy().dtype, k
    assert layer.weight.dtype == np.float32


# --------------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "no_affine", "no_stats"])
@pytest.mark.parametrize("nk_cls,t_cls", [(nn.BatchNorm1d, torch.nn.BatchNorm1d),
                                          (nn.BatchNorm2d, torch.nn.BatchNorm2d),
                                          (nn.BatchNorm3d, torch.nn.BatchNorm3d)])
def test_state_dict_round_trips_with_torch(nk_cls, t_cls, kwargs):
    C = 5
    shape = {nn.BatchNorm1d: (6, C), nn.BatchNorm2d: (3, C, 4, 3),
             nn.BatchNorm3d: (2, C, 3, 2, 3)}[nk_cls]
    # a trained normkit layer ...
    layer = nk_cls(C, **kwargs)
    if layer.affine:
        w, b = params(C, 401, np.float32)
        layer.weight.data[...] = w
        layer.bias.data[...] = b
    for i in range(3):
        layer(randn(shape, 402 + i, np.float32, offset=1.5, scale=2.0))
    sd = layer.state_dict()
    expected = ((["weight", "bias"] if layer.affine else [])
                + (["running_mean", "running_var", "num_batches_tracked"]
                   if layer.track_running_stats else []))
    assert list(sd) == expected
    # ... loads into torch: same keys, same values
    ref = t_cls(C, **kwargs)
    assert list(ref.state_dict()) == expected
    ref.load_state_dict(_torch_sd(layer))
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
    if layer.track_running_stats:
        assert int(ref.num_batches_tracked) == 3
    # both then compute the same thing
    layer.eval()
    ref.eval()
    x0 = randn(shape, 410, np.float32, offset=1.0)
    assert_close_dtype(layer(x0), ref(torch.from_numpy(x0)).detach().numpy(), np.float32)

    # torch -> normkit, from torch tensors directly
    ref2 = t_cls(C, **kwargs)
    with torch.no_grad():
        if ref2.affine:
            ref2.weight.copy_(torch.from_numpy(params(C, 411, np.float32)[0]))
            ref2.bias.copy_(torch.from_numpy(params(C, 411, np.float32)[1]))
    for i in range(2):
        ref2(torch.from_numpy(randn(shape, 412 + i, np.float32, offset=-1.0)))
    fresh = nk_cls(C, **kwargs)
    missing, unexpected = fresh.load_state_dict(ref2.state_dict())
    assert missing == [] and unexpected == []
    for k, v in ref2.state_dict().items():
        got = fresh.state_dict()[k]
        assert isinstance(got, np.ndarray), k
        np.testing.assert_array_equal(got, v.numpy(), err_msg=k)
        assert got.dtype == v.numpy().dtype, k
    if fresh.track_running_stats:
        assert int(fresh.num_batches_tracked) == 2


def test_state_dict_values_are_the_layer_arrays():
    layer = nn.BatchNorm2d(3)
    sd = layer.state_dict()
    assert sd["weight"] is layer.weight.data
    assert sd["running_mean"] is layer.running_mean
    layer(randn((2, 3, 3, 5), 421, np.float32, offset=2.0))
    np.testing.assert_array_equal(sd["running_mean"], layer.running_mean)
    assert not np.allclose(sd["running_mean"], 0)


def test_loading_copies_in_place_and_casts():
    layer = nn.BatchNorm2d(3)
    w_before = layer.weight.data
    rm_before = layer.running_mean
    sd = {"weight": np.array([1.5, -2.0, 0.25]), "bias": np.array([0.1, 0.2, -0.3]),
          "running_mean": np.array([0.5, 0.75, -1.0]), "running_var": np.array([2.0, 3.0, 0.5]),
          "num_batches_tracked": np.array(7)}
    layer.load_state_dict(sd)
    assert layer.weight.data is w_before and layer.running_mean is rm_before
    assert layer.weight.dtype == np.float32 and layer.running_mean.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.data, np.float32([1.5, -2.0, 0.25]))
    np.testing.assert_array_equal(layer.running_var, np.float32([2.0, 3.0, 0.5]))
    assert int(layer.num_batches_tracked) == 7
    sd["weight"][0] = 99.0  # the layer holds copies, not the given arrays
    assert layer.weight.data[0] == np.float32(1.5)


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_old_checkpoint_without_num_batches_tracked_loads_as_zero(source):
    """LAYERS.md: loading a dict without num_batches_tracked sets it to 0. (torch 2.13 instead
    keeps the module's current count for such dicts; the spec, not torch, is the reference here,
    so the layer has trained first to make the difference visible.)"""
    layer = nn.BatchNorm2d(3)
    for i in range(2):
        layer(randn((2, 3, 3, 5), 431 + i, np.float32))
    assert int(layer.num_batches_tracked) == 2
    old = {"weight": np.float32([1.5, 0.5, 2.0]), "bias": np.float32([0.1, -0.2, 0.3]),
           "running_mean": np.float32([0.3, -0.4, 0.5]), "running_var": np.float32([1.2, 0.8, 1.7])}
    if source == "torch":
        old = {k: torch.from_numpy(v) for k, v in old.items()}
    missing, unexpected = layer.load_state_dict(old)
    assert missing == [] and unexpected == []
    assert int(layer.num_batches_tracked) == 0
    assert layer.num_batches_tracked.dtype == np.int64
    np.testing.assert_array_equal(layer.running_var, np.float32([1.2, 0.8, 1.7]))
    assert "num_batches_tracked" not in old  # the caller's dict is not modified


def test_strict_loading_errors():
    layer = nn.BatchNorm2d(3)
    good = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}

    missing = dict(good)
    del missing["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        layer.load_state_dict(missing)

    extra = dict(good, extra_thing=np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="extra_thing"):
        layer.load_state_dict(extra)

    wrong_shape = dict(good, weight=np.ones(4, np.float32))
    with pytest.raises(RuntimeError, match=r"weight.*\(4,\).*\(3,\)"):
        layer.load_state_dict(wrong_shape)
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict(dict(good, weight=torch.ones(2, 3)))
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict(dict(good, weight=np.ones(4, np.float32)), strict=False)

    # strict=False reports and skips missing/unexpected keys
    layer2 = nn.BatchNorm2d(3)
    partial = {"weight": np.float32([2.0, 3.0, 4.0]), "surprise": np.zeros(1)}
    miss, unexp = layer2.load_state_dict(partial, strict=False)
    assert set(miss) == {"bias", "running_mean", "running_var"}
    assert unexp == ["surprise"]
    np.testing.assert_array_equal(layer2.weight.data, np.float32([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(layer2.bias.data, np.zeros(3))


def test_torch_rejects_mismatched_normkit_state_dict():
    """Sanity check of the reference itself: the shapes normkit produces are torch's shapes."""
    layer = nn.BatchNorm1d(4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        torch.nn.BatchNorm1d(5).load_state_dict(_torch_sd(layer))
    torch.nn.BatchNorm1d(4).load_state_dict(_torch_sd(layer))


# --------------------------------------------------------------------------------------------------
# Module.to, parameters, train/eval, Sequential


def test_to_float64_converts_params_buffers_and_grads():
    layer = nn.BatchNorm2d(3)
    x32 = randn((2, 3, 5, 3), 441, np.float32, offset=0.5)
    layer(x32)
    layer.backward(randn((2, 3, 5, 3), 442, np.float32))
    assert layer.to(dtype=np.float64) is layer
    for p in layer.parameters():
        assert p.data.dtype == np.float64 and p.grad.dtype == np.float64
    assert layer.running_mean.dtype == np.float64 and layer.running_var.dtype == np.float64
    assert layer.num_batches_tracked.dtype == np.int64 and int(layer.num_batches_tracked) == 1
    sd = layer.state_dict()
    assert all(np.asarray(v).dtype == np.float64 for k, v in sd.items()
               if k != "num_batches_tracked")

    ref = torch.nn.BatchNorm2d(3).double()
    ref.load_state_dict(_torch_sd(layer))
    x = randn((2, 3, 5, 3), 443, np.float64, offset=-0.5)
    y = layer(x)
    assert y.dtype == np.float64
    assert_close_dtype(y, ref(torch.from_numpy(x)).detach().numpy(), np.float64)
    assert_close_dtype(layer.running_var, ref.running_var.numpy(), np.float64)
    with pytest.raises(TypeError, match="float32"):
        layer(x32)  # the layer is float64 now

    layer.float()
    assert layer.weight.dtype == np.float32 and layer.running_var.dtype == np.float32
    assert layer.num_batches_tracked.dtype == np.int64
    layer.double()
    assert layer.weight.dtype == np.float64
    with pytest.raises(TypeError, match="floating"):
        layer.to(dtype=np.int32)


def test_to_cpu_keeps_numpy():
    layer = nn.BatchNorm1d(4, dtype=np.float64)
    assert layer.to("cpu") is layer
    assert layer.cpu() is layer
    for _, a in list(layer.state_dict().items()):
        assert isinstance(a, np.ndarray)
    assert layer.weight.dtype == np.float64
    with pytest.raises(ValueError, match="device"):
        layer.to("tpu")


def test_to_cuda_without_gpu_raises():
    if normkit.cuda_available():
        pytest.skip("a GPU is present: to('cuda') is expected to work here")
    layer = nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        layer.to("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        nn.BatchNorm2d(3, device="cuda")
    # the failed move left the layer usable on the CPU
    assert isinstance(layer.weight.data, np.ndarray)
    layer(randn((2, 3, 3, 3), 451, np.float32))


def test_constructor_dtype_and_device():
    layer = nn.BatchNorm3d(4, dtype=np.float64, device="cpu")
    assert layer.weight.dtype == np.float64 and layer.running_var.dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.BatchNorm2d(4, dtype=np.float16)
    with pytest.raises(ValueError, match="num_features"):
        nn.BatchNorm2d(0)


def test_parameters_and_named_parameters():
    layer = nn.BatchNorm2d(3)
    named = list(layer.named_parameters())
    assert [n for n, _ in named] == ["weight", "bias"]
    assert all(isinstance(p, nn.Parameter) for _, p in named)
    assert [p for p in layer.parameters()] == [layer.weight, layer.bias]
    assert [n for n, _ in layer.named_buffers()] == ["running_mean", "running_var",
                                                     "num_batches_tracked"]
    assert list(nn.BatchNorm2d(3, affine=False).parameters()) == []
    assert list(nn.BatchNorm2d(3, track_running_stats=False).buffers()) == []
    noaff = nn.BatchNorm2d(3, affine=False)
    assert noaff.weight is None and noaff.bias is None


def test_train_eval_flags():
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    assert seq.training and all(m.training for m in seq)
    assert seq.eval() is seq
    assert not seq.training and not any(m.training for m in seq)
    seq.train()
    assert seq.training and all(m.training for m in seq)
    seq.train(False)
    assert not seq[1].training


def test_eval_uses_running_stats_and_does_not_update_them():
    layer = nn.BatchNorm2d(3).eval()
    rm, rv = running(3, 461, np.float32)
    layer.running_mean[...] = rm
    layer.running_var[...] = rv
    x0 = randn((3, 3, 5, 7), 462, np.float32, offset=2.0)
    y = layer(x0)
    assert_close_dtype(y, ref_forward_eval(x0, None, None, rm, rv, 1e-5), np.float32)
    np.testing.assert_array_equal(layer.running_mean, rm)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sequential_equals_composition_by_hand(layout, dtype):
    shape = (3, 5, 7, 9)
    a, b = nn.BatchNorm2d(5, dtype=dtype), nn.BatchNorm2d(5, dtype=dtype, momentum=0.25)
    a2, b2 = nn.BatchNorm2d(5, dtype=dtype), nn.BatchNorm2d(5, dtype=dtype, momentum=0.25)
    for m, seed in ((a, 471), (b, 472), (a2, 471), (b2, 472)):
        w, bias = params(5, seed, dtype)
        m.weight.data[...] = w
        m.bias.data[...] = bias
    seq = nn.Sequential(a, b)
    assert len(seq) == 2 and seq[0] is a and seq[1] is b
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    tseq = torch.nn.Sequential(torch.nn.BatchNorm2d(5), torch.nn.BatchNorm2d(5))
    assert list(seq.state_dict()) == list(tseq.state_dict())

    for step in range(2):
        x0 = randn(shape, 480 + step, dtype, offset=0.7)
        dy0 = randn(shape, 490 + step, dtype)
        x, dy = make_layout(x0, layout), make_layout(dy0, other_layout(layout, 4))
        y = seq(x)
        y_hand = b2(a2(x))
        assert_close_dtype(y, y_hand, dtype)
        dx = seq.backward(dy)
        dx_hand = a2.backward(b2.backward(dy))
        assert_close_dtype(dx, dx_hand, dtype)
        for p, q in zip(seq.parameters(), list(a2.parameters()) + list(b2.parameters())):
            assert_close_dtype(p.grad, q.grad, dtype)
    for m, m2 in ((a, a2), (b, b2)):
        assert_close_dtype(m.running_var, m2.running_var, dtype)

    # and the whole Sequential agrees with torch's, through its state_dict
    tseq = tseq.to(TORCH_DTYPES[dtype])
    tseq.load_state_dict(_torch_sd(seq))
    seq.eval()
    tseq.eval()
    x0 = randn(shape, 499, dtype, offset=-0.2)
    assert_close_dtype(seq(x0), tseq(torch.from_numpy(x0)).detach().numpy(), dtype)


def test_layer_repr_names_configuration():
    r = repr(nn.BatchNorm2d(7, eps=1e-3, momentum=None, affine=False))
    assert "BatchNorm2d" in r and "7" in r and "momentum=None" in r and "affine=False" in r
