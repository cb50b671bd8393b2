"""normkit.torch under torch.compile and torch.export: torch.library.opcheck of every custom op of
normkit.torch._ops; one small model holding every normkit.torch layer compiled with
fullgraph=True (no graph break possible) in training (forward and backward, static and dynamic
shapes) and eval, against the same model run eagerly; the functions compiled alike; the model
exported with torch.export in eval. Compiles are slow on a small machine, so one model and one
function carry all layers and functions, with small shapes."""
import copy

import pytest
import torch

import normkit.torch as nkt
from torch_helpers import DEVICES

torch_ops = torch.ops.normkit


def _randn(*shape, seed, device="cpu", dtype=torch.float64, offset=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) + offset).to(device)


# --- opcheck --------------------------------------------------------------------------------------

def _bn_inputs(device, channels_last, grad):
    x = _randn(3, 5, 4, 3, seed=1, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, mean = (_randn(5, seed=s, device=device) for s in (2, 3, 4))
    invstd = _randn(5, seed=5, device=device).abs() + 0.5
    for t in (x, w, b, mean, invstd):
        t.requires_grad_(grad)
    return x, w, b, mean, invstd


def _enc_inputs(device, n_major, grad):
    """X (B, N, D) = (2, 7, 3), contiguous or a (B, D, N) tensor seen transposed; C (4, 3); s."""
    X = _randn(2, 3, 7, seed=6, device=device).transpose(1, 2) if n_major else \
        _randn(2, 7, 3, seed=6, device=device)
    C = _randn(4, 3, seed=7, device=device)
    s = -_randn(4, seed=8, device=device).abs()
    for t in (X, C, s):
        t.requires_grad_(grad)
    return X, C, s


def _gn_cases(device, channels_last):
    """Group norm ops on x (3, 6, 4, 3) in 3 groups; affine/elemt with per-channel (N, C)
    coefficients, as instance norm's eval uses them."""
    x = _randn(3, 6, 4, 3, seed=31, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _randn(6, seed=32, device=device), _randn(6, seed=33, device=device)
    dy = _randn(*x.shape, seed=34, device=device)
    _, mean, _, rstd = torch_ops.group_norm_train(x, 3, w, b, 1e-5)
    mc, scale, shift = (_randn(3, 6, seed=s, device=device) for s in (35, 36, 37))
    xg, wg, bg, mcg, scg, shg = (t.clone().requires_grad_() for t in (x, w, b, mc, scale, shift))
    return [
        ("group_norm_train", (xg, 3, wg, bg, 1e-5)),
        ("group_norm_train", (xg, 6, None, None, 1e-3)),
        ("group_norm_train_backward", (dy, x, mean, rstd, w, True)),
        ("group_norm_train_backward", (dy, x, mean, rstd, None, False)),
        ("group_norm_affine", (xg, mcg, scg, shg)),
        ("group_norm_backward_reduce", (dy, x, mean)),
        ("group_norm_backward_elemt", (dy, x, mc, scale)),
        ("group_norm_stats", (x, 3)),
        ("group_norm_stats", (x, 6)),
    ]


def _ws_cases(device, channels_last):
    """Weight standardization of a (5, 3, 3, 2) weight in every convention (0, 1, 2)."""
    w = _randn(5, 3, 3, 2, seed=41, device=device)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    gain = _randn(5, seed=42, device=device)
    dw_hat = _randn(*w.shape, seed=43, device=device)
    _, mean, rstd = torch_ops.ws_standardize(w, gain, 0, 1e-4)
    wg, gg = w.clone().requires_grad_(), gain.clone().requires_grad_()
    return [
        ("ws_standardize", (wg, gg, 0, 1e-4)),
        ("ws_standardize", (wg, None, 1, 1e-4)),
        ("ws_standardize", (wg, gg, 2, 1e-6)),
        ("ws_standardize_backward", (dw_hat, w, gain, mean, rstd, 0, 1e-4, True, True)),
        ("ws_standardize_backward", (dw_hat, w, None, mean, rstd, 0, 1e-4, True, False)),
        ("ws_standardize_backward", (dw_hat, w, gain, mean, rstd, 0, 1e-4, False, True)),
    ]


def _opcheck_cases(device, layout):
    cl = layout == "strided"
    x, w, b, mean, invstd = _bn_inputs(device, cl, True)
    xd, wd, _, md, isd = (t.detach() for t in (x, w, b, mean, invstd))
    dy = _randn(*x.shape, seed=9, device=device)
    # StochNorm's choice: channels 0, 2, 3 on batch statistics, 1 and 4 on the running ones
    use_batch = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=x.dtype, device=device)
    X, C, s = _enc_inputs(device, cl, True)
    Xd, Cd, sd = (t.detach() for t in (X, C, s))
    SL, D2 = torch_ops.scaled_l2(Xd, Cd, sd)
    E, A, D2e = torch_ops.encoding(Xd, Cd, sd)
    return [
        ("batch_norm_train", (x, w, b, 1e-5)),
        ("batch_norm_train", (x, None, None, 1e-3)),
        ("batch_norm_train_backward", (dy, xd, md, isd, wd, True)),
        ("batch_norm_train_backward", (dy, xd, md, isd, None, False)),
        ("batch_norm_train_masked", (x, w, b, use_batch, md, isd, 1e-5)),
        ("batch_norm_train_masked", (x, None, None, use_batch, md, isd, 1e-3)),
        ("batch_norm_train_masked_backward", (dy, xd, md, isd, wd, use_batch, True)),
        ("batch_norm_train_masked_backward", (dy, xd, md, isd, None, use_batch, False)),
        ("batch_norm_stats", (xd,)),
        ("batch_norm_normalize", (x, mean, invstd, w, b)),
        ("batch_norm_normalize", (x, mean, invstd, None, None)),
        ("batch_norm_backward_reduce", (dy, xd, md)),
        ("batch_norm_backward_elemt", (dy, xd, md, isd, wd, md, isd, 50.0)),
        ("batch_norm_backward_elemt", (dy, xd, md, isd, None, None, None, 0.0)),
        ("scaled_l2", (X, C, s)),
        ("scaled_l2_backward", (torch.randn_like(SL), Xd, Cd, sd, D2, True, True)),
        ("scaled_l2_backward", (torch.randn_like(SL), Xd, Cd, sd, D2, False, False)),
        ("encoding", (X, C, s)),
        ("encoding_backward", (torch.randn_like(E), Xd, Cd, sd, A, D2e, True, True)),
        ("encoding_backward", (torch.randn_like(E), Xd, Cd, sd, A, D2e, False, True)),
        *_gn_cases(device, cl),
        *_ws_cases(device, cl),
    ]


OPS = ["batch_norm_train", "batch_norm_train_backward", "batch_norm_train_masked",
       "batch_norm_train_masked_backward", "batch_norm_stats", "batch_norm_normalize",
       "batch_norm_backward_reduce", "batch_norm_backward_elemt", "scaled_l2",
       "scaled_l2_backward", "encoding", "encoding_backward", "group_norm_train",
       "group_norm_train_backward", "group_norm_affine", "group_norm_backward_reduce",
       "group_norm_backward_elemt", "group_norm_stats", "ws_standardize",
       "ws_standardize_backward"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_opcheck_every_op(device, layout):
    """schema, fake kernel (shapes, dtypes and strides against the real one), autograd
    registration and AOT dispatch with dynamic shapes, for every op, in the channels-first and
    channels-last (BN) / N-major (Encoding) layouts."""
    cases = _opcheck_cases(device, layout)
    assert sorted({name for name, _ in cases}) == sorted(OPS)
    for name, args in cases:
        torch.library.opcheck(getattr(torch_ops, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_draw_ops(device):
    """The seeded draw ops: schema, autograd registration (nothing differentiable) and fake
    kernels for every case; AOT dispatch (which compares a compiled call's outputs with an eager
    one's, two different draws) only where the draw is deterministic, an inactive MixStyle call.
    That compiled draws equal eager's is tested on the layers below."""
    like = _randn(4, 3, 5, seed=1, device=device).requires_grad_()
    g = torch.Generator().manual_seed(0)  # held: the registry keeps no generator alive
    key = nkt._ops.generator_key(g)
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in [(like, 0, torch.device("cpu"), [3]), (like, key, like.device, [4, 3, 5])]:
        torch.library.opcheck(torch_ops.draw_uniform.default, args, test_utils=no_aot)
    for args in [(like, 0, 1.0, 0.2, 4, False), (like, key, 1.0, 0.2, 5, True)]:
        torch.library.opcheck(torch_ops.mixstyle_draw.default, args, test_utils=no_aot)
    torch.library.opcheck(torch_ops.mixstyle_draw.default, (like, key, 0.0, 0.2, 4, True))


def test_allreduce_sum_op():
    """normkit::allreduce_sum (a compiled SyncBatchNorm's all-reduce over a normkit
    communicator): opcheck, the sum from the registered communicator's all-reduce into a new
    tensor, and a clear error for a communicator that was never registered or no longer exists."""
    comm = Twin()
    key = nkt._ops.communicator_key(comm)
    x = _randn(7, seed=2)
    torch.library.opcheck(torch_ops.allreduce_sum.default, (x, key, "test"))
    y = torch_ops.allreduce_sum(x, key, "SyncBatchNorm(7) forward")
    assert torch.equal(y, 2 * x) and y.data_ptr() != x.data_ptr()
    with pytest.raises(RuntimeError, match=r"^SyncBatchNorm\(7\) forward: the communicator"):
        torch_ops.allreduce_sum(x, key + 1, "SyncBatchNorm(7) forward")
    del comm
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch_ops.allreduce_sum(x, key, "test")


class Solo(nkt.TorchCommunicator):
    """One rank, without torch.distributed: the all-gather returns this rank's rows (counted)."""
    rank, size, debug, group = 0, 1, False, None

    def __init__(self):
        self.gathers = 0

    def allgather(self, array):
        self.gathers += 1
        return array.clone()


def test_mixstyle_cross_rank_op():
    """normkit::mixstyle_cross_rank (a compiled cross-rank MixStyle's gate, all-gather, draws and
    coefficients): opcheck without AOT dispatch (it draws); over one rank the coefficients of
    the draws an eager layer makes from the same generator state (gate, lam, perm); an inactive
    gate issues no all-gather and gives the identity's coefficients."""
    comm = Solo()
    key = nkt._ops.communicator_key(comm)
    g = torch.Generator()
    gkey = nkt._ops.generator_key(g)
    mu, sig = _randn(5, 3, seed=4), _randn(5, 3, seed=5).abs() + 0.5
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch_ops.mixstyle_cross_rank.default,
                          (mu, sig, key, gkey, 1.0, 0.1, False), test_utils=no_aot)
    for crossdomain in (False, True):
        ref = torch.Generator().manual_seed(11)
        g.manual_seed(11)
        torch.rand((), generator=ref)  # the gate
        perm, lam = nkt._ops.mix_draws(ref, 0.1, 5, crossdomain)
        want = nkt.mixstyle._coefficients(mu, sig, mu, sig, slice(None), perm, lam.to(mu.dtype))
        active, scale, shift = torch_ops.mixstyle_cross_rank(mu, sig, key, gkey, 1.0, 0.1,
                                                             crossdomain)
        assert bool(active)
        torch.testing.assert_close(scale, want[0])
        torch.testing.assert_close(shift, want[1])
    gathers = comm.gathers
    active, scale, shift = torch_ops.mixstyle_cross_rank(mu, sig, key, gkey, 0.0, 0.1, False)
    assert not bool(active) and comm.gathers == gathers
    assert torch.equal(scale, torch.ones_like(mu)) and torch.equal(shift, mu)


def test_draw_ops_draw_what_eager_layers_draw():
    """draw_uniform and mixstyle_draw take the generator's next numbers, as the eager layers'
    torch.rand / _sample_dirichlet / randperm calls do; an inactive call draws only its gate."""
    g, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    key = nkt._ops.generator_key(g)
    like = torch.empty(0, dtype=torch.float64)
    assert torch.equal(torch_ops.draw_uniform(like, key, like.device, [2, 3]),
                       torch.rand(2, 3, generator=ref))
    active, perm, lam = torch_ops.mixstyle_draw(like, key, 1.0, 0.3, 5, False)
    assert bool(active) and float(torch.rand((), generator=ref)) < 1.0
    lam_ref = torch._sample_dirichlet(torch.full((5, 2), 0.3, dtype=torch.float64),
                                      generator=ref)[:, 0]
    assert torch.equal(lam, lam_ref) and torch.equal(perm, torch.randperm(5, generator=ref))
    active, perm, lam = torch_ops.mixstyle_draw(like, key, 0.0, 0.3, 5, True)
    torch.rand((), generator=ref)
    assert not bool(active) and torch.equal(perm, torch.arange(5))
    assert torch.equal(lam, torch.ones(5, dtype=torch.float64))
    assert torch.equal(g.get_state(), ref.get_state())


def test_backward_ops_refuse_double_backward():
    x = _randn(4, 3, seed=1).requires_grad_()
    y = nkt.batch_norm(x, None, None, None, None, True)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        dx.sum().backward()


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that reach the dispatcher, as a FLOP counter or a tracer sees them."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_eager_fast_paths_equal_the_ops_and_dispatch_modes_see_the_ops(grad):
    """Eager calls skip the ops' dispatch (kernels called directly, or one-output Functions); under
    a dispatch mode they go through torch.ops.normkit, with the same results (batch norm's
    running statistics too: the eager kernel updates them, the op path with torch ops)."""
    x = _randn(4, 6, 5, 3, seed=11, dtype=torch.float32).contiguous(
        memory_format=torch.channels_last)
    modules = (nkt.BatchNorm2d(6), nkt.GroupNorm(3, 6),
               nkt.InstanceNorm2d(6, affine=True, track_running_stats=True))
    expect = ("normkit::batch_norm_train", "normkit::batch_norm_normalize",
              "normkit::group_norm_train", "normkit::group_norm_train",
              "normkit::group_norm_affine")
    results = []
    for mode in (None, _OpRecorder()):
        outs = []
        for m in copy.deepcopy(modules):
            for training in (True, False):
                if not training and isinstance(m, nkt.GroupNorm):
                    continue
                m.train(training)
                xi = x.clone().requires_grad_(grad)
                with torch.enable_grad() if grad else torch.no_grad():
                    if mode is None:
                        y = m(xi)
                    else:
                        with mode:
                            y = m(xi)
                    outs.append(y.detach())
                    if grad:
                        outs += torch.autograd.grad(y, (xi, m.weight), y.detach().cos())
                outs += [t.clone() for t in m.buffers()]
        results.append(outs)
        if mode is not None:
            assert set(expect) <= mode.names
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# --- every layer in one model ---------------------------------------------------------------------

class AllLayers(torch.nn.Module):
    """Conv2d -> BatchNorm2d -> SyncBatchNorm (no group: a plain batch norm) -> y; then
    Inspiration(y) (target from GramMatrix(y)), BatchNorm3d(UpsampleConv2d(y)) and
    BatchNorm1d(Encoding(y)).

    Inspiration does not feed UpsampleConv2d: that chain of torch ops alone (matmul, reshape,
    conv2d, pixel_shuffle; no normkit op) fails in torch 2.13's inductor with dynamic shapes
    ("cannot determine truth value of Relational" while ordering strides)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn2 = nkt.BatchNorm2d(6)
        self.sync = nkt.SyncBatchNorm(6)
        self.gram = nkt.GramMatrix()
        self.insp = nkt.Inspiration(6)
        self.up = nkt.UpsampleConv2d(6, 2, 3, padding=1, scale_factor=2)
        self.bn3 = nkt.BatchNorm3d(2)
        self.enc = nkt.Encoding(6, 4)
        self.bn1 = nkt.BatchNorm1d(4)

    def forward(self, x):
        y = self.sync(torch.relu(self.bn2(self.conv(x))))
        self.insp.set_target(self.gram(y).detach()[:1])
        z = self.bn3(self.up(y).unsqueeze(2))
        return self.insp(y), z, self.bn1(self.enc(y))


def _model():
    torch.manual_seed(0)
    m = AllLayers().double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    return m


def _step(model, x, seed):
    """Outputs, input and parameter gradients of a weighted sum of the outputs."""
    x = x.detach().requires_grad_()
    outs = model(x)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return [o.detach() for o in outs], grads


def _assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def _assert_same_state(a, b):
    _assert_same(list(a.state_dict().values()), list(b.state_dict().values()))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-channels_last", "dynamic"])
def test_compile_every_layer_training(dynamic):
    """fullgraph=True (a graph break is an error) forward and backward in training, equal to eager
    (outputs, gradients, running statistics): static shapes with a channels_last input, dynamic
    shapes with two batch sizes and spatial sizes of a channels-first input."""
    torch._dynamo.reset()
    eager, model = _model(), _model()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    shapes = [(3, 3, 5, 4), (4, 3, 6, 3)] if dynamic else [(3, 3, 5, 4)]
    fmt = torch.contiguous_format if dynamic else torch.channels_last
    for i, shape in enumerate(shapes):
        x = _randn(*shape, seed=10 + i).contiguous(memory_format=fmt)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)
    assert int(model.bn2.num_batches_tracked) == len(shapes)


def test_compile_every_layer_eval_and_export():
    """Eval: compiled with dynamic shapes (forward and input/parameter gradients) and exported
    with torch.export.export, both equal to eager; the running statistics stay untouched."""
    torch._dynamo.reset()
    eager = _model()
    _step(eager, _randn(5, 3, 5, 4, seed=1), 0)  # running statistics that are not the defaults
    eager.eval()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for i, shape in enumerate([(2, 3, 5, 4), (3, 3, 6, 5)]):
        x = _randn(*shape, seed=20 + i)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)

    x = _randn(2, 3, 5, 4, seed=30)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"normkit.batch_norm_normalize.default", "normkit.encoding.default"} <= targets
    with torch.no_grad():
        _assert_same(program.module()(x), eager(x))


class PerSampleAndWSLayers(torch.nn.Module):
    """The group-norm family (GroupNorm, InstanceNorm1d/2d/3d, InstanceBatchNorm2d) and the
    weight-standardized convolutions (WSConv1d/2d/3d, WSConvTranspose2d/3d, FWS) in one model;
    InstanceNorm2d and InstanceNorm1d track running statistics (eval runs group_norm_affine)."""

    def __init__(self):
        super().__init__()
        self.ws2 = nkt.WSConv2d(3, 6, 3, padding=1)
        self.gn = nkt.GroupNorm(3, 6)
        self.ibn = nkt.InstanceBatchNorm2d(6, 0.5)
        self.in2 = nkt.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.wst2 = nkt.WSConvTranspose2d(6, 4, 2, stride=2, convention="timm")
        self.fws = nkt.FWS(torch.nn.Conv2d(4, 4, 1), const_eval=True)
        self.in1 = nkt.InstanceNorm1d(4, track_running_stats=True)
        self.ws1 = nkt.WSConv1d(4, 3, 3, convention="nfnet")
        self.in3 = nkt.InstanceNorm3d(4, affine=True)
        self.ws3 = nkt.WSConv3d(4, 2, 1)
        self.wst3 = nkt.WSConvTranspose3d(2, 2, 1)

    def forward(self, x):
        y = self.in2(self.ibn(torch.relu(self.gn(self.ws2(x)))))
        z = self.fws(self.wst2(y))
        return self.ws1(self.in1(z.flatten(2))), self.wst3(self.ws3(self.in3(z.unsqueeze(2))))


def _per_sample_model():
    torch.manual_seed(0)
    m = PerSampleAndWSLayers().double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()
            elif not name.endswith("weight") or p.dim() == 1:  # norm weights and WS gains
                p.uniform_(0.5, 1.5)
    return m


def test_compile_per_sample_and_ws_layers_training():
    """fullgraph=True, dynamic shapes, training (forward and backward) with channels_last inputs
    of two batch and spatial sizes: outputs, gradients, running statistics and FWS's standardized
    weight equal eager's."""
    torch._dynamo.reset()
    eager, model = _per_sample_model(), _per_sample_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for i, shape in enumerate([(3, 3, 5, 4), (4, 3, 6, 3)]):
        x = _randn(*shape, seed=40 + i).contiguous(memory_format=torch.channels_last)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)
    assert int(model.in2.num_batches_tracked) == 2


def test_compile_per_sample_and_ws_layers_eval_and_export():
    """Eval (running statistics of the instance norms, FWS's stored weight): compiled with
    dynamic shapes and exported with torch.export.export, both equal to eager."""
    torch._dynamo.reset()
    eager = _per_sample_model()
    _step(eager, _randn(5, 3, 5, 4, seed=1), 0)  # running statistics that are not the defaults
    eager.eval()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for i, shape in enumerate([(2, 3, 5, 4), (3, 3, 6, 5)]):
        x = _randn(*shape, seed=50 + i)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)

    x = _randn(2, 3, 5, 4, seed=60)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"normkit.group_norm_train.default", "normkit.group_norm_affine.default",
            "normkit.ws_standardize.default"} <= targets
    with torch.no_grad():
        _assert_same(program.module()(x), eager(x))


