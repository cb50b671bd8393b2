"""StochNorm and MixStyle (normkit.torch) vs the torch compositions of upstream's formulas, on the
CPU, forward+backward, float32.

    python benchmarks/bench_stochastic.py [--repeat 3] [--rounds 5] [--shapes 32,64,56,56 ...]

For each shape and layout (NCHW, channels_last) prints the median time of one training
forward+backward of:

* StochNorm2d (p=0.5): normkit.torch.StochNorm2d; normkit.torch.BatchNorm2d (the done-when bound:
  at most 1.2x); torch.nn.BatchNorm2d; tllib's formula as torch ops (a training and an eval batch
  norm of the input, blended per channel by the Bernoulli draw).
* MixStyle (p=1): normkit.torch.MixStyle; Dassl's formula as torch ops (mean, var, normalize,
  mix the detached statistics), with its draws (Beta lambdas, a permutation) in both.

Every candidate runs in the same process, alternating in rounds; the table gives medians over all
rounds and the ratios to normkit's layer (> 1: normkit is faster).
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as tF

import normkit.torch as nkt

SHAPES = [(32, 64, 56, 56), (32, 256, 28, 28)]


def once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def tllib_stochnorm(x, bn_weight, bn_bias, rm, rv, p):
    """tllib's StochNorm training forward: two full batch norms and a blend."""
    C = x.shape[1]
    s = torch.from_numpy(np.random.default_rng(0).binomial(1, p, C).reshape(1, C, 1, 1)).float()
    z0 = tF.batch_norm(x, rm, rv, bn_weight, bn_bias, False, 0.1, 1e-5)
    z1 = tF.batch_norm(x, rm, rv, bn_weight, bn_bias, True, 0.1, 1e-5)
    return (1 - s) * z0 + s * z1


def dassl_mixstyle(x, alpha=0.1, eps=1e-6):
    """Dassl's MixStyle training forward (p = 1, mix = "random") as torch ops."""
    B = x.size(0)
    mu = x.mean(dim=[2, 3], keepdim=True)
    var = x.var(dim=[2, 3], keepdim=True)
    sig = (var + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()
    x_normed = (x - mu) / sig
    lmda = torch.distributions.Beta(alpha, alpha).sample((B, 1, 1, 1)).to(x.device)
    perm = torch.randperm(B)
    mu2, sig2 = mu[perm], sig[perm]
    mu_mix = mu * lmda + mu2 * (1 - lmda)
    sig_mix = sig * lmda + sig2 * (1 - lmda)
    return x_normed * sig_mix + mu_mix


def candidates(shape, channels_last):
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    x.requires_grad_()

    def step(module_or_fn):
        def run():
            y = module_or_fn(x)
            y.backward(dy)
            x.grad = None
        return run

    sn = nkt.StochNorm2d(C, p=0.5, generator=torch.Generator().manual_seed(1))
    nbn = nkt.BatchNorm2d(C)
    tbn = torch.nn.BatchNorm2d(C)
    w = torch.nn.Parameter(torch.rand(C))
    b = torch.nn.Parameter(torch.zeros(C))
    rm, rv = torch.zeros(C), torch.ones(C)
    ms = nkt.MixStyle(p=1.0, generator=torch.Generator().manual_seed(2))
    return {
        "StochNorm2d": [("normkit StochNorm2d", step(sn)),
                        ("normkit BatchNorm2d", step(nbn)),
                        ("torch BatchNorm2d", step(tbn)),
                        ("tllib formula", step(lambda t: tllib_stochnorm(t, w, b, rm, rv, 0.5)))],
        "MixStyle": [("normkit MixStyle", step(ms)),
                     ("Dassl formula", step(dassl_mixstyle))],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per candidate per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=None, help="N,C,H,W ...")
    args = ap.parse_args()
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else SHAPES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, "
          f"median ms over {args.rounds} rounds x {args.repeat}")
    for shape in shapes:
        for cl in (False, True):
            for family, cands in candidates(shape, cl).items():
                for _, fn in cands:  # warm up
                    fn()
                times = {name: [] for name, _ in cands}
                for _ in range(args.rounds):
                    for name, fn in cands:
                        times[name] += [once(fn) for _ in range(args.repeat)]
                med = {name: float(np.median(t)) for name, t in times.items()}
                ours = med[cands[0][0]]
                print(f"\n{family} {shape} {'channels_last' if cl else 'NCHW'}")
                for name, _ in cands:
                    print(f"  {name:22s} {med[name] * 1e3:9.2f} ms   "
                          f"{med[name] / ours:5.2f}x normkit's time")


if __name__ == "__main__":
    main()
