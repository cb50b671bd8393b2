"""normkit.torch.models: IBN-Net and the MixStyle ResNets.

The expected state_dict keys and the reference forward are both built here from the published
block structure (IBN-Net's paper and code conventions, torchvision's ResNet), not from normkit's
modules: the reference runs torch.nn.functional's conv2d, batch_norm and instance_norm (what
torch.nn.BatchNorm2d / InstanceNorm2d run) on the model's weights.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import normkit.torch as nkt
from normkit.torch import models as nkm

ARCHS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
         101: (True, [3, 4, 23, 3])}
STAGE_KINDS = {"a": ("a", "a", "a", None), "b": ("b", "b", None, None),
               None: (None, None, None, None)}
IBN_FACTORIES = {(d, k): getattr(nkm, f"resnet{d}_ibn_{k}") for d in ARCHS for k in "ab"}
MIX_FACTORIES = {d: getattr(nkm, f"mixstyle_resnet{d}") for d in (18, 34, 50)}


# --- the published structure -------------------------------------------------------------------

def plan(depth, kind):
    """The stem's norm and one dict per residual block, from the block structure: IBN-a's bn1 is
    half IN / half BN in every block of layer1-3; IBN-b has an IN stem norm and an IN after the
    add of the last block of layer1 and layer2; a stage's first block downsamples by its stride
    (and projects when the width changes)."""
    bottleneck, layers = ARCHS[depth]
    expansion = 4 if bottleneck else 1
    stages = STAGE_KINDS[kind]
    blocks, inplanes = [], 64
    for s, (n, stage_kind) in enumerate(zip(layers, stages)):
        planes = 64 * 2 ** s
        for j in range(n):
            blocks.append({
                "prefix": f"layer{s + 1}.{j}.", "stage": f"layer{s + 1}", "last": j == n - 1,
                "bottleneck": bottleneck, "planes": planes,
                "inplanes": inplanes, "stride": 2 if s > 0 and j == 0 else 1,
                "ibn_a": stage_kind == "a",
                "in_after": stage_kind == "b" and j == n - 1 and j > 0,
                "downsample": j == 0 and (s > 0 or inplanes != planes * expansion)})
            inplanes = planes * expansion
    return {"stem_in": stages[0] == "b", "blocks": blocks, "out": 512 * expansion}


def bn_keys(prefix, c):
    return {f"{prefix}weight": (c,), f"{prefix}bias": (c,), f"{prefix}running_mean": (c,),
            f"{prefix}running_var": (c,), f"{prefix}num_batches_tracked": ()}


def in_keys(prefix, c):
    return {f"{prefix}weight": (c,), f"{prefix}bias": (c,)}


def expected_keys(depth, kind, num_classes):
    """Key -> shape, in module order, of the network with ``num_classes`` outputs (None: none)."""
    p = plan(depth, kind)
    keys = {"conv1.weight": (64, 3, 7, 7)}
    keys.update(in_keys("bn1.", 64) if p["stem_in"] else bn_keys("bn1.", 64))
    for b in p["blocks"]:
        pre, planes, inp = b["prefix"], b["planes"], b["inplanes"]
        k1 = 1 if b["bottleneck"] else 3
        width = planes * (4 if b["bottleneck"] else 1)
        keys[f"{pre}conv1.weight"] = (planes, inp, k1, k1)
        if b["ibn_a"]:
            half = planes // 2
            keys.update(in_keys(f"{pre}bn1.IN.", half))
            keys.update(bn_keys(f"{pre}bn1.BN.", planes - half))
        else:
            keys.update(bn_keys(f"{pre}bn1.", planes))
        keys[f"{pre}conv2.weight"] = (planes, planes, 3, 3)
        keys.update(bn_keys(f"{pre}bn2.", planes))
        if b["bottleneck"]:
            keys[f"{pre}conv3.weight"] = (width, planes, 1, 1)
            keys.update(bn_keys(f"{pre}bn3.", width))
        if b["in_after"]:
            keys.update(in_keys(f"{pre}IN.", width))
        if b["downsample"]:
            keys[f"{pre}downsample.0.weight"] = (width, inp, 1, 1)
            keys.update(bn_keys(f"{pre}downsample.1.", width))
    if num_classes is not None:
        keys["fc.weight"] = (num_classes, p["out"])
        keys["fc.bias"] = (num_classes,)
    return keys


def shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def random_state(depth, kind, num_classes, seed, dtype=torch.float32):
    """Every key of the network at random values (positive variances, counts of batches)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in expected_keys(depth, kind, num_classes).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(1, 1000, (), generator=g)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g, dtype=dtype) * 2 + 0.3
        elif k.endswith("weight") and len(shape) == 1:  # norm weights away from 0
            sd[k] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif k.endswith(".weight") and len(shape) == 4:  # conv: He-scaled
            fan_in = math.prod(shape[1:])
            sd[k] = torch.randn(shape, generator=g, dtype=dtype) * math.sqrt(2.0 / fan_in)
        else:
            sd[k] = torch.randn(shape, generator=g, dtype=dtype) * 0.3
    return sd