class StochasticBackbone(torch.nn.Module):
    """Conv2d -> StochNorm2d -> MixStyle (random) -> StochNorm3d -> MixStyle (crossdomain) ->
    StochNorm1d, every layer drawing from one generator (so the compiled draws must come in
    eager's order too)."""
    out_features = 6

    def __init__(self, generator):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.sn2 = nkt.StochNorm2d(6, p=0.5, generator=generator)
        self.mix = nkt.MixStyle(p=0.6, alpha=0.3, generator=generator)
        self.sn3 = nkt.StochNorm3d(6, p=0.3, generator=generator)
        self.cross = nkt.MixStyle(p=0.6, alpha=0.3, mix="crossdomain", generator=generator)
        self.sn1 = nkt.StochNorm1d(6, p=0.7, generator=generator)

    def forward(self, x):
        y = self.mix(torch.relu(self.sn2(self.conv(x))))
        y = self.cross(self.sn3(y.unsqueeze(2)).squeeze(2))
        return self.sn1(y.flatten(2)).view(y.shape)


class StochasticLayers(torch.nn.Module):
    """The backbone in AFN's ImageClassifier (two Blocks with dropout from the same generator),
    and the AFN loss of the features in training (stepwise and hard)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cls = nkt.ImageClassifier(StochasticBackbone(g), 3, num_blocks=2, bottleneck_dim=5,
                                       dropout_p=0.3, generator=g)
        self.afn = nkt.AdaptiveFeatureNorm(0.5)
        self.hafn = nkt.AdaptiveFeatureNorm(radius=2.0, mode="hard")
        self.generator = g

    def forward(self, x):
        if not self.training:
            return (self.cls(x),)
        predictions, f = self.cls(x)
        return predictions, f, self.afn(f) + self.hafn(f)


def _stochastic_model(seed=0):
    torch.manual_seed(0)
    m = StochasticLayers(seed).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.bias.normal_()
    return m


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-channels_last", "dynamic"])
def test_compile_stochastic_layers_training(dynamic):
    """StochNorm1d/2d/3d, MixStyle (both modes), Block, ImageClassifier and AdaptiveFeatureNorm
    under explain (no graph break) and fullgraph=True in training, forward and backward: with
    generators seeded alike, the compiled model draws eager's numbers, so outputs, gradients,
    running statistics and the generator's final state are eager's (within float64 rounding:
    inductor evaluates the small torch ops in its own order)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_stochastic_model())(_randn(3, 3, 5, 4, seed=9))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    eager, model = _stochastic_model(), _stochastic_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    shapes = [(3, 3, 5, 4), (4, 3, 6, 3), (5, 3, 4, 4)] if dynamic else [(3, 3, 5, 4)] * 3
    fmt = torch.contiguous_format if dynamic else torch.channels_last
    for i, shape in enumerate(shapes):
        x = _randn(*shape, seed=70 + i).contiguous(memory_format=fmt)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)
    assert torch.equal(model.generator.get_state(), eager.generator.get_state())
    assert int(model.cls.backbone.sn2.num_batches_tracked) == len(shapes)


