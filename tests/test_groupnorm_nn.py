"""normkit.nn's per-sample statistics layers (InstanceNorm1d/2d/3d, GroupNorm,
InstanceBatchNorm2d) and the keyword-only bias= of the batch-norm layers, against torch's modules:
training steps then eval, gradients, running statistics, unbatched input, layouts, state_dict
exchange both ways, and bad input."""
import numpy as np
import pytest
import torch

import normkit.nn as nn
from helpers import assert_close_dtype, make_layout, params, randn, running

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _torch_sd(module):
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in module.state_dict().items()}


def _same_layout(a, b):
    return all(sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides) if n > 1)


def _compare_step(layer, ref, x0, dy0, dtype, what, layout="contiguous"):
    x = make_layout(x0, layout) if x0.ndim > 2 or layout != "channels_last" else x0
    tx = torch.from_numpy(x0.copy()).requires_grad_(True)
    y = layer(x)
    ty = ref(tx)
    assert y.dtype == dtype and y.shape == x0.shape
    assert _same_layout(y, x), f"{what}: output layout"
    assert_close_dtype(y, ty.detach().numpy(), dtype, f"{what}: y")
    dx = layer.backward(dy0)
    ty.backward(torch.from_numpy(dy0.copy()))
    assert_close_dtype(dx, tx.grad.numpy(), dtype, f"{what}: dx", 4)
    for name in ("weight", "bias"):
        p, tp = getattr(layer, name), getattr(ref, name)
        assert (p is None) == (tp is None), f"{what}: {name} presence"
        if p is not None:
            assert_close_dtype(p.grad, tp.grad.numpy(), dtype, f"{what}: {name}.grad", 4)


IN_CASES = [
    (nn.InstanceNorm1d, torch.nn.InstanceNorm1d, (4, 5, 9)),
    (nn.InstanceNorm1d, torch.nn.InstanceNorm1d, (5, 9)),           # unbatched
    (nn.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 5, 7, 6)),
    (nn.InstanceNorm2d, torch.nn.InstanceNorm2d, (5, 2, 3)),        # unbatched
    (nn.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 5, 3, 4, 2)),
]


@pytest.mark.parametrize("affine,track,bias", [(False, False, True), (True, False, True),
                                               (False, True, True), (True, True, True),
                                               (True, False, False), (True, True, False)])
@pytest.mark.parametrize("nk_cls,t_cls,shape", IN_CASES,
                         ids=[f"{c.__name__}-{'x'.join(map(str, s))}" for c, _, s in IN_CASES])
def test_instance_norm_against_torch(nk_cls, t_cls, shape, affine, track, bias, dtype):
    C = 5
    layer = nk_cls(C, momentum=0.2, affine=affine, track_running_stats=track, bias=bias,
                   dtype=dtype)
    ref = t_cls(C, momentum=0.2, affine=affine, track_running_stats=track, bias=bias,
                dtype=TORCH_DTYPES[dtype])
    sd = {}
    if affine:
        w, b = params(C, 1, dtype)
        sd["weight"] = w
        if bias:
            sd["bias"] = b
    if track:
        sd["running_mean"], sd["running_var"] = running(C, 2, dtype)
        sd["num_batches_tracked"] = np.array(0, np.int64)
    layer.load_state_dict(sd)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    assert set(layer.state_dict()) == set(ref.state_dict())
    layout = "channels_last" if len(shape) >= 4 else "contiguous"
    for step in range(3):
        x0, dy0 = randn(shape, 10 + step, dtype, offset=1.0), randn(shape, 20 + step, dtype)
        _compare_step(layer, ref, x0, dy0, dtype, f"train step {step}", layout)
        for name in ("running_mean", "running_var"):
            if track:
                assert_close_dtype(getattr(layer, name), getattr(ref, name).numpy(), dtype, name)
    layer.eval()
    ref.eval()
    x0, dy0 = randn(shape, 30, dtype), randn(shape, 31, dtype)
    _compare_step(layer, ref, x0, dy0, dtype, "eval", layout)
    if track:
        assert int(layer.num_batches_tracked) == 3  # torch leaves it at 0: documented
    # state dicts both ways
    other = nk_cls(C, affine=affine, track_running_stats=track, bias=bias, dtype=dtype)
    other.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        if k != "num_batches_tracked":
            np.testing.assert_array_equal(other.state_dict()[k], v.numpy())
    ref2 = t_cls(C, affine=affine, track_running_stats=track, bias=bias,
                 dtype=TORCH_DTYPES[dtype])
    ref2.load_state_dict(_torch_sd(layer))