# --- the reference forward: torch.nn.functional on the published structure ---------------------

def ref_bn(x, P, pre, training):
    """In training torch's batch_norm also updates P's running statistics in place."""
    return F.batch_norm(x, P[pre + "running_mean"], P[pre + "running_var"], P[pre + "weight"],
                        P[pre + "bias"], training, 0.1, 1e-5)


def ref_in(x, P, pre):
    return F.instance_norm(x, weight=P[pre + "weight"], bias=P[pre + "bias"], eps=1e-5)


def ref_ibn(x, P, pre, training):
    half = P[pre + "IN.weight"].shape[0]
    return torch.cat([ref_in(x[:, :half], P, pre + "IN."),
                      ref_bn(x[:, half:], P, pre + "BN.", training)], 1)


def ref_block(x, P, b, training):
    pre = b["prefix"]
    s1, s2 = (1, b["stride"]) if b["bottleneck"] else (b["stride"], 1)
    out = F.conv2d(x, P[pre + "conv1.weight"], stride=s1, padding=0 if b["bottleneck"] else 1)
    out = ref_ibn(out, P, pre + "bn1.", training) if b["ibn_a"] else ref_bn(
        out, P, pre + "bn1.", training)
    out = F.relu(out)
    out = ref_bn(F.conv2d(out, P[pre + "conv2.weight"], stride=s2, padding=1), P, pre + "bn2.",
                 training)
    if b["bottleneck"]:
        out = F.relu(out)
        out = ref_bn(F.conv2d(out, P[pre + "conv3.weight"]), P, pre + "bn3.", training)
    residual = x
    if b["downsample"]:
        residual = ref_bn(F.conv2d(x, P[pre + "downsample.0.weight"], stride=b["stride"]), P,
                          pre + "downsample.1.", training)
    out = out + residual
    if b["in_after"]:
        out = ref_in(out, P, pre + "IN.")
    return F.relu(out)


def ref_forward(P, depth, kind, x, training, num_classes=None, mix_after=None):
    """Logits (num_classes given) or layer4's map; ``mix_after(stage, x)`` is applied after the
    named stages' last blocks (MixStyle)."""
    p = plan(depth, kind)
    x = F.conv2d(x, P["conv1.weight"], stride=2, padding=3)
    x = ref_in(x, P, "bn1.") if p["stem_in"] else ref_bn(x, P, "bn1.", training)
    x = F.max_pool2d(F.relu(x), 3, 2, 1)
    for b in p["blocks"]:
        x = ref_block(x, P, b, training)
        if mix_after is not None and b["last"]:
            x = mix_after(b["stage"], x)
    if num_classes is None:
        return x
    return F.linear(x.mean((2, 3)), P["fc.weight"], P["fc.bias"])


def leaves(sd):
    """A copy of the state dict as reference inputs: float parameters as leaves that take
    gradients (training updates its running statistics, not sd's)."""
    return {k: (v.detach().clone().requires_grad_() if v.is_floating_point()
                and not k.endswith(("running_mean", "running_var")) else v.clone())
            for k, v in sd.items()}


def images(seed, n=2, size=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype) * 1.3 + 0.2