def test_compile_mixstyle_gate():
    """A compiled MixStyle (p = 0.5, fullgraph, dynamic) over many calls: the calls the gate
    leaves alone return x exactly, the others mix, both occur, and each equals eager's call."""
    torch._dynamo.reset()
    layers = [nkt.MixStyle(p=0.5, alpha=0.2, generator=torch.Generator().manual_seed(1))
              for _ in range(2)]
    compiled = torch.compile(layers[0], fullgraph=True, dynamic=True)
    mixed = []
    for i in range(8):
        x = _randn(4 + i % 2, 3, 5, seed=80 + i)
        y, want = compiled(x), layers[1](x)
        _assert_same([y], [want])
        mixed.append(not torch.equal(y, x))
        assert mixed[-1] == (layers[1].last_draw is not None)
        layers[1].last_draw = None
    assert any(mixed) and not all(mixed)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_compile_stochnorm_p_extremes(p):
    """p = 1: the compiled StochNorm2d is training batch norm (torch's); p = 0: it normalizes
    with the running statistics (torch's eval batch norm before the update), and both update
    the running statistics as batch norm."""
    torch._dynamo.reset()
    sn, bn = nkt.StochNorm2d(4, p=p).double(), torch.nn.BatchNorm2d(4).double()
    bn.load_state_dict(sn.state_dict())
    compiled = torch.compile(sn, fullgraph=True)
    for i in range(2):
        x = _randn(3, 4, 5, 2, seed=90 + i)
        if p == 0.0:
            want = torch.nn.functional.batch_norm(x, bn.running_mean.clone(),
                                                  bn.running_var.clone(), bn.weight, bn.bias)
            bn(x)
        else:
            want = bn(x)
        _assert_same([compiled(x)], [want])
        _assert_same_state(sn, bn)


