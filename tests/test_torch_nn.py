"""normkit.torch's modules against torch.nn's: several training steps then eval (outputs, running
statistics, accumulated gradients) in every mode and layout, state_dict exchange both ways,
torch.save/torch.load and deepcopy, a small CNN trained with either, SyncBatchNorm in one process,
and convert_sync_batchnorm on a torch model."""
import copy
import io
from collections import OrderedDict

import numpy as np
import pytest
import torch

import normkit.torch as nkt
from helpers import assert_close_dtype, randn
from torch_helpers import DEVICES, random_state, tensor, to_numpy, torch_layouts

# (normkit class, torch class, input shape)
LAYER_CASES = [
    (nkt.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5)),
    (nkt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 9)),
    (nkt.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 7, 9)),
    (nkt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 5, 4, 3)),
    (nkt.SyncBatchNorm, torch.nn.SyncBatchNorm, (3, 5, 4, 6)),
]
LAYER_IDS = [f"{nk.__name__}-{'x'.join(map(str, s))}" for nk, _, s in LAYER_CASES]
MODES = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_running_stats": {"track_running_stats": False},
    "no_affine": {"affine": False},
    "no_bias": {"bias": False},
}


def _pair(nk_cls, t_cls, C, dtype, device, seed, **kwargs):
    """A normkit module and a torch one with the same random parameters and statistics."""
    ref = t_cls(C, dtype=dtype, device=device, **kwargs)
    sd = {k: v for k, v in random_state(C, seed).items() if k in ref.state_dict()}
    ref.load_state_dict(sd)
    layer = nk_cls(C, dtype=dtype, device=device, **kwargs)
    layer.load_state_dict(ref.state_dict())
    return layer, ref


