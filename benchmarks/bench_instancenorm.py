"""normkit instance norm and group norm vs PyTorch on the CPU or the GPU, and vs the roofline.

    python benchmarks/bench_instancenorm.py [--repeat 11] [--rounds 5] [--shapes 32,64,56,56 ...]
    python benchmarks/bench_instancenorm.py --device cuda [--dtypes float32 float16]

For each case (instance norm on (32,64,56,56), (8,256,28,28), (64,512,7,7), (2,32,48,64,64);
GroupNorm(32, 256) on (32,256,28,28)), layout (NCHW, channels-last) and op (forward,
forward+backward), prints the median time of normkit and of each torch peer: torch.nn.
InstanceNorm*d (affine), F.group_norm(x, C) (torch's fastest instance norm) and for group norm
torch.nn.GroupNorm, all float32, run in the same process and alternating in rounds; the ratios
torch/normkit; and the roofline: the fewest bytes the op must move (each input read once, each
output written once) over the bandwidth of a multi-threaded copy of an array of the input's size,
measured in the same run.

With --device cuda, normkit runs on CuPy arrays and torch on the same memory as CUDA tensors,
timed with CUDA events around eager calls (launch overhead included), and the roofline uses a
device-to-device copy's bandwidth.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as TF

import normkit as nk
from normkit import functional as F

# (shape, groups): groups = C is instance norm
CASES = [((32, 64, 56, 56), 64), ((8, 256, 28, 28), 256), ((64, 512, 7, 7), 512),
         ((2, 32, 48, 64, 64), 32), ((32, 256, 28, 28), 32)]
# Tensors of the input's size each op must read or write at least once.
TRAFFIC = {"fwd": 2, "fwd+bwd": 5}


def median_time(fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(nbytes, repeat):
    """Bytes moved per second (read + write) by the fastest copy available: torch's threaded copy_
    or NumPy's, over arrays of `nbytes`."""
    n = nbytes // 4
    src_t, dst_t = torch.randn(n), torch.empty(n)
    src_n, dst_n = src_t.numpy(), np.empty(n, np.float32)
    best = min(median_time(lambda: dst_t.copy_(src_t), repeat),
               median_time(lambda: np.copyto(dst_n, src_n), repeat))
    return 2 * nbytes / best


def channels_last(a, xp=np):
    perm = (0,) + tuple(range(2, a.ndim)) + (1,)
    return xp.ascontiguousarray(a.transpose(perm)).transpose(tuple(np.argsort(perm)))


def normkit_ops(x, dy, groups, w, b):
    def fwd():
        F.group_norm_forward(x, groups, w, b)

    def fwd_bwd():
        _, mean, rstd = F.group_norm_forward(x, groups, w, b)
        F.group_norm_backward(dy, x, mean, rstd, w, b)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def torch_peers(xt, dyt, groups, w, b, ndim):
    """name -> {op: fn} for the torch implementations of this case."""
    C = xt.shape[1]
    wt, bt = torch.from_dlpack(w).clone(), torch.from_dlpack(b).clone()
    xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()
    peers = {}
    if groups == C:
        cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d,
               5: torch.nn.InstanceNorm3d}[ndim]
        layer = cls(C, affine=True).to(xt.device)
        with torch.no_grad():
            layer.weight.copy_(wt)
            layer.bias.copy_(bt)
        peers[cls.__name__] = _module_ops(layer, xt, xg, dyt)
    else:
        layer = torch.nn.GroupNorm(groups, C).to(xt.device)
        with torch.no_grad():
            layer.weight.copy_(wt)
            layer.bias.copy_(bt)
        peers["GroupNorm"] = _module_ops(layer, xt, xg, dyt)

    def fwd():
        with torch.no_grad():
            TF.group_norm(xt, groups, wt, bt)

    def fwd_bwd():
        y = TF.group_norm(xg, groups, wg, bg)
        torch.autograd.grad(y, (xg, wg, bg), dyt)

    peers[f"F.group_norm(x,{groups})"] = {"fwd": fwd, "fwd+bwd": fwd_bwd}
    return peers