def test_compile_stochastic_layers_eval_and_export():
    """Eval (StochNorm's running statistics, MixStyle the identity, no dropout): compiled with
    dynamic shapes and exported with torch.export.export, both equal to eager."""
    torch._dynamo.reset()
    eager = _stochastic_model()
    _step(eager, _randn(5, 3, 5, 4, seed=1), 0)  # running statistics that are not the defaults
    eager.eval()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for i, shape in enumerate([(2, 3, 5, 4), (3, 3, 6, 5)]):
        x = _randn(*shape, seed=100 + i)
        for a, e in zip(_step(compiled, x, i), _step(eager, x, i), strict=True):
            _assert_same(a, e)
    _assert_same_state(model, eager)

    x = _randn(2, 3, 5, 4, seed=110)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "normkit.batch_norm_normalize.default" in targets
    with torch.no_grad():
        _assert_same(program.module()(x), eager(x))


def _all_functions(x, w, b, rm, rv, mean, std, X, C, s):
    y = nkt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    y = y + nkt.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    y = y + nkt.batchnormtrain(x, w, b, mean, std) + nkt.batchnormeval(x, w, b, mean, std)
    A = torch.softmax(nkt.scaled_l2(X, C, s), dim=2)
    E = nkt.aggregate(A, X, C) + nkt.encoding(X, C, s)
    return y, E