# --- keys and shapes ----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", list(ARCHS))
@pytest.mark.parametrize("kind", "ab")
def test_ibn_keys_are_the_released_ones(depth, kind):
    model = IBN_FACTORIES[depth, kind](num_classes=1000)
    assert shapes(model) == list(expected_keys(depth, kind, 1000).items())
    backbone = IBN_FACTORIES[depth, kind]()
    assert shapes(backbone) == list(expected_keys(depth, kind, None).items())
    assert backbone.out_features == model.out_features == plan(depth, kind)["out"]
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_mixstyle_resnet_keys_are_torchvisions(depth):
    model = MIX_FACTORIES[depth](mix_layers=["layer1", "layer2"])
    assert shapes(model) == list(expected_keys(depth, None, 1000).items())
    assert model.out_features == plan(depth, None)["out"]
    head = model.copy_head()
    assert head is not model.fc and torch.equal(head.weight, model.fc.weight)


def test_init_as_ibn_net():
    torch.manual_seed(3)
    model = nkm.resnet50_ibn_b()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            std = m.weight.detach().std().item()
            assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.2, name
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name


def test_block_counts_and_norm_kinds():
    a, b = nkm.resnet18_ibn_a(), nkm.resnet18_ibn_b()
    assert isinstance(a.layer3[1].bn1, nkt.InstanceBatchNorm2d)
    assert isinstance(a.layer4[0].bn1, nkt.BatchNorm2d) and isinstance(a.bn1, nkt.BatchNorm2d)
    assert isinstance(b.bn1, nkt.InstanceNorm2d) and b.bn1.affine
    assert isinstance(b.layer2[1].IN, nkt.InstanceNorm2d) and b.layer2[0].IN is None
    assert b.layer3[1].IN is None


# --- forward and backward against the reference ------------------------------------------------

def load_random(model, depth, kind, num_classes, seed, dtype=torch.float64):
    sd = random_state(depth, kind, num_classes, seed, dtype)
    model.load_state_dict(sd)
    return sd


@pytest.mark.parametrize("depth", list(ARCHS))
@pytest.mark.parametrize("kind", "ab")
def test_ibn_eval_matches_torch_composition(depth, kind):
    model = IBN_FACTORIES[depth, kind](num_classes=7).double().eval()
    sd = load_random(model, depth, kind, 7, seed=depth + ord(kind))
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_forward(sd, depth, kind, x, False, 7),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_mixstyle_resnet_eval_matches_torch_composition(depth):
    model = MIX_FACTORIES[depth](mix_layers=["layer1", "layer2", "layer3"], mix_p=1.0)
    model = model.double().eval()
    sd = load_random(model, depth, None, 1000, seed=depth)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_forward(sd, depth, None, x, False),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,layout", [
    ("resnet18_ibn_a", "contiguous"), ("resnet18_ibn_a", "channels_last"),
    ("resnet18_ibn_b", "contiguous"), ("resnet18_ibn_b", "channels_last"),
    ("resnet50_ibn_a", "contiguous"), ("resnet50_ibn_b", "channels_last")])
def test_training_step_matches_torch_composition(name, layout):
    """Training mode (batch statistics): logits, the input's and every parameter's gradient,
    and the running statistics after the step, against the reference."""
    depth, kind = int(name[6:name.index("_")]), name[-1]
    model = getattr(nkm, name)(num_classes=5).double().train()
    sd = load_random(model, depth, kind, 5, seed=11)
    P = leaves(sd)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # a batch of 6: layer4's batch norms (1x1 maps at 32 px) see 6 values per channel (with 3
    # the gradients reach 1e5 and float64 rounding shows in them)
    x = images(4, n=6).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(6, 5, generator=g, dtype=torch.float64)
    out = model(xa)
    want = ref_forward(P, depth, kind, xb, True, 5)
    torch.testing.assert_close(out, want, rtol=1e-8, atol=1e-8)
    (out * dy).sum().backward()
    (want * dy).sum().backward()
    # Tolerances relative to each gradient's largest entry, plus a floor for the biases of the
    # batch norms right before IBN-b's IN: the IN removes per-channel constants, so their exact
    # gradient is 0 and both sides hold rounding noise (~1e-14).
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10 * xb.grad.abs().max())
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
        torch.testing.assert_close(p.grad, P[k].grad, rtol=1e-8,
                                   atol=1e-10 * P[k].grad.abs().max() + 1e-11, msg=k)
    # the running statistics moved as torch's batch norm moves them, and batches were counted
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(v, P[k], rtol=1e-9, atol=1e-12, msg=k)
            assert not torch.equal(v, sd[k]), k
        elif k.endswith("num_batches_tracked"):
            assert int(v) == int(sd[k]) + 1, k


