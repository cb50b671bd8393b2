"""normkit.torch's weight-standardized layers: against elektronn3's formulas as torch ops (WSConv1d/
2d/3d, where upstream is right) and each convention's float64 composition, every gradient (input,
weight, gain, bias) over stride/padding/dilation/groups/padding_mode; the transposed layers with
output_size; FWS's learning gain and in-place standardization; state-dict interchange with an
elektronn3-shaped module; gradcheck in float64; bad input."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normkit.torch as nkt
from wsconv_reference import elektronn3_standardize, ref_standardize, timm_standardize

gen = torch.Generator().manual_seed(77)
CONV = {1: (nkt.WSConv1d, nn.Conv1d), 2: (nkt.WSConv2d, nn.Conv2d), 3: (nkt.WSConv3d, nn.Conv3d)}
GEOMETRIES = [  # (dims, C_in, C_out, kernel, kwargs, spatial)
    (1, 4, 6, 3, dict(), (11,)),
    (1, 6, 4, 5, dict(stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"), (13,)),
    (2, 3, 5, 3, dict(padding=1), (7, 6)),
    (2, 4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 2), groups=2, padding_mode="circular"),
     (9, 7)),
    (2, 4, 4, 3, dict(padding="same", dilation=2, padding_mode="replicate", bias=False), (8, 9)),
    (2, 3, 5, 3, dict(padding="valid"), (6, 5)),
    (3, 2, 4, 3, dict(padding=1, stride=2), (5, 6, 4)),
    (3, 4, 4, 2, dict(groups=4, padding_mode="reflect", padding=1), (4, 5, 3)),
]


def randn(*shape, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=dtype)


def composed(base, layer, x, standardize):
    """torch's convolution `base` (its own padding_mode handling) on standardize(weight)."""
    return base._conv_forward(layer, x, standardize(layer.weight, layer.gain), layer.bias)


def grads(out, tensors, dy):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], dy)


def randomize(layer):
    with torch.no_grad():
        layer.gain.copy_(torch.rand(layer.gain.shape, generator=gen, dtype=layer.gain.dtype) + .5)
        if layer.bias is not None:
            layer.bias.copy_(randn(*layer.bias.shape, dtype=layer.bias.dtype))
    return layer