def test_compile_every_function():
    """batch_norm (train and eval), batchnormtrain/eval, scaled_l2, aggregate, encoding compiled
    with fullgraph=True and dynamic shapes: values and gradients to every input equal eager's."""
    torch._dynamo.reset()
    compiled = torch.compile(_all_functions, fullgraph=True, dynamic=True)

    def run(fn, seed):
        x = _randn(4, 3, 5, seed=seed).contiguous(memory_format=torch.contiguous_format)
        w, b, mean = (_randn(3, seed=seed + k) for k in (1, 2, 3))
        std = _randn(3, seed=seed + 4).abs() + 0.5
        rm, rv = _randn(3, seed=seed + 5), _randn(3, seed=seed + 6).abs() + 0.5
        X, C, s = _enc_inputs("cpu", seed % 2 == 0, False)
        leaves = [x, w, b, mean, std, X, C, s]
        for t in leaves:
            t.requires_grad_()
        outs = fn(x, w, b, rm, rv, mean, std, X, C, s)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        return [o.detach() for o in outs], torch.autograd.grad(loss, leaves), (rm, rv)

    for seed in (1, 2):
        torch.manual_seed(seed)
        got = run(compiled, seed)
        torch.manual_seed(seed)
        want = run(_all_functions, seed)
        for a, e in zip(got, want, strict=True):
            _assert_same(a, e)