def test_instance_norm_momentum_none_is_cumulative():
    layer = nn.InstanceNorm2d(3, momentum=None, track_running_stats=True, dtype=np.float64)
    xs = [randn((4, 3, 5, 6), s) for s in range(3)]
    for x in xs:
        layer(x)
    S = 30
    means = [x.mean(axis=(2, 3)).mean(axis=0) for x in xs]
    vars_ = [(x.var(axis=(2, 3)) * S / (S - 1)).mean(axis=0) for x in xs]
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean(vars_, axis=0), rtol=1e-12)
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape,G", [((4, 6, 5, 7), 3), ((3, 10, 7), 5), ((2, 8), 2),
                                     ((1, 4, 2, 3, 2), 1)])
def test_group_norm_against_torch(shape, G, affine, bias, dtype):
    C = shape[1]
    layer = nn.GroupNorm(G, C, affine=affine, bias=bias, dtype=dtype)
    ref = torch.nn.GroupNorm(G, C, affine=affine, bias=bias, dtype=TORCH_DTYPES[dtype])
    if affine:
        w, b = params(C, 3, dtype)
        sd = {"weight": w, **({"bias": b} if bias else {})}
        layer.load_state_dict(sd)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    assert set(layer.state_dict()) == set(ref.state_dict())
    layout = "channels_last" if len(shape) >= 3 else "contiguous"
    for step in range(2):
        _compare_step(layer, ref, randn(shape, 40 + step, dtype, offset=-2.0),
                      randn(shape, 50 + step, dtype), dtype, f"step {step}", layout)
    if affine:
        ref.load_state_dict(_torch_sd(layer))
        layer.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("planes,ratio", [(8, 0.5), (7, 0.5), (5, 0.3), (6, 0.0), (6, 1.0)])
