"""normkit.torch's per-sample family against torch's own: group_norm / instance_norm and the
GroupNorm, InstanceNorm1d/2d/3d modules in every dtype and layout, train/eval, affine x
track_running_stats, bias=False, unbatched input, state_dicts both ways (old checkpoints),
gradcheck in float64; InstanceBatchNorm2d for any planes and ratio and under
convert_sync_batchnorm; bad input. The reference is torch run in float64 on the same values."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normkit.torch as nkt
from helpers import randn
from torch_helpers import DEVICES, tensor, to_numpy

DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol relative to the reference's largest magnitude) against a float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LAYOUTS = ["contiguous", "channels_last", "channel_slice"]


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = to_numpy(actual), to_numpy(expected)
    assert np.all(np.isfinite(a)), what
    tol = TOL[dtype]
    scale = max(float(np.abs(e).max()) if e.size else 0.0, 1e-30)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=what)


def _inputs(shape, dtype, device, layout, seed, offset=0.3):
    """x in `layout` and a dy in another one, both of `dtype`, plus their float64 values."""
    x64 = randn(shape, seed, np.float64, offset=offset)
    dy64 = randn(shape, seed + 1, np.float64)
    x = tensor(x64, device, layout).to(dtype).requires_grad_(True)
    dy_layout = "contiguous" if layout != "contiguous" else LAYOUTS[1]
    dy = tensor(dy64, device, dy_layout if len(shape) > 2 else "contiguous").to(dtype)
    # The reference sees the same (rounded) values; its dy is contiguous because torch 2.13's CPU
    # instance_norm backward gets a channels-last dy of a batch of one wrong.
    return x, dy, x.detach().double().requires_grad_(True), dy.double().contiguous()


def _affine(C, device, seed, pd):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, pd)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(device, pd)
    return w.requires_grad_(True), b.requires_grad_(True)


def _grads(y, dy, *inputs):
    wanted = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy))
    return [None if t is None else next(grads) for t in inputs]


GROUP_CASES = [((3, 6, 5, 7), 3), ((3, 6, 5, 7), 1), ((2, 5, 9), 5), ((4, 6), 2),
               ((2, 4, 3, 4, 5), 2), ((1, 3, 2, 2), 3)]
# A 2-D input has one layout here.
GROUP_LAYOUT_CASES = [(s, g, layout) for s, g in GROUP_CASES
                      for layout in (LAYOUTS if len(s) > 2 else LAYOUTS[:1])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("params", ["affine", "weight_only", "none"])
@pytest.mark.parametrize("shape,groups,layout", GROUP_LAYOUT_CASES,
                         ids=[f"{s}-G{g}-{lay}" for s, g, lay in GROUP_LAYOUT_CASES])
def test_group_norm_matches_torch(shape, groups, layout, params, dtype, device):
    x, dy, x64, dy64 = _inputs(shape, dtype, device, layout, seed=sum(shape) + groups)
    w, b = _affine(shape[1], device, 7, _param_dtype(dtype))
    b = b if params == "affine" else None
    w = w if params != "none" else None
    y = nkt.group_norm(x, groups, w, b, eps=1e-4)
    assert y.dtype == dtype and y.device == x.device
    if layout == "channels_last" and len(shape) > 3:
        assert y.stride() == x.stride(), "channels-last input must give a channels-last output"
    w64 = None if w is None else w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    ref = TF.group_norm(x64, groups, w64, b64, eps=1e-4)
    _close(y, ref, dtype, "y")
    for name, got, want in zip(("dx", "dw", "db"), _grads(y, dy, x, w, b),
                               _grads(ref, dy64, x64, w64, b64)):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == (dtype if name == "dx" else _param_dtype(dtype)), name
            _close(got, want, dtype, name)


INSTANCE_SHAPES = [(3, 5, 7), (2, 6, 5, 3), (1, 3, 2, 3), (2, 3, 3, 2, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("use_input_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", INSTANCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_instance_norm_matches_torch(shape, use_input_stats, layout, dtype, device):
    C, pd = shape[1], _param_dtype(dtype)
    x, dy, x64, dy64 = _inputs(shape, dtype, device, layout, seed=3 * sum(shape))
    w, b = _affine(C, device, 11, pd)
    g = torch.Generator().manual_seed(5)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(device, pd)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, pd)
    rm64, rv64 = rm.double(), rv.double()
    y = nkt.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3, 1e-4)
    w64, b64 = (t.detach().double().requires_grad_(True) for t in (w, b))
    ref = TF.instance_norm(x64, rm64, rv64, w64, b64, use_input_stats, 0.3, 1e-4)
    assert y.dtype == dtype
    _close(y, ref, dtype, "y")
    _close(rm, rm64, dtype, "running_mean")
    _close(rv, rv64, dtype, "running_var")
    for name, got, want in zip(("dx", "dw", "db"), _grads(y, dy, x, w, b),
                               _grads(ref, dy64, x64, w64, b64)):
        _close(got, want, dtype, name)


def test_channels_last_stays_channels_last_where_torch_returns_contiguous():
    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last)
    assert nkt.instance_norm(x).is_contiguous(memory_format=torch.channels_last)
    assert nkt.group_norm(x, 2).is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 3, 4, 5, 3).to(memory_format=torch.channels_last_3d)
    assert nkt.InstanceNorm3d(3)(x3).is_contiguous(memory_format=torch.channels_last_3d)


def test_mean_far_from_zero_is_exact_in_float32():
    x64 = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x64 = x64 + 1e4
    y = nkt.instance_norm(x64.float())
    ref = TF.instance_norm(x64.float().double())
    # A float32 mean of 1e4 is itself only good to ulp(1e4) / 2 ~ 5e-4 (y's error then); a
    # one-pass variance E[x^2] - E[x]^2 would be off by O(1).
    np.testing.assert_allclose(to_numpy(y), to_numpy(ref), rtol=0, atol=1e-3)


# --- gradcheck (float64) -------------------------------------------------------------------------

def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_group_norm(layout, device):
    x = tensor(randn((2, 6, 3, 4), 1, offset=0.5), device, layout, True)
    w, b = _affine(6, device, 2, torch.float64)
    _gradcheck(lambda x, w, b: nkt.group_norm(x, 3, w, b), x, w, b)
    _gradcheck(lambda x, w: nkt.group_norm(x, 2, w, None), x, w)
    _gradcheck(lambda x: nkt.group_norm(x, 6), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_input_stats", [True, False], ids=["train", "eval"])
def test_gradcheck_instance_norm(use_input_stats, device):
    x = tensor(randn((2, 3, 5), 3, offset=-0.4), device, "contiguous", True)
    w, b = _affine(3, device, 4, torch.float64)
    rm = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64, device=device)
    rv = torch.tensor([0.9, 1.7, 0.4], dtype=torch.float64, device=device)

    def fn(x, w, b):
        # Fresh copies: a training call updates the running statistics in place.
        return nkt.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats, 0.1, 1e-5)

    _gradcheck(fn, x, w, b)
    _gradcheck(lambda x: nkt.instance_norm(x, rm.clone(), rv.clone(), None, None,
                                           use_input_stats), x)


def test_no_grad_and_a_partly_used_output():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        y = nkt.group_norm(x, 2)
    assert not y.requires_grad
    y = nkt.GroupNorm(2, 4)(x)
    # Only half of the output reaches the loss: the gradient arrives with zeros in the other half.
    c = torch.randn(2, 2, 3, 3)
    (y[:, :2] * c).sum().backward()
    ref = x.detach().requires_grad_(True)
    (TF.group_norm(ref, 2)[:, :2] * c).sum().backward()
    _close(x.grad, ref.grad, torch.float32, "dx")


# --- modules ------------------------------------------------------------------------------------

INSTANCE_MODULES = [(nkt.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 4, 9)),
                    (nkt.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 5, 4, 3)),
                    (nkt.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 3, 3, 4, 2))]
MODES = {"default": {}, "affine": {"affine": True}, "track": {"track_running_stats": True},
         "affine_track": {"affine": True, "track_running_stats": True},
         "no_bias": {"affine": True, "bias": False},
         "no_bias_track": {"affine": True, "bias": False, "track_running_stats": True}}


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name or "weight" in name
                        else torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("nk_cls,t_cls,shape", INSTANCE_MODULES,
                         ids=[c[0].__name__ for c in INSTANCE_MODULES])
def test_instance_norm_module_tracks_torch_over_steps_then_eval(nk_cls, t_cls, shape, mode, dtype,
                                                                device):
    ref = t_cls(shape[1], dtype=dtype, device=device, **MODES[mode])
    _randomize(ref, 3)
    layer = nk_cls(shape[1], dtype=dtype, device=device, **MODES[mode])
    assert isinstance(layer, t_cls)
    layer.load_state_dict(ref.state_dict())
    assert list(layer.state_dict()) == list(ref.state_dict())
    for step in range(4):
        if step == 3:
            layer.eval()
            ref.eval()
        layout = ["contiguous", "channels_last"][step % 2]
        x, dy, _, _ = _inputs(shape, dtype, device, layout, seed=20 + step, offset=0.5 * step)
        xr = x.detach().clone().requires_grad_(True)
        y, yr = layer(x), ref(xr)
        _close(y, yr, dtype, f"step {step}: y")
        y.backward(dy)
        yr.backward(dy)
        _close(x.grad, xr.grad, dtype, f"step {step}: dx")
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        _close(p.grad, q.grad, dtype, name + ".grad")
    for name, t in ref.state_dict().items():
        mine = layer.state_dict()[name]
        if name == "num_batches_tracked":  # normkit counts the training steps, torch doesn't
            assert int(mine) == 3 and int(t) == 0
        else:
            _close(mine, t, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_instance_norm_momentum_none_is_the_cumulative_average(device):
    """A documented difference: torch never moves the running statistics with momentum=None."""
    layer = nkt.InstanceNorm2d(3, momentum=None, track_running_stats=True, dtype=torch.float64,
                               device=device)
    means, variances = [], []
    for step in range(3):
        x = tensor(randn((2, 3, 4, 5), step, offset=step), device)
        layer(x)
        means.append(x.mean((2, 3)).mean(0))
        variances.append(x.var((2, 3), unbiased=True).mean(0))
    assert int(layer.num_batches_tracked) == 3
    _close(layer.running_mean, sum(means) / 3, torch.float64, "running_mean")
    _close(layer.running_var, sum(variances) / 3, torch.float64, "running_var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nk_cls,t_cls,shape", INSTANCE_MODULES,
                         ids=[c[0].__name__ for c in INSTANCE_MODULES])
def test_instance_norm_unbatched_input(nk_cls, t_cls, shape, device):
    ref = t_cls(shape[1], affine=True, track_running_stats=True, device=device)
    _randomize(ref, 1)
    layer = nk_cls(shape[1], affine=True, track_running_stats=True, device=device)
    layer.load_state_dict(ref.state_dict())
    x = tensor(randn(shape[1:], 4, np.float32), device)
    for train in (True, False):
        layer.train(train)
        ref.train(train)
        y = layer(x)
        assert y.shape == x.shape
        _close(y, ref(x), torch.float32, f"train={train}")
    _close(layer.running_mean, ref.running_mean, torch.float32, "running_mean")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False}],
                         ids=["affine", "no_affine", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_group_norm_module_matches_torch(dtype, kwargs, device):
    ref = torch.nn.GroupNorm(3, 6, device=device, **kwargs)
    _randomize(ref, 2)
    layer = nkt.GroupNorm(3, 6, device=device, **kwargs)
    assert isinstance(layer, torch.nn.GroupNorm)
    layer.load_state_dict(ref.state_dict())
    assert list(layer.state_dict()) == list(ref.state_dict())
    has_bias = kwargs.get("affine", True) and kwargs.get("bias", True)
    assert ("bias" in layer.state_dict()) == has_bias
    x, dy, x64, dy64 = _inputs((3, 6, 5, 4), dtype, device, "channels_last", seed=8)
    ref64 = copy.deepcopy(ref).double()
    y, yr = layer(x), ref64(x64)
    _close(y, yr, dtype, "y")
    y.backward(dy)
    yr.backward(dy64)
    _close(x.grad, x64.grad, dtype, "dx")
    for (name, p), q in zip(layer.named_parameters(), ref64.parameters()):
        _close(p.grad, q.grad, dtype, name + ".grad")


def test_float16_module_parameters_are_cast_for_the_kernels():
    """A module converted with .half() (parameters of the input's dtype) still runs, as torch's."""
    layer = nkt.GroupNorm(2, 4).half()
    ref = torch.nn.GroupNorm(2, 4).double()
    _randomize(ref, 6)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 5).half().requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == torch.float16 and layer.weight.grad.dtype == torch.float16
    _close(y, ref(x.detach().double()), torch.float16, "y")


# --- state dicts --------------------------------------------------------------------------------

def test_state_dicts_interchange_with_torch_both_ways():
    for nk_cls, t_cls, _ in INSTANCE_MODULES:
        for kwargs in MODES.values():
            ref = t_cls(4, **kwargs)
            _randomize(ref, 9)
            mine = nk_cls(4, **kwargs)
            mine.load_state_dict(ref.state_dict())
            back = t_cls(4, **kwargs)
            back.load_state_dict(mine.state_dict())
            for k, v in ref.state_dict().items():
                assert torch.equal(back.state_dict()[k], v), (nk_cls.__name__, kwargs, k)


def test_old_checkpoints_load_as_in_torch():
    # A tracking layer's checkpoint from before num_batches_tracked existed (version 1).
    sd = torch.nn.InstanceNorm2d(3, track_running_stats=True).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    layer = nkt.InstanceNorm2d(3, track_running_stats=True)
    layer.load_state_dict(sd)
    assert int(layer.num_batches_tracked) == 0
    # A pre-0.4 checkpoint carrying running stats the (non-tracking) layer does not have: torch's
    # own error naming the keys (even with strict=False).
    old = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    for cls in (torch.nn.InstanceNorm2d, nkt.InstanceNorm2d):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match='Unexpected running stats buffer.*"running_m'):
                cls(3).load_state_dict(dict(old), strict=strict)


# --- InstanceBatchNorm2d ------------------------------------------------------------------------

IBN_CASES = [(6, 0.5), (5, 0.5), (7, 0.3), (3, 0.9), (4, 0.0), (4, 1.0)]


def _torch_ibn(planes, ratio):
    """IBN from torch's modules, split so that any planes work."""
    half = int(planes * ratio)
    IN = torch.nn.InstanceNorm2d(half, affine=True) if half else None
    BN = torch.nn.BatchNorm2d(planes - half) if planes > half else None
    mods = torch.nn.ModuleDict({k: m for k, m in (("IN", IN), ("BN", BN)) if m is not None})

    def forward(x):
        parts = ([IN(x[:, :half])] if IN else []) + ([BN(x[:, half:])] if BN else [])
        return torch.cat(parts, 1)

    return mods, forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("planes,ratio", IBN_CASES)
def test_instance_batch_norm_2d_any_planes_and_ratio(planes, ratio, device):
    layer = nkt.InstanceBatchNorm2d(planes, ratio).to(device)
    half = int(planes * ratio)
    assert layer.half == half
    assert (layer.IN is None) == (half == 0) and (layer.BN is None) == (half == planes)
    mods, ref = _torch_ibn(planes, ratio)
    mods.to(device)
    _randomize(mods, 4)
    keys = [f"IN.{k}" for k in ("weight", "bias")] * (half > 0) + [
        f"BN.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                            "num_batches_tracked")] * (half < planes)
    assert list(layer.state_dict()) == keys == list(mods.state_dict())
    layer.load_state_dict(mods.state_dict())
    for step, train in enumerate((True, True, False)):
        layer.train(train)
        mods.train(train)
        x, dy, _, _ = _inputs((3, planes, 4, 5), torch.float32, device, "channels_last", 30 + step)
        xr = x.detach().clone().requires_grad_(True)
        y, yr = layer(x), ref(xr)
        _close(y, yr, torch.float32, f"step {step}: y")
        y.backward(dy)
        yr.backward(dy)
        _close(x.grad, xr.grad, torch.float32, f"step {step}: dx")
    for (name, p), q in zip(layer.named_parameters(), mods.parameters()):
        _close(p.grad, q.grad, torch.float32, name + ".grad")
    for name, t in mods.state_dict().items():
        _close(layer.state_dict()[name].float(), t.float(), torch.float32, name)


def test_instance_batch_norm_2d_gradcheck():
    layer = nkt.InstanceBatchNorm2d(5, 0.4).double()
    _randomize(layer, 5)
    x = torch.from_numpy(randn((3, 5, 3, 2), 6)).requires_grad_(True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *ps):
        # Training mode: the running statistics it updates do not enter the output.
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    _gradcheck(fn, x, *[p.detach().clone().requires_grad_(True) for p in layer.parameters()])


def test_convert_sync_batchnorm_reaches_the_bn_half_of_ibn():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), nkt.InstanceBatchNorm2d(5),
                                torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 1),
                                nkt.InstanceBatchNorm2d(4, 0.25), torch.nn.BatchNorm2d(4))
    ref = copy.deepcopy(model)
    bn_tensors = (model[1].BN.weight, model[1].BN.running_mean)
    converted = nkt.convert_sync_batchnorm(model)
    assert type(converted[1].BN) is nkt.SyncBatchNorm and type(converted[4].BN) is nkt.SyncBatchNorm
    assert type(converted[5]) is nkt.SyncBatchNorm
    assert type(converted[1].IN) is nkt.InstanceNorm2d
    assert converted[1].BN.weight is bn_tensors[0] and converted[1].BN.running_mean is bn_tensors[1]
    assert list(converted.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 7, 6)
    _close(converted(x), ref(x), torch.float32, "converted model")