# --- to_torch -------------------------------------------------------------------------------------

def test_to_torch_round_trip():
    """Every normkit batch norm becomes torch's own class; outputs (train and eval), gradients,
    state_dicts and running-statistic updates are equal; the original model is untouched."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), nkt.BatchNorm2d(6), torch.nn.ReLU(),
                                nkt.SyncBatchNorm(6), torch.nn.Flatten(2), nkt.BatchNorm1d(6),
                                nkt.GramMatrix()).double()
    bn3 = nkt.BatchNorm3d(2, affine=False, momentum=None).double()
    for m in (model, bn3):
        converted = nkt.to_torch(m)
        kinds = {type(mod) for mod in converted.modules()}
        assert not any(k in nkt.convert.TORCH_EQUIVALENTS for k in kinds)
        for training in (True, False):
            m.train(training), converted.train(training)
            shape = (4, 3, 6, 5) if m is model else (3, 2, 3, 4, 2)
            x = _randn(*shape, seed=2)
            got, want = _step(converted, x, 1), _step(m, x, 1)
            for a, e in zip(got, want, strict=True):
                _assert_same(a, e)
            assert converted.state_dict().keys() == m.state_dict().keys()
            _assert_same_state(converted, m)
    assert type(nkt.to_torch(model)[3]) is torch.nn.SyncBatchNorm
    assert type(model[1]) is nkt.BatchNorm2d


def test_to_torch_per_sample_layers():
    """GroupNorm and InstanceNorm*d become torch's classes, InstanceBatchNorm2d stays with its IN
    and BN children converted; outputs and gradients (train and eval), parameters, running
    statistics and state_dict keys equal. num_batches_tracked is left out of the comparison after
    training: normkit's instance norms count it, torch's do not (LAYERS.md)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), nkt.GroupNorm(3, 6), nkt.InstanceBatchNorm2d(6, 0.4),
        nkt.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=0.3),
        torch.nn.Flatten(2), nkt.InstanceNorm1d(6, track_running_stats=True),
        torch.nn.Unflatten(2, (1, 4, 5)), nkt.InstanceNorm3d(6, affine=True, bias=False),
        nkt.GroupNorm(2, 6, affine=False)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_()
    converted = nkt.to_torch(model)
    expected = [torch.nn.GroupNorm, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm1d,
                torch.nn.InstanceNorm3d, torch.nn.GroupNorm]
    assert [type(converted[i]) for i in (1, 3, 5, 7, 8)] == expected
    assert type(converted[2]) is nkt.InstanceBatchNorm2d
    assert type(converted[2].IN) is torch.nn.InstanceNorm2d
    assert type(converted[2].BN) is torch.nn.BatchNorm2d
    assert converted[3].momentum == 0.3 and converted[7].bias is None
    _assert_same_state(converted, model)
    for step, training in enumerate((True, True, False)):
        model.train(training), converted.train(training)
        x = _randn(4, 3, 6, 7, seed=3 + step)
        got, want = _step(converted, x, step), _step(model, x, step)
        for a, e in zip(got, want, strict=True):
            _assert_same(a, e)
        assert converted.state_dict().keys() == model.state_dict().keys()
        counted = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
        _assert_same([v for k, v in converted.state_dict().items() if k not in counted],
                     [v for k, v in model.state_dict().items() if k not in counted])
    assert int(model[3].num_batches_tracked) == 2