def _module_ops(layer, xt, xg, dyt):
    def fwd():
        with torch.no_grad():
            layer(xt)

    def fwd_bwd():
        y = layer(xg)
        torch.autograd.grad(y, (xg, layer.weight, layer.bias), dyt)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def make_inputs(shape, cl, xp):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    dy = rng.standard_normal(shape, dtype=np.float32)
    if cl:
        x, dy = channels_last(x), channels_last(dy)
    w = rng.random(C, dtype=np.float32) + 0.5
    b = rng.standard_normal(C, dtype=np.float32)
    if xp is not np:
        x, dy = channels_last(xp.asarray(np.ascontiguousarray(x)), xp) if cl else xp.asarray(x), \
            channels_last(xp.asarray(np.ascontiguousarray(dy)), xp) if cl else xp.asarray(dy)
        w, b = xp.asarray(w), xp.asarray(b)
    return x, dy, w, b


def rows(shape, groups, cl, repeat, rounds, timer=None, xp=np):
    x, dy, w, b = make_inputs(shape, cl, xp)
    xt, dyt = torch.from_dlpack(x), torch.from_dlpack(dy)  # the same memory and strides
    ours = normkit_ops(x, dy, groups, w, b)
    peers = torch_peers(xt, dyt, groups, w, b, len(shape))
    nbytes = x.nbytes
    bandwidth = timer.copy_bandwidth(nbytes) if timer else float(
        np.median([copy_bandwidth(nbytes, repeat) for _ in range(rounds)]))
    measure = timer.median_s if timer else (lambda fn: median_time(fn, repeat))
    for op in ("fwd", "fwd+bwd"):
        fns = [ours[op]] + [p[op] for p in peers.values()]
        times = [[] for _ in fns]
        for _ in range(rounds):  # alternate so that drift in the machine's speed hits all alike
            for k, fn in enumerate(fns):
                times[k].append(measure(fn))
        med = [float(np.median(t)) for t in times]
        yield op, med[0], dict(zip(peers, med[1:])), TRAFFIC[op] * nbytes / bandwidth, bandwidth


class CudaTimer:
    """Median seconds per eager call from CUDA events around `repeat` calls."""

    def __init__(self, repeat):
        import cupy

        self.cp, self.repeat = cupy, repeat

    def median_s(self, fn, rounds=3, warmup=3):
        cp = self.cp
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(self.repeat):
                fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3 / self.repeat)
        return float(np.median(times))

    def copy_bandwidth(self, nbytes):
        cp = self.cp
        src, dst = cp.empty(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
        return 2 * nbytes / self.median_s(lambda: dst.__setitem__(Ellipsis, src))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="calls timed per round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of normkit and torch; the table shows medians")
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="instance-norm shapes as N,C,H,W (default: the issue's cases)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    cases = ([(tuple(int(v) for v in s.split(",")), int(s.split(",")[1])) for s in args.shapes]
             if args.shapes else CASES)
    timer, xp = None, np
    if args.device == "cuda":
        if not nk.cuda_available():
            raise SystemExit("--device cuda: normkit.cuda_available() is False (no GPU here, or "
                             "normkit was built without CUDA)")
        import cupy

        timer, xp = CudaTimer(args.repeat), cupy
    print(f"normkit {nk.__version__}, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} CPU threads, float32; times are medians in ms; "
          f"ratio = peer / normkit")
    header = (f"{'shape':>20} {'G':>4} {'layout':>6} {'op':>8} {'normkit':>9} {'roofline':>9} "
              f"{'nk/roof':>7} {'copy GB/s':>9}  peers: ms (ratio)")
    print(header)
    print("-" * (len(header) + 40))
    for shape, groups in cases:
        for cl in (False, True):
            layout = "NHWC" if cl else "NCHW"
            for op, nk_t, peer_t, roof, bw in rows(shape, groups, cl, args.repeat, args.rounds,
                                                   timer, xp):
                peers = "  ".join(f"{name} {t * 1e3:.3f} ({t / nk_t:.2f}x)"
                                  for name, t in peer_t.items())
                print(f"{str(shape):>20} {groups:>4} {layout:>6} {op:>8} {nk_t * 1e3:9.3f} "
                      f"{roof * 1e3:9.3f} {nk_t / roof:7.2f} {bw / 1e9:9.1f}  {peers}",
                      flush=True)


if __name__ == "__main__":
    main()