@pytest.mark.parametrize("case", GEOMETRIES, ids=range(len(GEOMETRIES)))
@pytest.mark.parametrize("convention", ["elektronn3", "nfnet", "timm"])
def test_layers_vs_composition(case, convention):
    dims, cin, cout, k, kw, spatial = case
    layer = randomize(CONV[dims][0](cin, cout, k, convention=convention, dtype=torch.float64,
                                    **kw))
    x = randn(2, cin, *spatial).requires_grad_()
    eps = layer.eps
    if convention == "elektronn3":
        def standardize(w, gn):
            return elektronn3_standardize(w, gn, eps)
    elif convention == "timm" and dims == 2:
        def standardize(w, gn):
            return timm_standardize(w, gn, eps)
    else:
        def standardize(w, gn):
            return ref_standardize(w, gn, eps, convention)
    y = layer(x)
    ref = composed(CONV[dims][1], layer, x, standardize)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    dy = randn(*y.shape)
    ps = [x, layer.weight, layer.gain, layer.bias]
    for a, b in zip(grads(y, ps, dy), grads(ref, ps, dy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_float32_and_eps_argument():
    layer = randomize(nkt.WSConv2d(5, 7, 3, padding=1))
    x = randn(2, 5, 6, 6, dtype=torch.float32)
    w64 = layer.weight.double()
    ref = F.conv2d(x.double(), elektronn3_standardize(w64, layer.gain.double(), 1e-2),
                   layer.bias.double(), padding=1)
    torch.testing.assert_close(layer(x, eps=1e-2).double(), ref, rtol=1e-4, atol=1e-5)
    assert layer(x).dtype == torch.float32


def test_bfloat16_weights_on_the_cpu():
    """bfloat16 weights standardize with float32 statistics (gain float32 too)."""
    w = randn(6, 4, 3, 3) * 0.1 + 0.2
    gn = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    wb = w.bfloat16().requires_grad_()
    gb = gn.float().requires_grad_()
    out = nkt.ws_standardize(wb, gb, 1e-4, "nfnet")
    assert out.dtype == torch.bfloat16
    w_in = wb.detach().double().requires_grad_()
    g_in = gb.detach().double().requires_grad_()
    ref = ref_standardize(w_in, g_in, 1e-4, "nfnet")
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    dy = randn(*w.shape).bfloat16()
    dw, dg = torch.autograd.grad(out, (wb, gb), dy)
    dwr, dgr = torch.autograd.grad(ref, (w_in, g_in), dy.double())
    assert dw.dtype == torch.bfloat16 and dg.dtype == torch.float32
    torch.testing.assert_close(dw.double(), dwr, rtol=2e-2, atol=2e-2 * dwr.abs().max().item())
    torch.testing.assert_close(dg.double(), dgr, rtol=1e-4, atol=1e-4 * dgr.abs().max().item())
    layer = nkt.WSConv2d(4, 6, 3).bfloat16()
    assert layer(randn(1, 4, 5, 5).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("convention", ["elektronn3", "nfnet"])
def test_transposed_layers(dims, convention):
    cls, fn = {2: (nkt.WSConvTranspose2d, F.conv_transpose2d),
               3: (nkt.WSConvTranspose3d, F.conv_transpose3d)}[dims]
    layer = randomize(cls(4, 6, 3, stride=2, padding=1, groups=2, convention=convention,
                          dtype=torch.float64))
    assert layer.gain.shape == (4,)  # per input channel: dim 0 of (C_in, C_out / groups, *k)
    x = randn(2, 4, *(5,) * dims).requires_grad_()
    out_size = (10,) * dims  # output_padding 1 (upstream ignores output_size)
    y = layer(x, output_size=out_size)
    assert y.shape[2:] == out_size
    w_hat = ref_standardize(layer.weight, layer.gain, layer.eps, convention)
    ref = fn(x, w_hat, layer.bias, 2, 1, 1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    dy = randn(*y.shape)
    ps = [x, layer.weight, layer.gain, layer.bias]
    for a, b in zip(grads(y, ps, dy), grads(ref, ps, dy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert layer(x).shape[2:] == (9,) * dims
    with pytest.raises(ValueError, match="requested an output size"):
        layer(x, output_size=(12,) * dims)


@pytest.mark.parametrize("cls,dims", [(nkt.WSConv1d, 1), (nkt.WSConv2d, 2), (nkt.WSConv3d, 3),
                                      (nkt.WSConvTranspose2d, 2), (nkt.WSConvTranspose3d, 3)])
def test_gradcheck_layers(cls, dims):
    layer = randomize(cls(2, 4, 2, stride=1, dtype=torch.float64))
    x = randn(1, 2, *(3,) * dims).requires_grad_()

    def f(x, w, g, b):
        return torch.func.functional_call(layer, {"weight": w, "gain": g, "bias": b}, (x,))
    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.gain, layer.bias))


class Elektronn3WSConv2d(nn.Conv2d):
    """elektronn3's WSConv2d as its source writes it (the test's reference for state dicts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.kaiming_normal_(self.weight)
        self.gain = nn.Parameter(torch.ones(self.weight.size()[0], requires_grad=True))

    def forward(self, input, eps=1e-4):
        weight = elektronn3_standardize(self.weight, self.gain, eps)
        return F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Elektronn3FWS(nn.Module):
    """elektronn3's FWS as its source writes it: the gain is baked in under no_grad."""

    def __init__(self, layer, eps=1e-4):
        super().__init__()
        self.layer = layer
        self.gain = nn.Parameter(torch.ones(layer.weight.shape[0]))
        self.register_buffer("fan_in", torch.prod(torch.tensor(layer.weight.shape)))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x):
        w = self.layer.weight
        var, mean = torch.var_mean(w, dim=tuple(range(1, w.ndim)), keepdim=True)
        scale = torch.rsqrt(torch.max(var * self.fan_in, self.eps)) * self.gain.view_as(var)
        with torch.no_grad():
            w.mul_(scale).sub_(mean * scale)
        return self.layer(x)


@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("convention", ["elektronn3", "timm"])
def test_function_gradients_of_what_requires_them(wants, convention):
    """ws_standardize's eager backward (the kernel called without the dispatcher) gives the
    reference's gradient of each input that requires one."""
    w = (randn(5, 3, 3, 3) * 0.2 + 0.1).requires_grad_(wants[0])
    gain = (randn(5).abs() + 0.5).requires_grad_(wants[1])
    dy = randn(5, 3, 3, 3)
    got = torch.autograd.grad(nkt.ws_standardize(w, gain, 1e-4, convention),
                              [t for t, want in zip((w, gain), wants) if want], dy)
    w_ref, g_ref = w.detach().clone().requires_grad_(), gain.detach().clone().requires_grad_()
    refs = torch.autograd.grad(ref_standardize(w_ref, g_ref, 1e-4, convention), (w_ref, g_ref),
                               dy)
    for g, ref in zip(got, [r for r, want in zip(refs, wants) if want]):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


def test_saved_for_backward_and_double_backward():
    """The eager path saves w, gain and the per-channel mean and rstd (one weight-sized tensor,
    not w_hat too); its backward is not differentiable again, with a clear error."""
    w = randn(6, 4, 3, 3).requires_grad_()
    gain = (randn(6).abs() + 0.5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        w_hat = nkt.ws_standardize(w, gain, 1e-4, "nfnet")
    assert sorted(saved) == sorted([w.shape, (6,), (6,), (6,)])
    dw, = torch.autograd.grad(w_hat, w, randn(6, 4, 3, 3), create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        dw.sum().backward()


def test_state_dicts_interchange_with_elektronn3():
    ours = nkt.WSConv2d(3, 4, 3, padding=1)
    theirs = Elektronn3WSConv2d(3, 4, 3, padding=1)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias", "gain"]
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = randn(2, 3, 5, 5, dtype=torch.float32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    theirs.load_state_dict(ours.state_dict())
    f_ours = nkt.FWS(nn.Conv2d(3, 4, 3))
    f_theirs = Elektronn3FWS(nn.Conv2d(3, 4, 3))
    assert sorted(f_ours.state_dict()) == sorted(f_theirs.state_dict()) == sorted(
        ["gain", "fan_in", "eps", "layer.weight", "layer.bias"])
    f_ours.load_state_dict(f_theirs.state_dict())
    assert f_ours.fan_in.dtype == torch.int64 and int(f_ours.fan_in) == 4 * 3 * 9


def test_fws_standardizes_in_place_and_the_gain_learns():
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    fws = nkt.FWS(conv)
    with torch.no_grad():
        fws.gain.copy_(torch.rand(5, generator=gen) + 0.5)
    w0 = conv.weight.detach().clone()
    gain0 = fws.gain.detach().clone().double().requires_grad_()
    x = randn(2, 3, 6, 6)
    y = fws(x)
    w_std = ref_standardize(w0, None, 1e-4, "elektronn3")
    torch.testing.assert_close(conv.weight.detach(), w_std, rtol=1e-12, atol=1e-14)
    ref = F.conv2d(x, w_std * gain0.view(-1, 1, 1, 1), conv.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)  # the float32 gain buffer
    dy = randn(*y.shape)
    (dgain,) = torch.autograd.grad(y, fws.gain, dy)
    (dgain_ref,) = torch.autograd.grad(ref, gain0, dy)
    assert dgain.abs().max() > 0
    torch.testing.assert_close(dgain.double(), dgain_ref, rtol=1e-5, atol=1e-6)
    # The gain moves under an optimizer (upstream's never receives a gradient).
    opt = torch.optim.SGD(fws.parameters(), lr=0.1)
    before = fws.gain.detach().clone()
    opt.zero_grad()
    fws(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, fws.gain.detach())
    # const_eval: eval mode leaves the stored weight alone
    fws_c = nkt.FWS(nn.Conv2d(3, 5, 3), const_eval=True).eval()
    w = fws_c.layer.weight.detach().clone()
    fws_c(x.float())
    assert torch.equal(w, fws_c.layer.weight.detach())


def test_fws_wraps_transposed_layers():
    layer = nn.ConvTranspose2d(4, 3, 3, stride=2)
    fws = nkt.FWS(layer, learnable_gain=False)
    x = randn(1, 4, 5, 5, dtype=torch.float32)
    y = fws(x, output_size=(12, 12))
    assert y.shape == (1, 3, 12, 12)
    assert "gain" in dict(fws.named_buffers())


def test_errors():
    with pytest.raises(ValueError, match="unknown convention 'bit'"):
        nkt.WSConv2d(2, 2, 3, convention="bit")
    with pytest.raises(ValueError, match="eps must be > 0"):
        nkt.WSConv2d(2, 2, 3, eps=0.0)
    layer = nkt.WSConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        layer(randn(1, 2, 5, 5, dtype=torch.float32), eps=-1.0)
    with pytest.raises(ValueError, match="divisible by groups"):
        nkt.WSConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match='Only "zeros" padding mode'):
        nkt.WSConvTranspose2d(2, 2, 3, padding_mode="reflect")(randn(1, 2, 4, 4,
                                                                     dtype=torch.float32))
    with pytest.raises(ValueError, match="eps must be > 0"):
        nkt.FWS(nn.Conv2d(2, 2, 3), eps=0)
    with pytest.raises(TypeError, match="must have a weight tensor"):
        nkt.FWS(nn.ReLU())
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        nkt.WSConv2d(2, 2, 1, groups=2)(randn(1, 2, 3, 3, dtype=torch.float32))


# --- the eager layers' fused path (_WSConv): one node for standardization and convolution ------

FUSED = [  # (cls, C_in, C_out, kernel, kwargs, spatial, output_size)
    (nkt.WSConv1d, 4, 6, 3, dict(stride=2, padding=1), (9,), None),
    (nkt.WSConv2d, 4, 6, (4, 3), dict(padding="same"), (7, 6), None),  # odd total: one more right
    (nkt.WSConv2d, 4, 6, 3, dict(padding=2, dilation=2, groups=2, padding_mode="circular"),
     (8, 7), None),
    (nkt.WSConv2d, 3, 5, 2, dict(stride=(2, 1), padding="valid", padding_mode="reflect"), (7, 6),
     None),
    (nkt.WSConv3d, 2, 4, 3, dict(padding=1, padding_mode="replicate", bias=False), (4, 5, 3),
     None),
    (nkt.WSConvTranspose2d, 4, 6, 3, dict(stride=2, padding=1, groups=2, dilation=2), (5, 4),
     (12, 10)),
    (nkt.WSConvTranspose3d, 2, 4, 2, dict(stride=2, convention="timm"), (3, 2, 3), (7, 4, 6)),
]


def float64_reference(layer, x, output_size=None, eps=None):
    """The layer's forward as torch's convolution on ref_standardize, on float64 copies of x and
    the parameters (leaves, returned with the output)."""
    eps = layer.eps if eps is None else eps
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (x, layer.weight, layer.gain, layer.bias)]
    xd, w, gn, b = leaves
    w_hat = ref_standardize(w, gn, eps, layer.convention)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        dims = w.dim() - 2
        fn = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        op = layer._output_padding(xd, output_size, layer.stride, layer.padding,
                                   layer.kernel_size, dims, layer.dilation)
        y = fn(xd, w_hat, b, layer.stride, layer.padding, op, layer.groups, layer.dilation)
    else:
        y = type(layer).__mro__[2]._conv_forward(layer, xd, w_hat, b)
    return y, leaves


def check_fused(layer, x, output_size=None, eps=None, tol=1e-10, backward=True):
    kw = {} if output_size is None else dict(output_size=output_size)
    y = layer(x, **kw) if eps is None else layer(x, eps=eps, **kw)
    if backward:
        assert type(y.grad_fn).__name__ == "_WSConvBackward"  # the fused path, not the fallback
    ref, leaves = float64_reference(layer, x, output_size, eps)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol * scale)
    if not backward:
        return y
    dy = randn(*y.shape, dtype=y.dtype)
    ours = [t for t in (x, layer.weight, layer.gain, layer.bias)
            if t is not None and t.requires_grad]
    theirs = [r for t, r in zip((x, layer.weight, layer.gain, layer.bias), leaves)
              if t is not None and t.requires_grad]
    for t, a, b in zip(ours, torch.autograd.grad(y, ours, dy),
                       torch.autograd.grad(ref, theirs, dy.double())):
        assert a.dtype == t.dtype and a.shape == t.shape
        torch.testing.assert_close(a.double(), b, rtol=tol * 10,
                                   atol=tol * 10 * max(b.abs().max().item(), 1e-30))
    return y


@pytest.mark.parametrize("case", FUSED, ids=lambda c: c[0].__name__ + str(c[3]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_layers_vs_float64_composition(case, dtype):
    """Output and every gradient over stride/padding ('same' with an odd total, 'valid')/dilation/
    groups/padding_mode, transposed with output_size, 1d/2d/3d, float32/float64."""
    cls, cin, cout, k, kw, spatial, output_size = case
    layer = randomize(cls(cin, cout, k, dtype=dtype, **kw))
    x = randn(2, cin, *spatial, dtype=dtype).requires_grad_()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    y = check_fused(layer, x, output_size, tol=tol)
    # unbatched input: the same as a batch of one
    kwo = {} if output_size is None else dict(output_size=output_size)
    torch.testing.assert_close(layer(x[1], **kwo), y[1])


@pytest.mark.parametrize("frozen", ["input", "weight", "gain", "weight+gain", "bias"])
def test_fused_layers_with_some_gradients(frozen):
    """Only the gradients asked for (w_hat is not saved without an input gradient; the weight
    gradient of the convolution is computed for the gain alone)."""
    layer = randomize(nkt.WSConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64))
    x = randn(2, 4, 6, 5).requires_grad_(frozen != "input")
    for name in frozen.split("+"):
        if name != "input":
            getattr(layer, name).requires_grad_(False)
    check_fused(layer, x)


def test_fused_layers_bfloat16_and_channels_last():
    layer = randomize(nkt.WSConv2d(4, 6, 3, padding=1, dtype=torch.float64))
    x = randn(2, 4, 7, 6).to(memory_format=torch.channels_last).requires_grad_()
    check_fused(layer.to(memory_format=torch.channels_last), x)
    lb = nkt.WSConv2d(4, 6, 3, padding=1).bfloat16()  # gain bfloat16: float32 statistics
    xb = randn(2, 4, 7, 6, dtype=torch.bfloat16).requires_grad_()
    check_fused(lb, xb, tol=2e-2)


def test_fused_layers_no_grad_and_autocast():
    layer = randomize(nkt.WSConv2d(3, 5, 3, padding=1))
    x = randn(2, 3, 6, 6, dtype=torch.float32)
    with torch.no_grad():
        check_fused(layer, x, tol=2e-5, backward=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's own cast, through the fallback
        y = layer(x)
        assert y.dtype == nn.Conv2d(3, 5, 3)(x).dtype == torch.bfloat16


def test_fused_saved_tensors():
    """input, w_hat, weight, gain, mean and rstd; no w_hat without an input gradient."""
    layer = nkt.WSConv2d(4, 6, 3, dtype=torch.float64)
    for needs_x, expected in [(True, 3), (False, 2)]:
        x = randn(2, 4, 5, 5).requires_grad_(needs_x)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                      lambda t: t):
            layer(x)
        assert sorted(saved) == sorted([x.shape] + [layer.weight.shape] * (expected - 1)
                                       + [(6,)] * 3)


def test_fused_w_hat_buffer_is_never_reused_under_a_live_graph():
    """The pooled w_hat returns to the layer only when the graph that saved it is gone: two
    forwards before one backward, retain_graph, a graph dropped without backward. eps changes
    w_hat between the calls (timm's eps adds to the variance), and dx reads the saved w_hat."""
    layer = randomize(nkt.WSConv2d(3, 4, 3, padding=1, convention="timm", dtype=torch.float64))
    x = randn(2, 3, 6, 6).requires_grad_()
    pool = layer._ws_pool.free
    with torch.no_grad():
        layer(x)
    assert len(pool) == 1  # the next forward takes this buffer
    # two forwards before one backward (the second allocates its own)
    y1 = layer(x, eps=0.5)
    assert not pool
    y2 = layer(x, eps=2.0)
    for y, eps in [(y2, 2.0), (y1, 0.5)]:
        ref, (xd, w, gn, b) = float64_reference(layer, x, eps=eps)
        dy = randn(*y.shape)
        for a, r in zip(grads(y, [x, layer.weight, layer.gain], dy), grads(ref, [xd, w, gn], dy)):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
    del y1, y2
    assert len(pool) == 1
    # retain_graph: a forward between two backwards through one graph does not touch its w_hat
    y = layer(x, eps=0.5)
    dy = randn(*y.shape)
    first = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    with torch.no_grad():
        layer(x, eps=5.0)
    layer(x, eps=3.0).sum().backward()
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], first, rtol=0, atol=0)
    ref, (xd, *_) = float64_reference(layer, x, eps=0.5)
    torch.testing.assert_close(first, torch.autograd.grad(ref, xd, dy)[0], rtol=1e-9, atol=1e-11)
    # a graph dropped without backward gives its buffer back; the next forward reuses it
    del y
    y = layer(x, eps=1.0)
    buf = next(iter(pool), None)
    del y
    assert len(pool) == 1 and pool[0] is not buf
    check_fused(layer, x, eps=0.25)


def test_fused_after_inference_mode():
    """A buffer pooled under inference_mode is not saved for a later backward (torch refuses
    inference tensors there)."""
    layer = randomize(nkt.WSConv2d(3, 4, 3, dtype=torch.float64))
    x = randn(1, 3, 5, 5).requires_grad_()
    with torch.inference_mode():
        check_fused(layer, x.detach(), backward=False)
    check_fused(layer, x)


def test_fused_double_backward_is_a_clear_error():
    layer = randomize(nkt.WSConv2d(3, 4, 3, padding=1, dtype=torch.float64))
    x = randn(2, 3, 5, 5).requires_grad_()
    y = layer(x)
    dy = randn(*y.shape)
    plain = torch.autograd.grad(y, (x, layer.weight, layer.gain), dy, retain_graph=True)
    twice = torch.autograd.grad(y, (x, layer.weight, layer.gain), dy, create_graph=True)
    for a, b in zip(plain, twice):  # create_graph alone changes nothing
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not differentiable twice"):
        torch.autograd.grad(twice[0].square().sum(), layer.weight)


# --- the core's backward in place (dw = dw_hat), as the fused path calls it ------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last", [((6, 4, 3, 3), False), ((6, 4, 3, 3), True),
                                                 ((512, 257, 3, 3), False)],
                         ids=["small", "channels_last", "over-4MiB"])
