"""normkit.torch's Encoding family (scaled_l2, aggregate, encoding; Encoding, GramMatrix,
Inspiration, UpsampleConv2d) against float64 torch compositions of LAYERS.md's formulas (the
broadcast residual form of encoding_reference.py, a direct convolution): values and gradients in
float32 and float64 for every layout a (B, N, D) tensor or a layer input can have; gradcheck in
float64 for every function and module; s = 0; float16/bfloat16 inputs; state_dicts shared with
normkit.nn; the Inspiration target buffer; errors; and (marked gpu) CUDA tensors against the CPU
result."""
import copy

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import normkit.nn as nn
import normkit.torch as nkt
from encoding_reference import codebook, features, torch_aggregate, torch_encoding, torch_scaled_l2
from helpers import assert_close, assert_close_dtype, randn, rng
from normkit.torch.encoding import _launch_encoding
from torch_helpers import DEVICES, to_numpy

GPU = DEVICES[1:]  # the CUDA device, marked gpu and skipped with a reason where there is none
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
HALF = [torch.float16, torch.bfloat16]
HALF_IDS = ["f16", "bf16"]

# float32 results are compared with float64 references; the softmax and the sums over N and K
# amplify float32 rounding by a few units.
F32_FACTOR = 10


def _check(actual, expected, dtype, what):
    """`actual` (a tensor of `dtype`) against the float64 `expected`."""
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    factor = 1 if dtype == torch.float64 else F32_FACTOR
    assert_close_dtype(to_numpy(actual), to_numpy(expected), np_dtype, what, factor=factor)


def _check_rounded(actual, expected, what):
    """`actual` (float16/bfloat16) is `expected` (the float32 result) rounded to its dtype."""
    eps = torch.finfo(actual.dtype).eps
    assert_close(to_numpy(actual), to_numpy(expected), eps, eps, what)


def _same_layout(a, b):
    """Whether a and b are stored alike (strides of size-1 dims do not count)."""
    return a.shape == b.shape and all(n == 1 or p == q for n, p, q in
                                      zip(a.shape, a.stride(), b.stride()))


def _param_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


# --------------------------------------------------------------------------------------------------
# The ops


def layout_features(X, layout):
    """The (B, N, D) tensor X stored as rows, N-major ((B, D, N) storage: a layer's input seen as
    features), or with no unit stride (every other column of a wider buffer)."""
    if layout == "rows":
        return X.contiguous()
    if layout == "n_major":
        return X.transpose(1, 2).contiguous().transpose(1, 2)
    base = torch.full(X.shape[:-1] + (2 * X.shape[-1],), float("nan"), dtype=X.dtype,
                      device=X.device)
    base[..., ::2] = X
    return base[..., ::2]


FEATURE_LAYOUTS = ["rows", "n_major", "strided"]

# name: (normkit.torch op, float64 reference, argument names)
OPS = {
    "scaled_l2": (nkt.scaled_l2, torch_scaled_l2, ("X", "C", "s")),
    "aggregate": (nkt.aggregate, torch_aggregate, ("A", "X", "C")),
    "encoding": (nkt.encoding, torch_encoding, ("X", "C", "s")),
}

