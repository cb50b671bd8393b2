"""IBN-Net and MixStyle ResNets of normkit.torch.models vs the same networks built from torch.nn's
own norm layers, on the CPU: one training forward+backward (float32).

    python benchmarks/bench_models.py [--arch resnet50_ibn_a] [--batch 8] [--size 224]
                                      [--rounds 5] [--repeat 1] [--channels-last]

The peer is a copy of the normkit model (same convolutions, same weights) whose norms are
torch.nn.BatchNorm2d / InstanceNorm2d and, for IBN-a, IBN-Net's own ``IBN`` composition
(torch.split, .contiguous() of both halves, InstanceNorm2d and BatchNorm2d, torch.cat). The two
alternate in rounds; the table gives medians over all calls and the ratio torch / normkit (> 1:
normkit is faster). The done-when bound of issue 14: resnet50_ibn_a(num_classes=1000) on
(8, 3, 224, 224) at a ratio >= 1.
"""
import argparse
import copy
import time

import numpy as np
import torch

import normkit.torch as nkt
from normkit.torch import models as nkm


class UpstreamIBN(torch.nn.Module):
    """IBN-Net's ``ibnnet.modules.IBN`` forward with torch's layers (same keys as normkit's)."""

    def __init__(self, ibn):
        super().__init__()
        self.half = ibn.half
        self.IN = torch.nn.InstanceNorm2d(ibn.half, affine=True)
        self.BN = torch.nn.BatchNorm2d(ibn.planes - ibn.half)
        self.load_state_dict(ibn.state_dict())

    def forward(self, x):
        split = torch.split(x, self.half, 1)
        return torch.cat((self.IN(split[0].contiguous()), self.BN(split[1].contiguous())), 1)


def torch_norms(module):
    """A copy of ``module`` with every normkit norm replaced by torch.nn's (weights kept)."""
    for name, child in module.named_children():
        if isinstance(child, nkt.InstanceBatchNorm2d):
            new = UpstreamIBN(child)
        elif isinstance(child, nkt.BatchNorm2d):
            new = torch.nn.BatchNorm2d(child.num_features)
            new.load_state_dict(child.state_dict())
        elif isinstance(child, nkt.InstanceNorm2d):
            new = torch.nn.InstanceNorm2d(child.num_features, affine=child.affine)
            new.load_state_dict(child.state_dict())
        else:
            new = torch_norms(child)
        setattr(module, name, new)
    return module


def build(arch):
    if arch.startswith("mixstyle"):
        return getattr(nkm, arch)(mix_layers=["layer1", "layer2", "layer3"], mix_p=1.0,
                                  generator=torch.Generator().manual_seed(0))
    return getattr(nkm, arch)(num_classes=1000)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50_ibn_a", help="a factory of normkit.torch.models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="timed steps per network per round")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    ours = build(args.arch)
    peer = torch_norms(copy.deepcopy(ours))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    nets = {"normkit.torch.models": ours.to(memory_format=fmt),
            "torch.nn norms": peer.to(memory_format=fmt)}
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)

    def step(net):
        t0 = time.perf_counter()
        out = net(x)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    with torch.no_grad():  # the same network: equal outputs from equal weights
        outs = [net.eval()(x[:2]) for net in nets.values()]
    err = (outs[0] - outs[1]).abs().max().item() / outs[1].abs().max().item()
    for net in nets.values():
        net.train()
        step(net)  # warm up
    times = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, net in nets.items():
            times[name] += [step(net) for _ in range(args.repeat)]
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{args.arch} forward+backward, input ({args.batch}, 3, {args.size}, {args.size}) "
          f"{'channels_last' if args.channels_last else 'NCHW'} float32; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} "
          f"rounds x {args.repeat}; eval outputs agree to {err:.1e} (relative)")
    base = med["normkit.torch.models"]
    for name in nets:
        print(f"  {name:22s} {med[name] * 1e3:10.1f} ms   {med[name] / base:5.2f}x normkit's time")


if __name__ == "__main__":
    main()