def test_ibn_against_torch_parts(planes, ratio):
    layer = nn.InstanceBatchNorm2d(planes, ratio, dtype=np.float64)
    half = int(planes * ratio)
    t_in = torch.nn.InstanceNorm2d(half, affine=True, dtype=torch.float64) if half else None
    t_bn = torch.nn.BatchNorm2d(planes - half, dtype=torch.float64) if planes - half else None
    keys = ([f"IN.{k}" for k in ("weight", "bias")] if half else []) + (
        [f"BN.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                             "num_batches_tracked")] if planes - half else [])
    assert list(layer.state_dict()) == keys
    sd = {}
    if half:
        sd["IN.weight"], sd["IN.bias"] = params(half, 1)
        t_in.load_state_dict({"weight": torch.tensor(sd["IN.weight"]),
                              "bias": torch.tensor(sd["IN.bias"])})
    if planes - half:
        sd["BN.weight"], sd["BN.bias"] = params(planes - half, 2)
        t_bn.load_state_dict({"weight": torch.tensor(sd["BN.weight"]),
                              "bias": torch.tensor(sd["BN.bias"]),
                              "running_mean": torch.zeros(planes - half),
                              "running_var": torch.ones(planes - half),
                              "num_batches_tracked": torch.tensor(0)})
    layer.load_state_dict(sd, strict=False)
    for training in (True, False):
        layer.train(training)
        for m in (t_in, t_bn):
            if m is not None:
                m.train(training)
        x0, dy0 = randn((3, planes, 5, 4), 60), randn((3, planes, 5, 4), 61)
        x = make_layout(x0, "channels_last")
        tx = torch.tensor(x0, requires_grad=True)
        parts = []
        if half:
            parts.append(t_in(tx[:, :half]))
        if planes - half:
            parts.append(t_bn(tx[:, half:]))
        ty = torch.cat(parts, dim=1)
        y = layer(x)
        assert _same_layout(y, x)
        assert_close_dtype(y, ty.detach().numpy(), np.float64, f"y training={training}")
        dx = layer.backward(dy0)
        ty.backward(torch.tensor(dy0))
        assert_close_dtype(dx, tx.grad.numpy(), np.float64, f"dx training={training}")
    if half:
        assert_close_dtype(layer.IN.weight.grad, t_in.weight.grad.numpy(), np.float64, "IN.w")
    if planes - half:
        assert_close_dtype(layer.BN.running_var, t_bn.running_var.numpy(), np.float64, "BN.rv")


def test_convert_sync_batchnorm_reaches_ibn():
    model = nn.Sequential(nn.InstanceBatchNorm2d(6))
    before = model[0].BN.weight
    converted = nn.convert_sync_batchnorm(model)
    assert isinstance(converted[0].BN, nn.SyncBatchNorm)
    assert converted[0].BN.weight is before
    assert isinstance(converted[0].IN, nn.InstanceNorm2d)


@pytest.mark.parametrize("cls,t_cls,shape", [(nn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
                                             (nn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
                                             (nn.SyncBatchNorm, torch.nn.BatchNorm2d,
                                              (4, 3, 5, 6))])
def test_batch_norm_without_bias(cls, t_cls, shape):
    layer = cls(3, bias=False, dtype=np.float64)
    ref = t_cls(3, bias=False, dtype=torch.float64)
    assert layer.bias is None and list(layer.state_dict()) == list(ref.state_dict())
    w, _ = params(3, 5)
    layer.load_state_dict({**layer.state_dict(), "weight": w})
    ref.load_state_dict({**ref.state_dict(), "weight": torch.tensor(w)})
    _compare_step(layer, ref, randn(shape, 70), randn(shape, 71), np.dtype(np.float64), "train")
    layer.eval()
    ref.eval()
    _compare_step(layer, ref, randn(shape, 72), randn(shape, 73), np.dtype(np.float64), "eval")
    ref.load_state_dict(_torch_sd(layer))
    assert "bias=False" in repr(layer)


def test_layer_errors():
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nn.InstanceNorm2d(3)(randn((2, 3, 1, 1), 1))
    with pytest.raises(ValueError, match="expected 3D \\(unbatched\\) or 4D input"):
        nn.InstanceNorm2d(3)(randn((2, 3, 4, 4, 4), 1))
    with pytest.raises(ValueError, match="match num_features"):
        nn.InstanceNorm2d(4, affine=True)(randn((2, 3, 4, 4), 1))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="6 channels"):
        nn.GroupNorm(2, 4)(randn((2, 6, 3), 1))
    with pytest.raises(TypeError, match="float64 input needs float64"):
        nn.GroupNorm(2, 4)(randn((2, 4, 3), 1))
    with pytest.raises(ValueError, match="expected 4D"):
        nn.InstanceBatchNorm2d(4)(randn((2, 4, 3), 1))
    with pytest.raises(RuntimeError, match="Unexpected running stats"):
        nn.InstanceNorm2d(3).load_state_dict({"running_mean": np.zeros(3, np.float32),
                                              "running_var": np.ones(3, np.float32)})
    layer = nn.GroupNorm(1, 3)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(randn((2, 3, 4), 1))
    layer.eval()
    np.testing.assert_allclose(layer(randn((2, 3, 4), 1, np.float32)).mean(axis=(1, 2)), 0,
                               atol=1e-6)  # group norm has no eval mode: batch statistics