# (B, N, D, K): odd sizes, several of the core's row tiles with a ragged end, one codeword.
SHAPES = [(2, 5, 3, 4), (3, 70, 7, 5), (1, 131, 9, 2), (2, 9, 4, 1)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _values(shape, seed):
    """float64 NumPy values of every argument: X, C, s, and softmax weights A."""
    B, N, D, K = shape
    X = features((B, N, D), seed, offset=0.3)
    C, s = codebook(K, D, seed + 1)
    z = rng(seed + 2).standard_normal((B, N, K)) * 1.5
    A = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return {"X": X, "C": C, "s": s, "A": A}


def _args(op, values, dtype, device="cpu", layout="rows"):
    """The arguments of `op` as leaf tensors requiring grad: features (and A, stored like X's
    (B, N, K) arrays) in `dtype` and `layout`, parameters in the dtype the core computes in."""
    args = []
    for name in OPS[op][2]:
        is_data = name in ("X", "A")
        t = torch.tensor(values[name], dtype=dtype if is_data else _param_dtype(dtype),
                         device=device)
        if name == "X":
            t = layout_features(t, layout)
        elif name == "A" and layout == "n_major":
            t = layout_features(t, layout)
        args.append(t.requires_grad_())
    return args


def _out_shape(op, shape):
    B, N, D, K = shape
    return (B, N, K) if op == "scaled_l2" else (B, K, D)


def _grad_out(shape, seed, dtype, device="cpu"):
    """A random output gradient stored column-major in its last two dims (another layout than any
    output's)."""
    g = torch.tensor(rng(seed).standard_normal(shape), dtype=dtype, device=device)
    return g.mT.contiguous().mT


def _run(fn, args, grad_out):
    out = fn(*args)
    out.backward(grad_out)
    return out.detach(), [a.grad for a in args]


def _reference(op, args, grad_out):
    """The float64 reference on the CPU, from the same (rounded) values."""
    ts = [a.detach().to("cpu", torch.float64).requires_grad_() for a in args]
    return _run(OPS[op][1], ts, grad_out.to("cpu", torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_op_matches_reference_in_every_layout(op, shape, dtype):
    values = _values(shape, 1)
    grad_out = _grad_out(_out_shape(op, shape), 2, dtype)
    for layout in FEATURE_LAYOUTS:
        args = _args(op, values, dtype, layout=layout)
        out, grads = _run(OPS[op][0], args, grad_out)
        ref, ref_grads = _reference(op, args, grad_out)
        assert out.shape == _out_shape(op, shape)
        _check(out, ref, dtype, f"{op} {layout}")
        for name, a, g, want in zip(OPS[op][2], args, grads, ref_grads):
            _check(g, want, a.dtype, f"{op} {layout}: d{name}")
            if name == "X" and layout != "strided":
                assert _same_layout(g, a)  # the gradient comes back in X's layout


def test_features_gradient_is_computed_in_their_layout():
    """dX is produced in X's orientation (a (B, D, N) input's gradient needs no transposed copy)."""
    values = _values((2, 9, 5, 3), 12)
    for op in ("scaled_l2", "encoding"):
        for layout in ("rows", "n_major"):
            args = _args(op, values, torch.float32, layout=layout)
            out = OPS[op][0](*args)
            (dX,) = torch.autograd.grad(out, args[0], torch.ones_like(out))
            assert _same_layout(dX, args[0]), (op, layout, dX.stride())


@pytest.mark.parametrize("layout", ["rows", "n_major"])
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_ops(op, layout):
    args = _args(op, _values((2, 5, 3, 4), 3), torch.float64, layout=layout)
    assert gradcheck(OPS[op][0], args)


@pytest.mark.parametrize("op", ["scaled_l2", "encoding"])
def test_zero_scale_gives_finite_gradients(op):
    """ds = sum g ||x - c||^2 needs no division by s (upstream's SL / s is NaN at s = 0)."""
    values = _values((2, 7, 3, 4), 4)
    for s in (np.zeros(4), np.array([0.0, -0.7, 0.0, -0.2])):
        values["s"] = s
        args = _args(op, values, torch.float64)
        grad_out = _grad_out(_out_shape(op, (2, 7, 3, 4)), 5, torch.float64)
        out, grads = _run(OPS[op][0], args, grad_out)
        ref, ref_grads = _reference(op, args, grad_out)
        for name, g, want in zip(("X", "C", "s"), grads, ref_grads):
            assert torch.isfinite(g).all(), name
            _check(g, want, torch.float64, f"d{name} at s = {s}")
    assert gradcheck(OPS[op][0], args)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_half_inputs_run_in_float32(op, dtype):
    """float16/bfloat16 features with float32 parameters: the output and the features' gradient
    are the float32 results rounded to the input's dtype; parameter gradients are float32's."""
    shape = (2, 9, 5, 3)
    values = _values(shape, 6)
    args = _args(op, values, dtype, layout="n_major")
    grad_out = _grad_out(_out_shape(op, shape), 7, dtype)
    out, grads = _run(OPS[op][0], args, grad_out)
    args32 = [a.detach().float().requires_grad_() for a in args]
    out32, grads32 = _run(OPS[op][0], args32, grad_out.float())
    assert out.dtype == dtype
    _check_rounded(out, out32, "output")
    for name, a, g, want in zip(OPS[op][2], args, grads, grads32):
        assert g.dtype == a.dtype, name
        if a.dtype == dtype:
            _check_rounded(g, want, f"d{name}")
        else:
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6, msg=name)


def test_no_grad_runs_without_a_graph():
    values = _values((2, 9, 4, 3), 8)
    for op in OPS:
        args = _args(op, values, torch.float32)
        with torch.no_grad():
            out = OPS[op][0](*args)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, OPS[op][0](*args).detach(), rtol=0, atol=0)


def test_expanded_output_gradient():
    """A gradient that arrives expanded (stride 0, from a sum) is read as it is."""
    values = _values((2, 11, 3, 4), 9)
    for op in OPS:
        args = _args(op, values, torch.float64, layout="n_major")
        OPS[op][0](*args).sum().backward()
        ts = [a.detach().clone().requires_grad_() for a in args]
        OPS[op][1](*ts).sum().backward()
        for name, a, t in zip(OPS[op][2], args, ts):
            _check(a.grad, t.grad, torch.float64, f"{op}: d{name}")


def test_launch_encoding_is_empty_on_the_cpu():
    assert _launch_encoding(torch.ones(2, 3, 4), 2, 3, 4) == {}


def test_op_errors_name_the_problem():
    X, C, s = torch.randn(2, 5, 3), torch.randn(4, 3), -torch.rand(4)
    A = torch.rand(2, 5, 4)
    with pytest.raises(ValueError, match=r"encoding: X must have shape \(B, N, D\), got 2D"):
        nkt.encoding(X[0], C, s)
    with pytest.raises(ValueError, match=r"C \(codewords\) must have shape \(K, D\) with D = 3"):
        nkt.scaled_l2(X, torch.randn(4, 2), s)
    with pytest.raises(ValueError, match=r"s \(scale\) must have shape \(K,\) = \(4,\), got "
                                         r"\(3,\)"):
        nkt.encoding(X, C, s[:3])
    with pytest.raises(ValueError, match=r"A must have shape \(B, N, K\) = \(2, 5, 4\), got "
                                         r"\(2, 4, 5\)"):
        nkt.aggregate(A.mT, X, C)
    with pytest.raises(TypeError, match="C must be torch.float64 for torch.float64 X, got "
                                        "torch.float32"):
        nkt.encoding(X.double(), C, s.double())
    with pytest.raises(TypeError, match="s must be torch.float32 for torch.float16 X, got "
                                        "torch.float64"):
        nkt.scaled_l2(X.half(), C, s.double())
    with pytest.raises(TypeError, match="A must be torch.float32 for torch.float32 X, got "
                                        "torch.float64"):
        nkt.aggregate(A.double(), X, C)
    with pytest.raises(TypeError, match="X has dtype torch.int64"):
        nkt.encoding(torch.ones(2, 5, 3, dtype=torch.long), C, s)
    with pytest.raises(TypeError, match="C must be a torch.Tensor, got ndarray"):
        nkt.encoding(X, C.numpy(), s)


# --------------------------------------------------------------------------------------------------
# Modules: references


def _reference_encoding_layer(x, C, s):
    """Upstream's Encoding.forward: (B, D, *) -> X (B, N, D) -> encoding."""
    B, D = x.shape[:2]
    return torch_encoding(x.reshape(B, D, -1).transpose(1, 2), C, s)


def _reference_gram(y):
    B, C = y.shape[:2]
    F = y.reshape(B, C, -1)
    return torch.bmm(F, F.transpose(1, 2)) / (C * F.shape[2])


def _reference_inspiration(x, W, G):
    """Upstream's forward: P = bmm(W.expand_as(G), G);
    Y = bmm(P^T.expand(B, C, C), X.view(B, C, -1)), viewed as X."""
    P = torch.bmm(W.expand_as(G), G)
    B, C = x.shape[:2]
    return torch.bmm(P.transpose(1, 2).expand(B, C, C), x.reshape(B, C, -1)).view_as(x)


def _reference_upsample_conv(x, weight, bias, stride, padding, dilation, groups, s):
    """A direct convolution (a sum over kernel offsets of strided slices of the zero-padded input),
    then LAYERS.md's pixel shuffle: out[n, c, h s + i, w s + j] = conv[n, c s^2 + i s + j, h, w]."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    O, Cg, kh, kw = weight.shape
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    conv = 0
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                       j * dw:j * dw + sw * (Wo - 1) + 1:sw]  # (n, C_in, Ho, Wo)
            per_group = [torch.einsum("nchw,oc->nohw", patch[:, g * Cg:(g + 1) * Cg],
                                      weight[g * (O // groups):(g + 1) * (O // groups), :, i, j])
                         for g in range(groups)]
            conv = conv + torch.cat(per_group, dim=1)
    if bias is not None:
        conv = conv + bias[None, :, None, None]
    n, c = x.shape[0], O // (s * s)
    return conv.reshape(n, c, s, s, Ho, Wo).permute(0, 1, 4, 2, 5, 3).reshape(n, c, Ho * s, Wo * s)


def layout_input(x, layout):
    """A layer input stored NCHW ("contiguous"), channels_last, or, for a 3D (B, D, N) input, as
    (B, N, D) rows ("features_last")."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    assert layout == "features_last" and x.dim() == 3
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _input(shape, seed, dtype, layout="contiguous", device="cpu", offset=0.2):
    x = torch.tensor(randn(shape, seed, offset=offset), dtype=dtype, device=device)
    return layout_input(x, layout).requires_grad_()


def _compare_module(layer, ref_fn, x, names, dtype, seed):
    """layer(x) and ref_fn(x64, *params64) in float64 on the same values: output, the input's
    gradient (in the input's layout) and every named parameter's (or buffer's) gradient."""
    y = layer(x)
    grad_out = torch.tensor(rng(seed).standard_normal(tuple(y.shape)), dtype=dtype)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    ts = [getattr(layer, n).detach().double().requires_grad_() for n in names]
    y64 = ref_fn(x64, *ts)
    y64.backward(grad_out.double())
    assert y.shape == y64.shape
    _check(y, y64, dtype, "output")
    _check(x.grad, x64.grad, dtype, "input grad")
    assert _same_layout(x.grad, x)
    for n, t in zip(names, ts):
        _check(getattr(layer, n).grad, t.grad, dtype, f"{n}.grad")


def _gradcheck_module(layer, x, names):
    """gradcheck of the module as a function of its input and its named tensors."""
    tensors = [getattr(layer, n).detach().clone().requires_grad_() for n in names]

    def fn(x, *ts):
        return functional_call(layer, dict(zip(names, ts)), (x,))

    assert gradcheck(fn, (x, *tensors))


# --------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,layout", [((2, 6, 5, 7), "contiguous"),
                                          ((2, 6, 5, 7), "channels_last"),
                                          ((3, 5, 71), "contiguous"),
                                          ((3, 5, 71), "features_last"),
                                          ((1, 4, 1, 1), "contiguous")],
                         ids=["4d", "4d-channels-last", "3d", "3d-features-last", "4d-one"])
