"""Weight-standardized convolutions: normkit.torch.WSConv2d/3d against the torch compositions of
the same layer and a plain torch convolution; then normkit.nn's WSConv2d/3d (NumPy) against
normkit.nn's plain Conv2d/3d.

    python benchmarks/bench_wsconv.py [--repeat 15] [--device cpu] [--no-numpy]

Peers, on each shape, all float32 NCHW, forward (under no_grad) and forward+backward (autograd:
dx, dweight, dgain, dbias):
  * "var_mean": elektronn3's formula as torch ops (torch.var_mean, rsqrt, max, mul, sub);
  * "batch_norm": timm's StdConv2d form (F.batch_norm over the weight as (1, C_out, K)), with a
    gain multiplied in afterwards;
  * "conv": a plain torch Conv2d/3d on the raw weight (no standardization): the floor.
Prints the median time per call of each (sampled in alternating rounds), and ratios: normkit / conv
(the done-when target is <= 1.2 for fwd+bwd) and peer / normkit (> 1: normkit faster).

Where the convolution dominates (every shape but the batch-1 one), the three layers run the same
torch convolution and differ by less than the machine's noise; so each shape also gets a "weight"
row: the standardization alone on the layer's weight (normkit.torch.ws_standardize against the
two compositions; fwd+bwd: the gradients of weight and gain for a random gradient of w_hat), the
only part in which the layers differ.
"""
import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

import normkit.nn as nkn
import normkit.torch as nkt

seeded = np.random.default_rng  # a layer's generator= for a reproducible initialization

# (N, C_in, C_out, spatial, kernel)
SHAPES = [(1, 512, 512, (7, 7), 3), (8, 256, 256, (14, 14), 3), (8, 64, 64, (56, 56), 3),
          (1, 32, 32, (32, 32, 32), 3)]


def paired_times(fns, repeat, sync):
    """Median seconds per call of each of `fns`, sampled in alternating order (so that the load
    of a shared machine hits all alike); each sample runs long enough (>= 5 ms) for the clock."""
    def sample(fn, number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return time.perf_counter() - t0

    numbers = []
    for fn in fns:
        sample(fn, 2)  # warm-up
        number = 1
        while (t := sample(fn, number)) < 5e-3:
            number = max(2 * number, int(number * 6e-3 / max(t, 1e-7)))
        numbers.append(number)
    times = [[] for _ in fns]
    for r in range(repeat):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(sample(fns[i], numbers[i]) / numbers[i])
    return [float(np.median(t)) for t in times]


def var_mean_weight(w, gain, eps=1e-4):
    """elektronn3's standardize_weight, as torch ops."""
    dims = tuple(range(1, w.dim()))
    var, mean = torch.var_mean(w, dim=dims, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * w.numel(), min=eps)) * gain.view_as(var)
    return w * scale - mean * scale


def batch_norm_weight(w, gain, eps=1e-6):
    """timm's StdConv2d standardization (F.batch_norm over the weight), times a gain."""
    C = w.shape[0]
    w_hat = F.batch_norm(w.reshape(1, C, -1), None, None, weight=gain, training=True,
                         momentum=0.0, eps=eps)
    return w_hat.reshape_as(w)


def torch_cases(shape, device, repeat):
    N, C_in, C_out, spatial, k = shape
    dims = len(spatial)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N, C_in) + spatial, generator=g).to(device)
    ws = (nkt.WSConv2d if dims == 2 else nkt.WSConv3d)(C_in, C_out, k, padding=1).to(device)
    plain = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(C_in, C_out, k,
                                                               padding=1).to(device)
    conv = F.conv2d if dims == 2 else F.conv3d
    w = ws.weight.detach().clone().requires_grad_()
    gain = torch.rand(C_out, generator=g).add_(0.5).to(device).requires_grad_()
    bias = ws.bias.detach().clone().requires_grad_()
    with torch.no_grad():
        ws.gain.copy_(gain)
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(plain(x))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def composed(standardize):
        return lambda inp: conv(inp, standardize(w, gain), bias, 1, 1)

    layers = {"normkit": ws, "var_mean": composed(var_mean_weight),
              "batch_norm": composed(batch_norm_weight), "conv": plain}
    params = {"normkit": [ws.weight, ws.gain, ws.bias], "var_mean": [w, gain, bias],
              "batch_norm": [w, gain, bias], "conv": [plain.weight, plain.bias]}
    results = {}
    for op in ("fwd", "fwd+bwd"):
        fns = []
        for name, layer in layers.items():
            if op == "fwd":
                def fn(layer=layer):
                    with torch.no_grad():
                        layer(x)
            else:
                def fn(layer=layer, ps=params[name]):
                    torch.autograd.grad(layer(xg), [xg] + ps, dy)
            fns.append(fn)
        results[op] = dict(zip(layers, paired_times(fns, repeat, sync)))
    return results