def test_float32_forward_and_finite_training_step():
    torch.manual_seed(0)
    for factory in (nkm.resnet18_ibn_a, nkm.resnet34_ibn_b, nkm.resnet101_ibn_a):
        model = factory(num_classes=3)
        # (a batch of 2 at 32 px leaves layer4's batch norms 2 values per channel: gradients of
        # ~1e6, with torch's norms too; a small step keeps the weights in range)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        before = model.fc.weight.detach().clone()
        loss = F.cross_entropy(model(images(6, n=2, dtype=torch.float32)), torch.tensor([0, 2]))
        loss.backward()
        assert torch.isfinite(loss)
        for k, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (factory.__name__, k)
        opt.step()
        assert not torch.equal(before, model.fc.weight)
        with torch.no_grad():  # training mode again, another input size
            assert torch.isfinite(model(images(7, n=2, size=48, dtype=torch.float32))).all()


def test_any_input_size_pools_globally():
    model = nkm.resnet18_ibn_a(num_classes=4).eval()
    with torch.no_grad():
        for size in (32, 67, 100):
            assert model(images(size, n=1, size=size, dtype=torch.float32)).shape == (1, 4)
    assert nkm.resnet18_ibn_b()(images(8, size=64, dtype=torch.float32)).shape == (2, 512, 2, 2)


def test_bad_input_and_arguments():
    model = nkm.resnet18_ibn_a()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        nkm.resnet18_ibn_a(num_classes=0)
    with pytest.raises(ValueError, match="ibn_cfg"):
        nkm.IBNNet(nkm.BasicBlock, [2, 2, 2, 2], ("c", None, None, None))
    with pytest.raises(ValueError, match="layers"):
        nkm.IBNNet(nkm.BasicBlock, [2, 2, 2])
    with pytest.raises(TypeError, match="block"):
        nkm.IBNNet(torch.nn.Linear, [2, 2, 2, 2])
    with pytest.raises(ValueError, match="mix_layers"):
        nkm.mixstyle_resnet18(mix_layers=["layer4"])


# --- MixStyle inside the models -----------------------------------------------------------------

def dassl_mixstyle(x, perm, lam, eps=1e-6):
    """Dassl's formula as torch ops for given draws."""
    mu = x.mean((2, 3), keepdim=True)
    sig = (x.var((2, 3), keepdim=True) + eps).sqrt()
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    return ((x - mu) / sig * (lam * sig + (1 - lam) * sig[perm])
            + lam * mu + (1 - lam) * mu[perm])


@pytest.mark.parametrize("mix", ["random", "crossdomain"])
def test_mixstyle_in_training_matches_formula(mix):
    model = nkm.mixstyle_resnet18(mix_layers=["layer2"], mix_p=1.0, mix_alpha=0.3, mix=mix,
                                  generator=torch.Generator().manual_seed(4)).double().train()
    sd = load_random(model, 18, None, 1000, seed=9)
    x = images(10, n=4)
    out = model(x)
    perm, lam = model.mixStyle.last_draw
    if mix == "crossdomain":  # the two halves exchange partners
        assert all((int(perm[i]) >= 2) == (i < 2) for i in range(4))
    mixed = []

    def mix_after(stage, h):
        if stage != "layer2":
            return h
        mixed.append(stage)
        return dassl_mixstyle(h, perm, lam)

    torch.testing.assert_close(out, ref_forward(leaves(sd), 18, None, x, True,
                                                mix_after=mix_after), rtol=1e-8, atol=1e-8)
    assert mixed == ["layer2"]
    with nkt.run_without_mixstyle(model):
        plain = model(x)
    torch.testing.assert_close(plain, ref_forward(leaves(sd), 18, None, x, True), rtol=1e-8,
                               atol=1e-8)
    assert (out - plain).abs().max() > 1e-3  # MixStyle changed the features


