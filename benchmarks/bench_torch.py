"""normkit.torch's norm layers vs torch.nn's (BatchNorm2d, InstanceNorm2d, GroupNorm), both
called as torch modules.

    python benchmarks/bench_torch.py [--layer batchnorm|instancenorm|groupnorm] [--repeat 15]
                                     [--shapes 32,64,56,56 ...] [--device cpu] [--threads 1]

For the shapes of bench_batchnorm.py plus a small one, where the adapter's per-call overhead
(DLPack capsules, output allocation, autograd.Function) shows, and each layout (NCHW,
channels_last): train forward (under no_grad), train forward+backward (autograd: dx, dweight,
dbias) and, for batch norm, eval forward, in float32. InstanceNorm2d is affine (weight and bias
gradients), GroupNorm has min(32, C) groups. Prints the median time per call of each module
(the two run in the same process, sampled in turns), torch/normkit (> 1: normkit faster) and the
difference in microseconds (normkit - torch: the adapter's overhead where the kernels take no
time). On CUDA (where torch and normkit both have it) each timing includes a synchronize.

Then (skip with --no-compiled) a small CNN (3 x [Conv2d 3x3 -> BatchNorm2d -> ReLU], batch
(16, 3, 32, 32)) with normkit's BatchNorm2d and with torch's, both under torch.compile, in
training: median forward+backward time of each in a steady run (the models take turns of one
untimed and five timed steps) and torch/normkit (>= 1: normkit no slower).
"""
import argparse
import time

import numpy as np
import torch

import normkit
import normkit.torch as nkt

SHAPES = [(8, 16, 8, 8), (32, 64, 56, 56), (64, 256, 14, 14), (8, 32, 128, 128)]
# name: (normkit class, torch class, constructor arguments for C channels, ops)
LAYERS = {
    "batchnorm": (nkt.BatchNorm2d, torch.nn.BatchNorm2d, lambda C: ((C,), {}),
                  ("train fwd", "train fwd+bwd", "eval fwd")),
    "instancenorm": (nkt.InstanceNorm2d, torch.nn.InstanceNorm2d,
                     lambda C: ((C,), {"affine": True}), ("train fwd", "train fwd+bwd")),
    "groupnorm": (nkt.GroupNorm, torch.nn.GroupNorm, lambda C: ((min(32, C), C), {}),
                  ("train fwd", "train fwd+bwd")),
}


def paired_times(fns, repeat, sync):
    """Median seconds per call of each of `fns`, sampled in turns (so that the load of a shared
    machine hits all alike); each sample runs a fn long enough (>= 2 ms) for the clock."""
    def sample(fn, number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return time.perf_counter() - t0

    numbers = []
    for fn in fns:
        sample(fn, 3)  # warm-up
        number = 1
        while (t := sample(fn, number)) < 2e-3:
            number = max(2 * number, int(number * 2.5e-3 / max(t, 1e-7)))
        numbers.append(number)
    times = [[] for _ in fns]
    for r in range(repeat):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(sample(fns[i], numbers[i]) / numbers[i])
    return [float(np.median(t)) for t in times]


def cases(layer, shape, channels_last, device, repeat):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    nk_cls, torch_cls, arguments, ops = LAYERS[layer]
    args, kwargs = arguments(C)
    modules = {}
    for name, cls in (("normkit", nk_cls), ("torch", torch_cls)):
        bn = cls(*args, **kwargs).to(device)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(C, generator=g))
        modules[name] = bn

    def train_fwd(bn):
        bn.train()
        with torch.no_grad():
            bn(x)

    def train_fwd_bwd(bn):
        bn.train()
        torch.autograd.grad(bn(xg), (xg, bn.weight, bn.bias), dy)

    def eval_fwd(bn):
        bn.eval()
        with torch.no_grad():
            bn(x)

    fns = {"train fwd": train_fwd, "train fwd+bwd": train_fwd_bwd, "eval fwd": eval_fwd}
    for op in ops:
        fn = fns[op]
        nk_t, torch_t = paired_times([lambda: fn(modules["normkit"]), lambda: fn(modules["torch"])],
                                     repeat, sync)
        yield op, nk_t, torch_t


def small_cnn(bn_cls):
    layers, c = [], 3
    for width in (16, 32, 32):
        layers += [torch.nn.Conv2d(c, width, 3, padding=1), bn_cls(width), torch.nn.ReLU()]
        c = width
    return torch.nn.Sequential(*layers)


def steady_times(fns, repeat, sync, steps=5):
    """Median seconds per call of each of `fns` in a steady run: the models take turns (so that
    drift in the machine's speed hits all alike), and each turn makes one untimed call, then
    times `steps` more. A training loop runs one model step after step; the first step after
    another model ran finds its caches and the allocator's free lists as that model left them,
    which the turns of single calls of paired_times would time every time (measured on a
    2-core VM, the compiled CNN: torch/nk 0.91-0.99 with single calls, 1.00-1.13 in steady runs,
    1.01-1.11 running each model 50 steps in a row)."""
    times = [[] for _ in fns]
    for r in range(repeat):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            fns[i]()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[i]()
            sync()
            times[i].append((time.perf_counter() - t0) / steps)
    return [float(np.median(t)) for t in times]


def compiled_cnn(device, repeat):
    """(normkit s, torch s) per compiled training forward+backward of small_cnn, in a steady
    run (steady_times)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # Compiled afresh: inductor's on-disk cache keys on the graph, not on the custom ops' tags or
    # code, and would serve the code compiled for an older normkit.
    torch._inductor.config.force_disable_caches = True
    fns = []
    for cls in (nkt.BatchNorm2d, torch.nn.BatchNorm2d):
        torch.manual_seed(0)
        model = torch.compile(small_cnn(cls).to(device), fullgraph=True)

        def step(model=model):
            model(x).sum().backward()
        step()  # compiles
        fns.append(step)
    return steady_times(fns, repeat, sync)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=list(LAYERS), default="batchnorm")
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="shapes as N,C,H,W (default: the small one and the three of "
                             "bench_batchnorm.py)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cpu, and cuda too where both torch and "
                             "normkit have it)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the compiled small-CNN comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (normkit's CPU kernels share torch's "
                             "OpenMP runtime)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    devices = [args.device] if args.device else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() and normkit.cuda_available() else []))
    print(f"{args.layer}: normkit {normkit.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32; median times per call")
    header = (f"{'device':>6} {'shape':>18} {'layout':>6} {'op':>14} {'normkit ms':>10} "
              f"{'torch ms':>9} {'torch/nk':>8} {'nk-torch us':>11}")
    print(header)
    print("-" * len(header))
    for device in devices:
        for shape in shapes:
            for channels_last in (False, True):
                layout = "NHWC" if channels_last else "NCHW"
                for op, nk_t, torch_t in cases(args.layer, shape, channels_last, device,
                                                    args.repeat):
                    print(f"{device:>6} {str(shape):>18} {layout:>6} {op:>14} {nk_t * 1e3:10.3f} "
                          f"{torch_t * 1e3:9.3f} {torch_t / nk_t:8.2f} "
                          f"{(nk_t - torch_t) * 1e6:11.1f}", flush=True)
    if args.no_compiled:
        return
    print("\ncompiled small CNN (torch.compile, fullgraph), training forward+backward")
    for device in devices:
        nk_t, torch_t = compiled_cnn(device, args.repeat)
        print(f"{device:>6} normkit {nk_t * 1e3:8.3f} ms  torch {torch_t * 1e3:8.3f} ms  "
              f"torch/nk {torch_t / nk_t:5.2f}", flush=True)


if __name__ == "__main__":
    main()