# --- bias=False on the batch-norm layers ---------------------------------------------------------

def test_batch_norm_bias_false_state_dict_and_conversion():
    for nk, tc in ((nkt.BatchNorm2d, torch.nn.BatchNorm2d),
                   (nkt.SyncBatchNorm, torch.nn.SyncBatchNorm)):
        layer, ref = nk(3, bias=False), tc(3, bias=False)
        assert layer.bias is None and list(layer.state_dict()) == list(ref.state_dict())
    converted = nkt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, bias=False)))
    assert converted[0].bias is None and converted[0].weight is not None
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    converted(x).sum().backward()
    assert converted[0].weight.grad is not None


# --- errors -------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="divisible into 4 groups"):
        nkt.group_norm(x, 4)
    with pytest.raises(ValueError, match="num_groups"):
        nkt.group_norm(x, 0)
    with pytest.raises(ValueError, match="shape \\(N, C, ...\\)"):
        nkt.group_norm(torch.randn(6), 2)
    with pytest.raises(ValueError, match="more than 1 value per group"):
        nkt.group_norm(torch.randn(1, 3, 1, 1), 3)
    with pytest.raises(ValueError, match="weight must have shape \\(6,\\)"):
        nkt.group_norm(x, 2, torch.ones(3))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nkt.instance_norm(torch.randn(3, 6, 1, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nkt.InstanceNorm2d(6)(torch.randn(3, 6, 1, 1))
    nkt.InstanceNorm2d(6, track_running_stats=True).eval()(torch.randn(3, 6, 1, 1))  # eval: fine
    with pytest.raises(ValueError, match="needs running_mean"):
        nkt.instance_norm(x, use_input_stats=False)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        nkt.instance_norm(x, torch.zeros(1), torch.ones(6))
    with pytest.raises(TypeError, match="running_var must be torch.float32"):
        nkt.instance_norm(x, torch.zeros(6), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="4D input \\(got 5D"):
        nkt.InstanceNorm2d(6)(torch.randn(2, 6, 4, 4, 1))
    with pytest.raises(ValueError, match="match num_features"):
        nkt.InstanceNorm2d(4, affine=True)(x)
    with pytest.raises(ValueError):
        nkt.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="expected input of shape \\(N, 5, H, W\\)"):
        nkt.InstanceBatchNorm2d(5)(x)
    with pytest.raises(ValueError, match="ratio"):
        nkt.InstanceBatchNorm2d(5, 1.5)
    with pytest.raises((TypeError, RuntimeError), match="weight"):
        nkt.group_norm(x, 2, torch.ones(6, dtype=torch.float64))
    with pytest.raises(TypeError):
        nkt.group_norm(x.long(), 2)
    with pytest.raises(TypeError, match="input must be a tensor"):
        nkt.group_norm(x.numpy(), 2)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_device_mismatches_raise_clear_errors(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="weight"):
        nkt.group_norm(x, 2, torch.ones(6))
    with pytest.raises(TypeError, match="running_mean is on cpu"):
        nkt.instance_norm(x, torch.zeros(6), torch.ones(6, device=device))
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        nkt.InstanceNorm2d(6, affine=True)(x)  # parameters left on the CPU