def weight_cases(shape, device, repeat):
    """{op: {name: seconds}} of the standardization alone on this shape's weight."""
    N, C_in, C_out, spatial, k = shape
    g = torch.Generator().manual_seed(1)
    w = (torch.randn((C_out, C_in) + (k,) * len(spatial), generator=g) * 0.05).to(device)
    gain = torch.rand(C_out, generator=g).add_(0.5).to(device)
    w.requires_grad_()
    gain.requires_grad_()
    dw_hat = torch.randn_like(w)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    standardize = {"normkit": lambda: nkt.ws_standardize(w, gain, 1e-4),
                   "var_mean": lambda: var_mean_weight(w, gain),
                   "batch_norm": lambda: batch_norm_weight(w, gain)}
    results = {}
    for op in ("fwd", "fwd+bwd"):
        fns = []
        for fn in standardize.values():
            if op == "fwd":
                def run(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                def run(fn=fn):
                    torch.autograd.grad(fn(), [w, gain], dw_hat)
            fns.append(run)
        results[op] = dict(zip(standardize, paired_times(fns, repeat, sync)))
    return results


def numpy_cases(shape, repeat):
    N, C_in, C_out, spatial, k = shape
    dims = len(spatial)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C_in) + spatial).astype(np.float32)
    ws = (nkn.WSConv2d if dims == 2 else nkn.WSConv3d)(C_in, C_out, k, padding=1,
                                                       generator=seeded(0))
    plain = (nkn.Conv2d if dims == 2 else nkn.Conv3d)(C_in, C_out, k, padding=1,
                                                      generator=seeded(0))
    dy = rng.standard_normal(plain(x).shape).astype(np.float32)
    layers = {"normkit.nn WS": ws, "normkit.nn conv": plain}
    results = {}
    for op in ("fwd", "fwd+bwd"):
        fns = []
        for layer in layers.values():
            if op == "fwd":
                def fn(layer=layer):
                    layer(x)
                    layer._saved = None
            else:
                def fn(layer=layer):
                    layer(x)
                    layer.backward(dy)
                    layer.zero_grad()
            fns.append(fn)
        results[op] = dict(zip(layers, paired_times(fns, repeat, lambda: None)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-numpy", action="store_true", help="skip the normkit.nn part")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for shape in SHAPES:
        N, C_in, C_out, spatial, k = shape
        label = f"N={N} {C_in}->{C_out} {k}^{len(spatial)} on {'x'.join(map(str, spatial))}"
        res = torch_cases(shape, args.device, args.repeat)
        for op, t in res.items():
            nk = t["normkit"]
            print(f"{label:32s} {op:8s} " + "  ".join(f"{n} {v * 1e3:8.3f} ms"
                                                      for n, v in t.items())
                  + f" | normkit/conv {nk / t['conv']:.2f}  var_mean/normkit "
                  f"{t['var_mean'] / nk:.2f}  batch_norm/normkit {t['batch_norm'] / nk:.2f}")
        for op, t in weight_cases(shape, args.device, args.repeat).items():
            nk = t["normkit"]
            print(f"{label:32s} {op:8s} weight: " + "  ".join(f"{n} {v * 1e3:8.3f} ms"
                                                              for n, v in t.items())
                  + f" | var_mean/normkit {t['var_mean'] / nk:.2f}  batch_norm/normkit "
                  f"{t['batch_norm'] / nk:.2f}")
        if not args.no_numpy:
            for op, t in numpy_cases(shape, max(3, args.repeat // 3)).items():
                a, b = t.values()
                print(f"{label:32s} {op:8s} numpy: WS {a * 1e3:8.3f} ms  conv {b * 1e3:8.3f} ms"
                      f" | WS/conv {a / b:.2f}")


if __name__ == "__main__":
    main()