def test_core_backward_in_place_equals_separate(dtype, shape, channels_last):
    """dw written over dw_hat equals dw in a separate array, exactly (the 4 MiB float32 case
    would stream dw when separate)."""
    from normkit import _C
    from normkit.torch import _ops
    from normkit.torch._dlpack import dl

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    w = (randn(*shape) * 0.1 + 0.2).to(dtype).contiguous(memory_format=fmt)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    gain = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).to(pd)
    dw_hat = randn(*shape).to(dtype).contiguous(memory_format=fmt)
    for convention in (0, 1, 2):
        _, mean, rstd = _ops._ws_standardize(w, gain, convention, 1e-4)
        dw, dgain = _ops._ws_standardize_backward(dw_hat, w, gain, mean, rstd, convention, 1e-4,
                                                  True, True)
        g, dg = dw_hat.clone(memory_format=fmt), torch.empty_like(gain)
        _C.ws_standardize_backward(dl(g), dl(w), dl(gain), dl(mean), dl(rstd), convention, 1e-4,
                                   dl(g), dl(dg))
        assert torch.equal(g, dw) and torch.equal(dg, dgain)


def test_core_rejects_partial_overlaps():
    from normkit import _C
    from normkit.torch import _ops
    from normkit.torch._dlpack import dl

    w = randn(4, 3, 3, 3)
    _, mean, rstd = _ops._ws_standardize(w, None, 0, 1e-4)
    buf = randn(2 * w.numel())
    dw_hat, shifted = buf[:w.numel()].view(w.shape), buf[1:w.numel() + 1].view(w.shape)
    with pytest.raises(ValueError, match="dw overlaps input dw_hat"):
        _C.ws_standardize_backward(dl(dw_hat), dl(w), None, dl(mean), dl(rstd), 0, 1e-4,
                                   dl(shifted), None)
    with pytest.raises(ValueError, match="dw overlaps input w"):
        _C.ws_standardize_backward(dl(dw_hat), dl(w), None, dl(mean), dl(rstd), 0, 1e-4, dl(w),
                                   None)
    with pytest.raises(ValueError, match="dgain overlaps input mean"):
        _C.ws_standardize_backward(dl(dw_hat), dl(w), None, dl(mean), dl(rstd), 0, 1e-4, None,
                                   dl(mean))
    with pytest.raises(ValueError, match="w_hat overlaps input w"):
        _C.ws_standardize_forward(dl(dw_hat), None, 0, 1e-4, dl(shifted), dl(mean), dl(rstd))