def test_mixstyle_layers_gate_and_seeding():
    def run(seed, **kw):
        torch.manual_seed(1)
        model = nkm.mixstyle_resnet18(generator=torch.Generator().manual_seed(seed), **kw)
        return model(images(12, n=4, dtype=torch.float32))

    none = run(0)
    torch.testing.assert_close(none, run(0, mix_layers=["layer1"], mix_p=0.0))
    mixed = run(0, mix_layers=["layer1", "layer3"], mix_p=1.0)
    assert (mixed - none).abs().max() > 1e-3
    torch.testing.assert_close(mixed, run(0, mix_layers=["layer1", "layer3"], mix_p=1.0))
    assert (mixed - run(1, mix_layers=["layer1", "layer3"], mix_p=1.0)).abs().max() > 1e-4
    model = nkm.mixstyle_resnet18(mix_layers=["layer1"], mix_p=1.0).eval()
    x = images(13, n=4, dtype=torch.float32)
    with torch.no_grad():
        y = model(x)
        with nkt.run_without_mixstyle(model):
            torch.testing.assert_close(model(x), y)  # eval: identity either way
        assert model.mixStyle.last_draw is None


# --- as backbones, and converted ----------------------------------------------------------------

@pytest.mark.parametrize("factory", [nkm.resnet18_ibn_a, nkm.resnet18_ibn_b,
                                     nkm.mixstyle_resnet18])
def test_backbone_of_image_classifier(factory):
    clf = nkt.ImageClassifier(factory(), num_classes=6, bottleneck_dim=32,
                              generator=torch.Generator().manual_seed(0))
    x = images(14, n=3, dtype=torch.float32)
    pred, f = clf(x)
    assert pred.shape == (3, 6) and f.shape == (3, 32)
    (F.cross_entropy(pred, torch.tensor([0, 1, 5]))
     + nkt.AdaptiveFeatureNorm(1.0)(f)).backward()
    for k, p in clf.named_parameters():  # (a MixStyle ResNet's ImageNet fc is unused)
        if not k.startswith("backbone.fc."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), k
    clf.eval()
    with torch.no_grad():
        assert clf(x).shape == (3, 6)