def _compare_modules(layer, ref, dtype, what):
    for name, t in ref.state_dict().items():
        mine = layer.state_dict()[name]
        assert mine.dtype == t.dtype, (what, name)
        if t.dtype == torch.long:
            assert int(mine) == int(t), (what, name)
        else:
            assert_close_dtype(to_numpy(mine), to_numpy(t), dtype, f"{what}: {name}")
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None, (what, name)
            continue
        assert_close_dtype(to_numpy(p.grad), to_numpy(q.grad), dtype, f"{what}: {name}.grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("nk_cls,t_cls,shape", LAYER_CASES, ids=LAYER_IDS)
def test_module_tracks_torch_over_training_steps_then_eval(nk_cls, t_cls, shape, mode, dtype,
                                                           device):
    """Three training steps (each in another layout, gradients accumulating), then eval."""
    dtype = np.dtype(dtype)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    layer, ref = _pair(nk_cls, t_cls, shape[1], tdtype, device, seed=1, **MODES[mode])
    layouts = torch_layouts(len(shape))
    for step in range(4):
        if step == 3:
            layer.eval()
            ref.eval()
        layout = layouts[step % len(layouts)]
        x0 = randn(shape, 10 + step, dtype, offset=0.5 * step - 0.3, scale=1.0 + step)
        dy0 = randn(shape, 20 + step, dtype)
        x, xr = tensor(x0, device, layout, True), tensor(x0, device, "contiguous", True)
        y, yr = layer(x), ref(xr)
        assert y.dtype == yr.dtype and y.shape == yr.shape
        assert_close_dtype(to_numpy(y), to_numpy(yr), dtype, f"step {step} {layout}: y")
        y.backward(tensor(dy0, device))
        yr.backward(tensor(dy0, device))
        assert_close_dtype(to_numpy(x.grad), to_numpy(xr.grad), dtype, f"step {step}: dx")
        _compare_modules(layer, ref, dtype, f"step {step} {layout}")


def test_parametrized_weight_is_read_as_torch_reads_it():
    """A parametrization takes the weight out of the layer's parameter table (it becomes a
    property of the layer's class): the layer's forward then reads it as an attribute, as
    torch's does, with gradients reaching the original."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer, ref = _pair(nkt.BatchNorm2d, torch.nn.BatchNorm2d, 5, torch.float64, "cpu", seed=3)
    for m in (layer, ref):
        parametrize.register_parametrization(m, "weight", Doubled())
    for step in range(3):
        if step == 2:
            layer.eval()
            ref.eval()
        x0 = randn((3, 5, 4, 4), 30 + step, np.float64, offset=0.4)
        x, xr = (torch.from_numpy(x0.copy()).requires_grad_() for _ in range(2))
        y, yr = layer(x), ref(xr)
        assert_close_dtype(to_numpy(y), to_numpy(yr), np.float64, f"step {step}: y")
        dy = torch.from_numpy(randn((3, 5, 4, 4), 40 + step, np.float64))
        y.backward(dy)
        yr.backward(dy)
        assert_close_dtype(to_numpy(x.grad), to_numpy(xr.grad), np.float64, f"step {step}: dx")
        mine, theirs = (m.parametrizations.weight.original.grad for m in (layer, ref))
        assert_close_dtype(to_numpy(mine), to_numpy(theirs), np.float64, f"step {step}: dw")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(layer, name).double(), getattr(ref, name).double())


@pytest.mark.parametrize("device", DEVICES)
def test_float16_input_with_float32_module(device):
    layer, ref = _pair(nkt.BatchNorm2d, torch.nn.BatchNorm2d, 4, torch.float32, device, seed=2)
    x0 = randn((3, 4, 5, 6), 30, np.float16, offset=1.0)
    x, xr = tensor(x0, device, "channels_last", True), tensor(x0, device, "contiguous", True)
    y, yr = layer(x), ref(xr)
    assert y.dtype == torch.float16
    assert_close_dtype(to_numpy(y), to_numpy(yr), np.float16)
    dy = tensor(randn((3, 4, 5, 6), 31, np.float16), device)
    y.backward(dy)
    yr.backward(dy)
    assert_close_dtype(to_numpy(x.grad), to_numpy(xr.grad), np.float16)
    _compare_modules(layer, ref, np.float32, "float16 input")


@pytest.mark.parametrize("cls,ref_cls", [(nkt.BatchNorm2d, torch.nn.BatchNorm2d),
                                         (nkt.SyncBatchNorm, torch.nn.SyncBatchNorm)])
def test_empty_training_batch_is_as_in_torch(cls, ref_cls):
    """An empty batch in training: an empty output, running statistics left alone (the counter
    still counts), zero parameter gradients."""
    layer, ref = cls(3), ref_cls(3)
    layer.load_state_dict(random_state(3, 45))
    ref.load_state_dict(random_state(3, 45))
    for m in (layer, ref):
        x = torch.empty(0, 3, 4, 4, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    _compare_modules(layer, ref, np.float32, "empty batch")
    assert int(layer.num_batches_tracked) == 1


def test_double_and_channels_last_3d():
    layer = nkt.BatchNorm3d(3).double()
    ref = torch.nn.BatchNorm3d(3).double()
    x = torch.from_numpy(randn((2, 3, 4, 5, 3), 40))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    y = layer(x)
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close_dtype(to_numpy(y), to_numpy(ref(x)), np.float64)
    _compare_modules(layer, ref, np.float64, "double")


def test_class_relations():
    """The layers pass model code's isinstance checks as torch's; SyncBatchNorm is a batch norm
    but not a torch.nn.SyncBatchNorm, which DistributedDataParallel refuses on the CPU."""
    for mine, theirs in ((nkt.BatchNorm1d, torch.nn.BatchNorm1d),
                         (nkt.BatchNorm2d, torch.nn.BatchNorm2d),
                         (nkt.BatchNorm3d, torch.nn.BatchNorm3d)):
        assert issubclass(mine, theirs)
    assert issubclass(nkt.SyncBatchNorm, torch.nn.modules.batchnorm._BatchNorm)
    assert not issubclass(nkt.SyncBatchNorm, torch.nn.SyncBatchNorm)
    assert nkt.SyncBatchNorm(3, process_group="g").process_group == "g"


def test_module_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        nkt.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): input has 4 channels"):
        nkt.BatchNorm1d(3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        nkt.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(TypeError, match="BatchNorm2d: torch.float64 input needs torch.float64 "
                                        "parameters, this layer's are torch.float32"):
        nkt.BatchNorm2d(3)(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="SyncBatchNorm: torch.float32 input needs torch.float32 "
                                        "parameters, this layer's are torch.float64"):
        nkt.SyncBatchNorm(3, affine=False).double()(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nkt.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="process_group or a comm, not both"):
        nkt.SyncBatchNorm(3, process_group=object(), comm=object())


# --- state ----------------------------------------------------------------------------------------

STATE_PAIRS = [(nkt.BatchNorm2d, torch.nn.BatchNorm2d), (nkt.BatchNorm1d, torch.nn.BatchNorm1d),
               (nkt.SyncBatchNorm, torch.nn.SyncBatchNorm),
               (nkt.SyncBatchNorm, torch.nn.BatchNorm2d),
               (nkt.BatchNorm3d, torch.nn.SyncBatchNorm)]


@pytest.mark.parametrize("nk_cls,t_cls", STATE_PAIRS,
                         ids=[f"{a.__name__}-{b.__name__}" for a, b in STATE_PAIRS])
def test_state_dicts_interchange_both_ways(nk_cls, t_cls):
    src = t_cls(6)
    src.load_state_dict(dict(random_state(6, 50), num_batches_tracked=torch.tensor(7)))
    mine = nk_cls(6)
    mine.load_state_dict(src.state_dict())
    assert list(mine.state_dict()) == list(src.state_dict())
    back = t_cls(6)
    back.load_state_dict(mine.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v) and torch.equal(back.state_dict()[k], v), k


def test_old_checkpoint_without_num_batches_tracked_loads_as_in_torch():
    """A version-1 checkpoint (no num_batches_tracked, no metadata) keeps the module's counter,
    exactly as torch's module does; a current checkpoint missing it is a strict-mode error."""
    old = OrderedDict((k, v) for k, v in random_state(4, 51).items() if k != "num_batches_tracked")
    for cls in (nkt.BatchNorm2d, torch.nn.BatchNorm2d, nkt.SyncBatchNorm):
        m = cls(4)
        m.num_batches_tracked.fill_(5)
        m.load_state_dict(old)
        assert int(m.num_batches_tracked) == 5 and torch.equal(m.running_var, old["running_var"])
        fresh = cls(4)
        fresh.load_state_dict(old)
        assert int(fresh.num_batches_tracked) == 0
    current = torch.nn.BatchNorm2d(4).state_dict()
    del current["num_batches_tracked"]
    for cls in (nkt.BatchNorm2d, torch.nn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(4).load_state_dict(current)


def _trained(layer, seed=60):
    for s in range(2):
        layer(torch.from_numpy(randn((4, 5, 3, 3), seed + s, np.float32))).sum().backward()
    return layer


@pytest.mark.parametrize("cls", [nkt.BatchNorm2d, nkt.SyncBatchNorm])
def test_save_load_and_deepcopy(cls):
    layer = _trained(cls(5, momentum=None))
    x = torch.from_numpy(randn((3, 5, 4, 4), 61, np.float32))
    buf = io.BytesIO()
    torch.save({"model": layer, "state": layer.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(layer)
    for other in (loaded["model"], clone):
        assert type(other) is cls and other.momentum is None
        for k, v in layer.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
        assert torch.equal(other.eval()(x), layer.eval()(x))
    fresh = cls(5)
    fresh.load_state_dict(loaded["state"])
    assert torch.equal(fresh.eval()(x), layer(x))
    # Copies are independent: training the clone leaves the original alone.
    before = layer.running_mean.clone()
    _trained(clone.train(), seed=62)
    assert torch.equal(layer.running_mean, before) and not torch.equal(clone.running_mean, before)


def test_sync_deepcopy_shares_the_communicator_and_pickling_drops_it():
    comm = CountingComm(2)
    layer = nkt.SyncBatchNorm(3, comm=comm)
    clone = copy.deepcopy(layer)
    assert clone.comm is comm and clone.weight is not layer.weight
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).comm is None
    assert layer.comm is comm


# --- SyncBatchNorm in one process -----------------------------------------------------------------

class CountingComm:
    """normkit's communicator protocol in one process, pretending to be `size` ranks that all hold
    the same batch: the all-reduce multiplies by size. Counts its collectives."""
    rank, debug = 0, False

    def __init__(self, size):
        self.size, self.calls = size, 0

    def allreduce_sum(self, array):
        assert isinstance(array, np.ndarray) and array.dtype == np.float64
        self.calls += 1
        array *= self.size
        return array


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_collapsible"])
def test_sync_batchnorm_is_batchnorm_over_all_ranks_batches(layout):
    """Two 'ranks' with the same batch equal one BatchNorm over the batch twice: running_var's
    n - 1 and dx (of the sum of both ranks' losses) use the global count; weight and bias
    gradients are this rank's; one collective per forward and per backward, none in eval."""
    comm = CountingComm(2)
    layer = nkt.SyncBatchNorm(4, comm=comm, momentum=None).double()
    ref = torch.nn.BatchNorm2d(4, momentum=None).double()
    sd = random_state(4, 70, np.float64)
    layer.load_state_dict(sd)
    ref.load_state_dict(sd)
    for step in range(2):
        x0, dy0 = randn((3, 4, 5, 3), 71 + step, offset=1.0), randn((3, 4, 5, 3), 81 + step)
        x = tensor(x0, layout=layout, requires_grad=True)
        xr = torch.from_numpy(np.concatenate([x0, x0])).requires_grad_()
        y, yr = layer(x), ref(xr)
        assert_close_dtype(to_numpy(y), to_numpy(yr[:3]), np.float64, "y")
        y.backward(torch.from_numpy(dy0))
        ref.zero_grad()
        yr.backward(torch.from_numpy(np.concatenate([dy0, dy0])))
        assert_close_dtype(to_numpy(x.grad), to_numpy(xr.grad[:3]), np.float64, "dx")
        # This rank's parameter gradients are half the global ones (its half of the batch).
        assert_close_dtype(2 * to_numpy(layer.weight.grad), to_numpy(ref.weight.grad), np.float64)
        assert_close_dtype(2 * to_numpy(layer.bias.grad), to_numpy(ref.bias.grad), np.float64)
        layer.zero_grad()
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close_dtype(to_numpy(getattr(layer, k)), to_numpy(getattr(ref, k)), np.float64,
                               k)
    assert comm.calls == 4
    layer.eval()
    ref.eval()
    assert_close_dtype(to_numpy(layer(x)), to_numpy(ref(x)), np.float64, "eval")
    assert comm.calls == 4


def test_sync_batchnorm_global_count_error():
    comm = CountingComm(1)
    with pytest.raises(ValueError, match="more than 1 value per channel.*over all 1 ranks"):
        nkt.sync_batch_norm(torch.randn(1, 3), None, None, None, None, 1e-5, 0.1, comm)


def test_sync_batchnorm_without_distributed_is_batchnorm():
    """torch.distributed not initialized and no comm: a plain batch norm, as torch's is."""
    assert not torch.distributed.is_initialized()
    layer, ref = _pair(nkt.SyncBatchNorm, torch.nn.BatchNorm2d, 3, torch.float32, "cpu", seed=3)
    x = torch.from_numpy(randn((4, 3, 5, 5), 90, np.float32))
    assert_close_dtype(to_numpy(layer(x)), to_numpy(ref(x)), np.float32)
    _compare_modules(layer, ref, np.float32, "sync without distributed")


# --- models ---------------------------------------------------------------------------------------

def _cnn(bn2d, bn1d):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bn2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, stride=2), bn2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(6, 10), bn1d(10, momentum=None), torch.nn.ReLU(), torch.nn.Linear(10, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,fmt", [(torch.float64, torch.contiguous_format),
                                       (torch.float32, torch.channels_last)], ids=["f64", "f32-cl"])
def test_small_cnn_trains_like_torch(dtype, fmt, device):
    """The same CNN with normkit's and with torch's batch norms, five SGD steps with momentum:
    losses, parameters and running statistics stay together, and so do eval outputs."""
    ref = _cnn(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d).to(device, dtype)
    net = _cnn(nkt.BatchNorm2d, nkt.BatchNorm1d).to(device, dtype)
    net.load_state_dict(ref.state_dict())
    ref, net = ref.to(memory_format=fmt), net.to(memory_format=fmt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, net)]
    g = torch.Generator().manual_seed(1)
    tol = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    for step in range(5):
        x = (torch.randn(6, 3, 9, 9, generator=g) * 1.5 + 0.5).to(device, dtype)
        x = x.contiguous(memory_format=fmt)
        target = torch.randint(0, 4, (6,), generator=g).to(device)
        losses = []
        for model, opt in zip((ref, net), opts):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert_close_dtype(losses[1], losses[0], tol, f"step {step} loss", factor=100)
    for (name, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert_close_dtype(to_numpy(b), to_numpy(a), tol, name, factor=100)
    x = torch.randn(5, 3, 9, 9, generator=g).to(device, dtype)
    assert_close_dtype(to_numpy(net.eval()(x)), to_numpy(ref.eval()(x)), tol, "eval", factor=100)


def test_convert_sync_batchnorm_on_a_torch_model():
    model = _cnn(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
    _ = model(torch.randn(4, 3, 9, 9))  # running statistics away from their defaults
    model[4].eval()
    ref = copy.deepcopy(model)
    originals = {name: (m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked)
                 for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    comm = CountingComm(1)
    converted = nkt.convert_sync_batchnorm(model, comm=comm)
    assert converted is model
    for name, m in converted.named_modules():
        if name in originals or name == "9":
            assert type(m) is nkt.SyncBatchNorm and m.comm is comm, name
    assert type(converted[9]) is nkt.SyncBatchNorm and converted[9].momentum is None
    for name, tensors in originals.items():
        m = converted.get_submodule(name)
        now = (m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked)
        assert all(a is b for a, b in zip(now, tensors)), name
    assert not converted[4].training and converted[1].training
    assert list(converted.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 9, 9)
    assert_close_dtype(to_numpy(converted(x)), to_numpy(ref(x)), np.float32)
    # A single torch SyncBatchNorm is replaced by a new module; normkit's stay as they are.
    single = nkt.convert_sync_batchnorm(torch.nn.SyncBatchNorm(3), comm=comm)
    assert type(single) is nkt.SyncBatchNorm
    assert nkt.convert_sync_batchnorm(single) is single