def test_to_torch_names_ws_layers():
    """WSConv*d and FWS have no torch equivalent: a clear error naming the layer."""
    with pytest.raises(ValueError, match=r"^to_torch: 1 is a normkit WSConv2d, which has no"):
        nkt.to_torch(torch.nn.Sequential(nkt.GroupNorm(1, 3), nkt.WSConv2d(3, 4, 3)))
    with pytest.raises(ValueError, match=r"^to_torch: the model is a normkit FWS, which has no"):
        nkt.to_torch(nkt.FWS(torch.nn.Conv2d(3, 4, 1)))


def test_to_torch_names_layers_without_equivalent():
    model = torch.nn.Sequential(nkt.BatchNorm2d(4), torch.nn.Sequential(nkt.Encoding(4, 3)))
    with pytest.raises(ValueError, match=r"1\.0 is a normkit Encoding, which has no torch"):
        nkt.to_torch(model)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        nkt.to_torch("model")


# --- bfloat16 on the CPU --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bfloat16_batch_norm_matches_float32(training, fmt):
    """bfloat16 input, float32 parameters and statistics: output and input gradient in bfloat16
    within bfloat16 rounding of a float32 computation on the same (bfloat16) values; parameter
    gradients and running statistics float32, as torch's."""
    x32 = _randn(5, 7, 3, 9, seed=3, dtype=torch.float32, offset=2.0) * 3
    x = x32.bfloat16().contiguous(memory_format=fmt)
    dy = _randn(*x.shape, seed=4, dtype=torch.float32).bfloat16()
    bn, ref = nkt.BatchNorm2d(7), torch.nn.BatchNorm2d(7)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(_randn(7, seed=5, dtype=torch.float32))
            m.bias.copy_(_randn(7, seed=6, dtype=torch.float32))
            m.running_var.fill_(1.7)
    bn.train(training), ref.train(training)
    xg, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    y, y_ref = bn(xg), ref(xr)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=2e-2)
    y.backward(dy), y_ref.backward(dy.float())
    assert xg.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.float32
    torch.testing.assert_close(xg.grad.float(), xr.grad, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_to_nearest_even():
    """The store of a bfloat16 output rounds the float32 result to nearest even (as torch's
    .bfloat16()): compared exactly with the float32 result of the same formula, rounded."""
    x = _randn(4, 3, 37, seed=7, dtype=torch.float32).bfloat16()
    mean, std = _randn(3, seed=8, dtype=torch.float32), _randn(3, seed=9, dtype=torch.float32).abs()
    g, b = _randn(3, seed=10, dtype=torch.float32), _randn(3, seed=11, dtype=torch.float32)
    y = nkt.batchnormeval(x, g, b, mean, std)
    ref = (x.float() - mean[:, None]) * (1 / std[:, None] * g[:, None]) + b[:, None]
    mismatch = (y != ref.bfloat16()).float().mean()
    assert y.dtype == torch.bfloat16 and mismatch < 0.01  # float32 evaluation order may differ


def test_cpu_autocast():
    """Under CPU autocast (bfloat16) a Conv2d -> BatchNorm2d model gives torch's result and
    dtype; the layer keeps float32 parameters."""
    conv = torch.nn.Conv2d(3, 5, 3)
    bn, ref = nkt.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    x = _randn(4, 3, 7, 6, seed=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = bn(conv(x)), ref(conv(x))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-4, atol=1e-5)


def test_errors_name_the_layer_not_a_kernel():
    with pytest.raises(TypeError, match="^batch_norm: input has dtype torch.int64"):
        nkt.BatchNorm2d(3)(torch.arange(36).reshape(2, 3, 2, 3))
    with pytest.raises(TypeError, match="^BatchNorm2d: torch.float64 input needs"):
        nkt.BatchNorm2d(3)(_randn(2, 3, 2, 2, seed=1))


# --- SyncBatchNorm without host synchronization ---------------------------------------------------

class Twin(nkt.TorchCommunicator):
    """Two identical ranks, without torch.distributed: the all-reduce doubles the tensor in place
    with a torch op (so a CUDA graph can capture it)."""
    rank, size, debug, group = 0, 2, False, None

    def __init__(self):
        pass

    def allreduce_sum(self, array):
        return array.mul_(2)


@pytest.mark.parametrize("device", DEVICES)
def test_sync_batch_norm_two_identical_ranks(device):
    """Two ranks with the same batch normalize as one rank does; running_var uses the global
    count 2n - 1; dx (of both ranks' losses over the global statistics) is the single-rank dx."""
    x = _randn(3, 4, 5, seed=13, device=device)
    dy = _randn(3, 4, 5, seed=14, device=device)
    sync, plain = nkt.SyncBatchNorm(4, comm=Twin()).double().to(device), \
        nkt.BatchNorm1d(4).double().to(device)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = sync(xs), plain(xp)
    torch.testing.assert_close(y, y_ref)
    y.backward(dy), y_ref.backward(dy)
    torch.testing.assert_close(xs.grad, xp.grad)
    var = x.transpose(0, 1).reshape(4, -1).var(1, unbiased=False)
    torch.testing.assert_close(sync.running_var, 0.9 + 0.1 * var * 30 / 29)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sync_batch_norm_device_count_path(channels_last, monkeypatch):
    """The eager path of CUDA tensors (the global count on the device, no host value), forced on
    CPU tensors over two identical ranks: the host-count path's outputs, gradients, running
    statistics and shift, over three steps, without reaching the host-count functions."""
    from normkit.torch import sync_batchnorm as nk_sync
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    host = nkt.SyncBatchNorm(4, comm=Twin()).double()
    with torch.no_grad():
        host.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(17))
        host.bias.normal_(generator=torch.Generator().manual_seed(18))
    device = copy.deepcopy(host)
    for step in range(3):
        x = (_randn(5, 4, 3, 2, seed=20 + step) * 3 + 2).contiguous(memory_format=fmt)
        dy = _randn(5, 4, 3, 2, seed=30 + step)
        xh, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_host = host(xh)
        y_host.backward(dy)
        with monkeypatch.context() as m:
            m.setattr(nk_sync.SyncBatchNorm, "_counts_on_device", staticmethod(lambda x: True))
            m.setattr(nk_sync, "sync_batch_norm", None)  # calling it would be a TypeError
            y_dev = device(xd)
            y_dev.backward(dy)
        assert y_dev.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y_dev, y_host, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xd.grad, xh.grad, rtol=1e-10, atol=1e-12)
        for a, b in ((device.weight.grad, host.weight.grad), (device.bias.grad, host.bias.grad),
                     (device.running_mean, host.running_mean),
                     (device.running_var, host.running_var), (device._shift, host._shift)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert int(device.num_batches_tracked) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
def test_sync_batch_norm_step_captures_in_a_cuda_graph():
    """A synchronized forward+backward has no host synchronization: it is captured in a CUDA
    graph and replays to the eager result."""
    import normkit
    if not normkit.cuda_available():
        pytest.skip("normkit was built without CUDA kernels")
    x = _randn(8, 4, 6, seed=15, device="cuda", dtype=torch.float32).requires_grad_()
    dy = _randn(8, 4, 6, seed=16, device="cuda", dtype=torch.float32)
    layer = nkt.SyncBatchNorm(4, comm=Twin()).cuda()
    eager = copy.deepcopy(layer)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, kernels)
        layer(x).backward(dy)
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    xe = x.detach().clone().requires_grad_()
    eager(xe)  # the warm-up step's update
    y_ref = eager(xe)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, xe.grad)