def test_convert_sync_batchnorm_reaches_ibn_halves():
    torch.manual_seed(2)
    model = nkm.resnet18_ibn_a(num_classes=3).double()
    load_random(model, 18, "a", 3, seed=21)
    bns = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    ins = {n for n, m in model.named_modules() if isinstance(m, torch.nn.InstanceNorm2d)}
    assert "layer1.0.bn1.BN" in bns and "layer1.0.bn1.IN" in ins
    sync = nkt.convert_sync_batchnorm(copy.deepcopy(model))
    assert {n for n, m in sync.named_modules() if isinstance(m, nkt.SyncBatchNorm)} == bns
    assert {n for n, m in sync.named_modules() if isinstance(m, torch.nn.InstanceNorm2d)} == ins
    x = images(15, n=3)
    for train in (True, False):  # one process: the same as the batch norms it replaced
        model.train(train)
        sync.train(train)
        torch.testing.assert_close(sync(x), model(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sync.state_dict(), model.state_dict())


def test_convert_stochnorm_reaches_ibn_halves():
    model = nkm.resnet18_ibn_b(num_classes=3).double()
    load_random(model, 18, "b", 3, seed=22)
    bns = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    stoch = nkt.convert_stochnorm(copy.deepcopy(model), p=1.0)
    assert {n for n, m in stoch.named_modules() if isinstance(m, nkt.StochNorm2d)} == bns
    a = nkt.convert_stochnorm(nkm.resnet18_ibn_a(), p=0.3)
    assert isinstance(a.layer2[0].bn1.BN, nkt.StochNorm2d) and a.layer2[0].bn1.BN.p == 0.3
    x = images(16, n=3)
    for train in (True, False):  # p=1: always the batch branch, so batch norm's outputs
        model.train(train)
        stoch.train(train)
        torch.testing.assert_close(stoch(x), model(x), rtol=1e-10, atol=1e-10)


# --- checkpoints --------------------------------------------------------------------------------

def wrapped(sd, how):
    if how == "plain":
        return dict(sd)
    if how == "module":
        return {"module." + k: v for k, v in sd.items()}
    if how == "state_dict":
        return {"state_dict": dict(sd), "epoch": 90, "arch": "resnet_ibn"}
    if how == "state_dict+module":
        return {"state_dict": {"module." + k: v for k, v in sd.items()}, "best_prec1": 77.5}
    if how == "no_batch_counts":
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    raise AssertionError(how)


def assert_loaded(model, sd, counts=True):
    got = model.state_dict()
    for k, v in got.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == (int(sd[k]) if counts else 0), k
        else:
            assert torch.equal(v, sd[k].to(v.dtype)), k


HOWS = ["plain", "module", "state_dict", "state_dict+module", "no_batch_counts"]


@pytest.mark.parametrize("name,how", [("resnet18_ibn_a", how) for how in HOWS]
                         + [("resnet18_ibn_b", "state_dict+module"),
                            ("resnet50_ibn_b", "state_dict+module")])
def test_released_ibn_checkpoints_load(tmp_path, name, how):
    depth, kind = int(name[6:name.index("_")]), name[-1]
    sd = random_state(depth, kind, 1000, seed=depth + len(how))
    path = tmp_path / nkm.ibnnet.RELEASE_FILES[name]
    torch.save(wrapped(sd, how), path)
    counts = how != "no_batch_counts"
    model = getattr(nkm, name)(pretrained=str(path), num_classes=1000).eval()
    assert_loaded(model, sd, counts)
    backbone = getattr(nkm, name)(pretrained=path).eval()  # a backbone: the file's fc dropped
    assert_loaded(backbone, {k: v for k, v in sd.items() if not k.startswith("fc.")}, counts)
    x = images(17, n=1, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(backbone(x).mean((2, 3))), model(x))


@pytest.mark.parametrize("how", HOWS)
def test_torchvision_checkpoints_load_into_mixstyle_resnets(tmp_path, how):
    sd = random_state(18, None, 1000, seed=30 + len(how))
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(wrapped(sd, how), path)
    model = nkm.mixstyle_resnet18(pretrained=path, mix_layers=["layer1"])
    assert_loaded(model, sd, how != "no_batch_counts")
    other = nkm.mixstyle_resnet34()
    nkm.load_checkpoint(other, random_state(34, None, 1000, seed=3))  # a state dict in memory


def test_pretrained_true_names_the_release_file():
    with pytest.raises(ValueError, match=r"resnet50_ibn_a-d9d0bb7b\.pth.*never downloads"):
        nkm.resnet50_ibn_a(pretrained=True)
    with pytest.raises(ValueError, match=r"download\.pytorch\.org/models/resnet18-f37072fd\.pth"):
        nkm.mixstyle_resnet18(pretrained=True)
    with pytest.raises(TypeError, match="load_checkpoint"):
        nkm.resnet18_ibn_a(pretrained={"conv1.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        nkm.resnet18_ibn_b(pretrained="/nonexistent/nowhere.pth")
    assert isinstance(nkm.resnet18_ibn_a(pretrained=False), nkm.IBNNet)


def test_misfitting_checkpoint_lists_the_keys(tmp_path):
    sd = random_state(18, "a", 1000, seed=40)
    del sd["layer2.1.bn2.running_var"]
    sd["layer9.0.conv1.weight"] = torch.randn(2)
    sd["layer3.0.conv2.weight"] = torch.randn(256, 256, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    model = nkm.resnet18_ibn_a(num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        nkm.load_checkpoint(model, path)
    msg = str(err.value)
    assert "broken.pth" in msg and "layer2.1.bn2.running_var" in msg
    assert "layer9.0.conv1.weight" in msg and "layer3.0.conv2.weight (256, 256, 1, 1)" in msg
    assert "(model (256, 256, 3, 3))" in msg
    for k, v in model.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k
    # an IBN-b file into an IBN-a model: every misfit is named, counted beyond the first ones
    with pytest.raises(ValueError, match=r"missing from the file \(\d+\).*and \d+ more"):
        nkm.load_checkpoint(model, random_state(18, "b", 1000, seed=41))
    # a classifier of another size says how to build the model
    with pytest.raises(ValueError, match="num_classes=None"):
        nkm.load_checkpoint(nkm.resnet18_ibn_a(num_classes=10), random_state(18, "a", 1000, 42))
    with pytest.raises(ValueError, match="not a state dict"):
        nkm.load_checkpoint(model, [1, 2])