def test_encoding_module_matches_reference(shape, layout, dtype):
    torch.manual_seed(0)
    layer = nkt.Encoding(shape[1], 4, dtype=dtype)
    x = _input(shape, 1, dtype, layout)
    _compare_module(layer, _reference_encoding_layer, x, ("codewords", "scale"), dtype, 2)


@pytest.mark.parametrize("shape,layout", [((2, 3, 3, 4), "channels_last"), ((2, 3, 5),
                                                                            "contiguous")])
def test_gradcheck_encoding_module(shape, layout):
    torch.manual_seed(1)
    layer = nkt.Encoding(3, 4, dtype=torch.float64)
    _gradcheck_module(layer, _input(shape, 3, torch.float64, layout), ("codewords", "scale"))


def test_encoding_module_zero_scale_gives_finite_gradients():
    layer = nkt.Encoding(3, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.scale.zero_()
    x = _input((2, 3, 4, 3), 4, torch.float64)
    _compare_module(layer, _reference_encoding_layer, x, ("codewords", "scale"), torch.float64, 5)
    assert torch.isfinite(layer.scale.grad).all() and layer.scale.grad.abs().max() > 0


def test_encoding_initialization_and_factory_kwargs():
    torch.manual_seed(2)
    layer = nkt.Encoding(16, 8)
    bound = 1 / np.sqrt(16 * 8)
    C, s = layer.codewords.detach(), layer.scale.detach()
    assert C.shape == (8, 16) and s.shape == (8,) and C.dtype == s.dtype == torch.float32
    assert C.abs().max() <= bound and C.abs().max() > 0.8 * bound
    assert (s >= -1).all() and (s <= 0).all() and s.min() < -0.5
    assert [n for n, _ in layer.named_parameters()] == ["codewords", "scale"]
    layer64 = nkt.Encoding(16, 8, device="cpu", dtype=torch.float64)
    assert layer64.codewords.dtype == layer64.scale.dtype == torch.float64
    assert layer64(torch.randn(2, 16, 3, 3, dtype=torch.float64)).dtype == torch.float64
    assert repr(layer) == "Encoding(N x 16 => 8 x 16)"


# --------------------------------------------------------------------------------------------------
# GramMatrix


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gram_matrix_matches_reference(layout, dtype):
    x = _input((3, 5, 4, 7), 10, dtype, layout)
    _compare_module(nkt.GramMatrix(), _reference_gram, x, (), dtype, 11)


def test_gradcheck_gram_matrix():
    _gradcheck_module(nkt.GramMatrix(), _input((2, 3, 2, 3), 12, torch.float64, "channels_last"),
                      ())
    _gradcheck_module(nkt.GramMatrix(), _input((2, 3, 5), 13, torch.float64), ())


# --------------------------------------------------------------------------------------------------
# Inspiration


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target_batch", [1, 3])
def test_inspiration_matches_reference(target_batch, dtype):
    C = 5
    torch.manual_seed(3)
    layer = nkt.Inspiration(C, dtype=dtype)
    G = torch.tensor(rng(20).standard_normal((target_batch, C, C)), dtype=dtype,
                     requires_grad=True)
    layer.set_target(G)
    assert layer.G is G  # kept as given, so that it receives gradients
    x = _input((3, C, 4, 3), 21, dtype, "channels_last")
    _compare_module(layer, _reference_inspiration, x, ("weight", "G"), dtype, 22)


@pytest.mark.parametrize("target_batch", [1, 2])
def test_gradcheck_inspiration(target_batch):
    layer = nkt.Inspiration(3, B=target_batch, dtype=torch.float64)
    layer.set_target(torch.tensor(rng(23).standard_normal((target_batch, 3, 3))))
    _gradcheck_module(layer, _input((2, 3, 2, 3), 24, torch.float64), ("weight", "G"))


def test_inspiration_target_is_a_buffer():
    C = 4
    torch.manual_seed(4)
    layer = nkt.Inspiration(C, B=2)
    w = layer.weight.detach()
    assert w.shape == (1, C, C) and (w >= 0).all() and (w <= 0.02).all() and w.max() > 0.01
    assert layer.G.shape == (2, C, C) and not layer.G.any()
    assert list(layer.state_dict()) == ["weight", "G"]
    assert [n for n, _ in layer.named_buffers()] == ["G"]
    target64 = torch.tensor(rng(40).standard_normal((1, C, C)), requires_grad=True)
    layer.setTarget(target64)  # upstream's name; converted to the layer's dtype, differentiably
    assert layer.G.dtype == torch.float32 and layer.G.shape == (1, C, C)
    x = _input((2, C, 3, 3), 41, torch.float32)
    layer(x).sum().backward()
    ref = target64.detach().float().requires_grad_()
    _reference_inspiration(x.detach(), layer.weight.detach(), ref).sum().backward()
    _check(target64.grad, ref.grad.double(), torch.float64, "target grad through the conversion")
    layer.to(torch.float64)
    assert layer.G.dtype == layer.weight.dtype == torch.float64
    assert layer(x.detach().double()).dtype == torch.float64
    # A checkpoint's target batch replaces the layer's, in a new buffer: a target the layer was
    # given is never written.
    given = torch.ones(1, C, C, dtype=torch.float64)
    layer.set_target(given)
    layer.load_state_dict({"weight": layer.weight.detach(), "G": torch.full((3, C, C), 0.5)})
    assert layer.G.shape == (3, C, C) and (layer.G == 0.5).all() and (given == 1).all()


def test_inspiration_errors():
    layer = nkt.Inspiration(4)
    layer.set_target(torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="the target has batch 2 but the input has batch 3"):
        layer(torch.ones(3, 4, 2, 2))
    with pytest.raises(ValueError, match=r"Inspiration\(C=4\): input has 5 channels"):
        layer(torch.ones(2, 5, 2, 2))
    with pytest.raises(ValueError, match=r"the target must have shape \(B, 4, 4\), got \(4, 4\)"):
        layer.set_target(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"the target must have shape \(B, 4, 4\), got "
                                         r"\(1, 3, 4\)"):
        layer.set_target(torch.ones(1, 3, 4))
    with pytest.raises(TypeError, match="float64 input needs torch.float64 parameters"):
        layer(torch.ones(2, 4, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, H, W\) \(got 2D"):
        layer(torch.ones(2, 4))
    with pytest.raises(ValueError, match="B must be a positive integer"):
        nkt.Inspiration(4, B=0)


# --------------------------------------------------------------------------------------------------
# UpsampleConv2d

UPSAMPLE_CASES = [
    (dict(kernel_size=3, stride=2, padding=1), 2),
    (dict(kernel_size=(3, 2), padding=(1, 0), dilation=(1, 2), groups=2), 3),
    (dict(kernel_size=1, bias=False), 1),
]


def _upsample_reference(layer):
    def ref(x, weight, bias=None):
        return _reference_upsample_conv(x, weight, bias, layer.stride, layer.padding,
                                        layer.dilation, layer.groups, layer.scale_factor)
    return ref


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("args,scale", UPSAMPLE_CASES, ids=["stride-pad", "groups-dil", "1x1"])
def test_upsample_conv2d_matches_reference(args, scale, dtype):
    torch.manual_seed(5)
    layer = nkt.UpsampleConv2d(4, 6, scale_factor=scale, dtype=dtype, **args)
    k = args["kernel_size"]
    k = (k, k) if isinstance(k, int) else k
    assert layer.weight.shape == (6 * scale * scale, 4 // args.get("groups", 1)) + k
    names = ("weight",) if layer.bias is None else ("weight", "bias")
    x = _input((2, 4, 7, 6), 50, dtype, "contiguous")
    _compare_module(layer, _upsample_reference(layer), x, names, dtype, 51)
    H = (7 + 2 * layer.padding[0] - layer.dilation[0] * (k[0] - 1) - 1) // layer.stride[0] + 1
    assert layer(x).shape[:3] == (2, 6, scale * H)


def test_gradcheck_upsample_conv2d():
    layer = nkt.UpsampleConv2d(2, 2, 3, stride=2, padding=1, scale_factor=2, dtype=torch.float64)
    _gradcheck_module(layer, _input((1, 2, 5, 4), 52, torch.float64, "channels_last"),
                      ("weight", "bias"))


def test_upsample_conv2d_initialization_and_errors():
    torch.manual_seed(6)
    layer = nkt.UpsampleConv2d(2, 3, 3, scale_factor=2)
    bound = 1 / np.sqrt(2 * 3 * 3)
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    assert layer.weight.shape == (12, 2, 3, 3) and layer.out_channels == 3
    with pytest.raises(ValueError, match="scale_factor must be a positive integer"):
        nkt.UpsampleConv2d(4, 4, 3, scale_factor=0)
    with pytest.raises(ValueError, match=r"out_channels \* scale_factor\^2 \(3\) must be divisible "
                                         r"by groups \(2\)"):
        nkt.UpsampleConv2d(4, 3, 3, groups=2)
    with pytest.raises(ValueError, match=r"in_channels \(3\) must be divisible by groups \(2\)"):
        nkt.UpsampleConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        nkt.UpsampleConv2d(4, 4, 3, padding=-1)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match=r"UpsampleConv2d\(2, \.\.\.\): input has 4 channels"):
        layer(torch.ones(1, 4, 5, 5))


# --------------------------------------------------------------------------------------------------
# Every module: float16/bfloat16 inputs, state_dicts shared with normkit.nn


def _modules(dtype=torch.float32):
    """(name, normkit.torch module, normkit.nn module of the same configuration, input shape)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    torch.manual_seed(7)
    insp = nkt.Inspiration(5, dtype=dtype)
    insp.set_target(torch.tensor(rng(60).standard_normal((3, 5, 5)), dtype=dtype))
    return [
        ("Encoding", nkt.Encoding(5, 3, dtype=dtype),
         nn.Encoding(5, 3, dtype=np_dtype, generator=rng(1)),
         (3, 5, 4, 3)),
        ("GramMatrix", nkt.GramMatrix(), nn.GramMatrix(), (3, 5, 4, 3)),
        ("Inspiration", insp, nn.Inspiration(5, dtype=np_dtype, generator=rng(2)), (3, 5, 4, 3)),
        ("UpsampleConv2d", nkt.UpsampleConv2d(5, 2, 3, padding=1, scale_factor=2, dtype=dtype),
         nn.UpsampleConv2d(5, 2, 3, padding=1, scale_factor=2, dtype=np_dtype, generator=rng(3)),
         (3, 5, 4, 3)),
    ]


MODULE_NAMES = [m[0] for m in _modules()]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("index", range(len(MODULE_NAMES)), ids=MODULE_NAMES)
def test_module_half_input_with_float32_parameters(index, dtype):
    _, layer, _, shape = _modules()[index]
    x = _input(shape, 70, dtype, "channels_last")
    y = layer(x)
    assert y.dtype == dtype
    grad_out = torch.tensor(rng(71).standard_normal(tuple(y.shape)), dtype=dtype)
    y.backward(grad_out)
    params = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    x32 = x.detach().float().requires_grad_()
    y32 = layer(x32)
    y32.backward(grad_out.float())
    _check_rounded(y, y32, "output")
    assert x.grad.dtype == dtype
    _check_rounded(x.grad, x32.grad, "input grad")
    for n, p in layer.named_parameters():
        assert params[n].dtype == torch.float32
        torch.testing.assert_close(params[n], p.grad, rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("index", range(len(MODULE_NAMES)), ids=MODULE_NAMES)
def test_state_dicts_move_between_normkit_nn_and_torch(index):
    """torch -> normkit.nn (torch tensors) -> same outputs; normkit.nn -> torch (NumPy arrays)
    -> same parameters and buffers, key for key."""
    name, layer, np_layer, shape = _modules(torch.float64)[index]
    assert list(layer.state_dict()) == list(np_layer.state_dict())
    np_layer.load_state_dict(layer.state_dict())
    x = randn(shape, 80)
    np.testing.assert_allclose(np_layer(x), to_numpy(layer(torch.tensor(x))), rtol=1e-12,
                               atol=1e-12, err_msg=name)
    _, fresh, other_np, _ = _modules(torch.float64)[index]
    other_np.to(dtype=np.float32)  # a float32 checkpoint loads into a float64 module
    if name == "Inspiration":
        other_np.set_target(rng(81).standard_normal((2, 5, 5)))
    fresh.load_state_dict(other_np.state_dict())
    for key, value in other_np.state_dict().items():
        mine = fresh.state_dict()[key]
        assert mine.dtype == torch.float64 and mine.shape == value.shape, key
        np.testing.assert_array_equal(to_numpy(mine), value.astype(np.float64), err_msg=key)


def test_module_errors_name_the_problem():
    layer = nkt.Encoding(6, 4)
    with pytest.raises(ValueError, match=r"expected 3D \(B, D, N\) or 4D \(B, D, H, W\) input "
                                         r"\(got 2D input\)"):
        layer(torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"expected 3D .* \(got 5D input\)"):
        layer(torch.ones(2, 6, 2, 2, 2))
    with pytest.raises(ValueError, match=r"Encoding\(D=6, K=4\): input has 5 features in dim 1"):
        layer(torch.ones(2, 5, 3, 3))
    with pytest.raises(TypeError, match="Encoding: torch.float64 input needs torch.float64 "
                                        "parameters, this layer's are torch.float32"):
        layer(torch.ones(2, 6, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="Encoding: torch.float16 input needs torch.float32 "
                                        "parameters, this layer's are torch.float64"):
        nkt.Encoding(6, 4, dtype=torch.float64)(torch.ones(2, 6, 3, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="input has dtype torch.int64"):
        layer(torch.ones(2, 6, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        layer(np.ones((2, 6, 3, 3), np.float32))
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        nkt.Encoding(6, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        nkt.Encoding(6, 0)
    with pytest.raises(ValueError, match=r"GramMatrix: expected input of shape \(B, C, H, W\)"):
        nkt.GramMatrix()(torch.ones(3, 4))


def test_exports():
    import normkit.torch.functional as tf

    for name in ("Encoding", "GramMatrix", "Inspiration", "UpsampleConv2d", "scaled_l2",
                 "aggregate", "encoding"):
        assert name in nkt.__all__ and getattr(nkt, name) is not None, name
    for name in ("scaled_l2", "aggregate", "encoding"):
        assert name in tf.__all__ and getattr(tf, name) is getattr(nkt, name), name
    for cls in (nkt.Encoding, nkt.GramMatrix, nkt.Inspiration, nkt.UpsampleConv2d):
        assert issubclass(cls, torch.nn.Module)


# --------------------------------------------------------------------------------------------------
# CUDA tensors against the CPU result (marked gpu; skipped with a reason without a GPU)


@pytest.fixture
def exact_float32():
    """cuDNN convolutions in float32 (not TF32, its default on Ampere and later), as on the CPU."""
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        yield


def _to(args, device):
    """Leaf copies of `args` on `device` with the same strides."""
    out = []
    for a in args:
        t = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device)
        out.append(t.copy_(a.detach()).requires_grad_())
    return out


def _same(gpu, cpu, dtype, what):
    """A CUDA result against the CPU one: float64 and float32 within their tolerances (the
    reductions run in another order), float16/bfloat16 within an ulp or two of their dtype."""
    assert gpu.is_cuda and gpu.dtype == cpu.dtype, what
    if gpu.dtype in HALF:
        eps = 2 * torch.finfo(gpu.dtype).eps
        assert_close(to_numpy(gpu), to_numpy(cpu), eps, eps, what)
    else:
        _check(gpu.cpu(), cpu, gpu.dtype, what)


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", DTYPES + HALF, ids=DTYPE_IDS + HALF_IDS)
@pytest.mark.parametrize("op", list(OPS))
def test_op_on_cuda_matches_cpu(op, dtype, device):
    shape = (3, 70, 7, 5)
    values = _values(shape, 90)
    grad_out = _grad_out(_out_shape(op, shape), 91, dtype)
    for layout in FEATURE_LAYOUTS:
        cpu_args = _args(op, values, dtype, layout=layout)
        gpu_args = _to(cpu_args, device)
        out, grads = _run(OPS[op][0], cpu_args, grad_out)
        gout, ggrads = _run(OPS[op][0], gpu_args, grad_out.to(device))
        _same(gout, out, dtype, f"{op} {layout}")
        for name, g, c in zip(OPS[op][2], ggrads, grads):
            _same(g, c, c.dtype, f"{op} {layout}: d{name}")


@pytest.mark.parametrize("device", GPU)
def test_ops_on_cuda_with_more_than_65535_features(device):
    """N is unbounded on the GPU too (no grid-dimension limit)."""
    shape = (2, 70001, 4, 3)
    values = _values(shape, 92)
    for op in OPS:
        grad_out = _grad_out(_out_shape(op, shape), 93, torch.float64)
        cpu_args = _args(op, values, torch.float64, layout="n_major")
        out, grads = _run(OPS[op][0], cpu_args, grad_out)
        gout, ggrads = _run(OPS[op][0], _to(cpu_args, device), grad_out.to(device))
        _same(gout, out, torch.float64, op)
        for name, g, c in zip(OPS[op][2], ggrads, grads):
            _same(g, c, torch.float64, f"{op}: d{name}")


@pytest.mark.parametrize("device", GPU)
def test_ops_on_cuda_run_on_the_current_stream(device):
    """On a side stream, the core's kernels and torch's products stay ordered: the results are
    the default stream's; the launch arguments name the current stream."""
    shape = (4, 300, 16, 8)
    values = _values(shape, 94)
    grad_out = _grad_out(_out_shape("encoding", shape), 95, torch.float32, device)
    args = _args("encoding", values, torch.float32, device, layout="n_major")
    out, grads = _run(nkt.encoding, args, grad_out)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        assert _launch_encoding(args[0], *shape[:2], shape[3])["stream"] == side.cuda_stream
        args2 = [a.detach().clone().requires_grad_() for a in args]
        out2, grads2 = _run(nkt.encoding, args2, grad_out)
    side.synchronize()
    _same(out2, out.cpu(), torch.float32, "E")
    for name, g2, g in zip("XCs", grads2, grads):
        _same(g2, g.cpu(), torch.float32, f"d{name}")


@pytest.mark.parametrize("device", GPU)
def test_encoding_on_cuda_is_captured_in_a_cuda_graph(device):
    """Forward and backward run without host synchronization, so a step can be captured and
    replayed on new data."""
    torch.manual_seed(8)
    layer = nkt.Encoding(8, 5, device=device)
    x = torch.randn(2, 8, 8, 8, device=device, requires_grad=True)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's docs ask
        for _ in range(2):
            torch.autograd.grad(layer(x).square().sum(), (x, layer.codewords, layer.scale))
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        E = layer(x)
        dx, dC, ds = torch.autograd.grad(E.square().sum(), (x, layer.codewords, layer.scale))
    new = torch.tensor(randn((2, 8, 8, 8), 96), dtype=torch.float32, device=device)
    with torch.no_grad():
        x.copy_(new)
    graph.replay()
    torch.cuda.synchronize(device)
    x_ref = new.detach().clone().requires_grad_()
    E_ref = layer(x_ref)
    want = torch.autograd.grad(E_ref.square().sum(), (x_ref, layer.codewords, layer.scale))
    for got, ref, what in zip((E, dx, dC, ds), (E_ref.detach(), *want), ("E", "dx", "dC", "ds")):
        _same(got, ref.cpu(), torch.float32, what)


@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("index", range(len(MODULE_NAMES)), ids=MODULE_NAMES)
def test_module_on_cuda_matches_cpu(index, dtype, device, exact_float32):
    _, layer, _, shape = _modules()[index]
    gpu_layer = copy.deepcopy(layer).to(device)
    assert all(t.is_cuda for t in (*gpu_layer.parameters(), *gpu_layer.buffers()))
    x = _input(shape, 97, dtype, "channels_last")
    gx = _to([x], device)[0]
    y, gy = layer(x), gpu_layer(gx)
    grad_out = torch.tensor(rng(98).standard_normal(tuple(y.shape)), dtype=dtype)
    y.backward(grad_out)
    gy.backward(grad_out.to(device))
    _same(gy, y.detach(), dtype, "output")
    _same(gx.grad, x.grad, dtype, "input grad")
    for (n, p), gp in zip(layer.named_parameters(), gpu_layer.parameters()):
        _same(gp.grad, p.grad, torch.float32, f"{n}.grad")
