"""normkit batch norm vs PyTorch on the CPU, and both vs the memory roofline.

    python benchmarks/bench_batchnorm.py [--repeat 11] [--rounds 5] [--shapes 32,64,56,56 ...]

For each shape and layout (NCHW, channels-last) and each op (train forward, train
forward+backward, eval forward), prints the median time of normkit and of torch.nn.BatchNorm2d
(float32, run in the same process, alternating in rounds), their ratio, and the roofline: the fewest bytes
the op must move (each input read once, each output written once) over the bandwidth of a
multi-threaded copy of an array the size of the input, measured in the same run.
"""
import argparse
import time

import numpy as np
import torch

import normkit as nk
from normkit import functional as F

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (8, 32, 128, 128)]
# Tensors of the input's size each op must read or write at least once.
TRAFFIC = {"train fwd": 2, "train fwd+bwd": 5, "eval fwd": 2}


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


def cases(shape, channels_last, repeat, rounds):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    dy = rng.standard_normal(shape, dtype=np.float32)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = rng.random(C, dtype=np.float32) + 0.5
    b = rng.standard_normal(C, dtype=np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    def nk_train_fwd():
        F.batch_norm_forward(x, w, b, rm, rv, training=True)

    def nk_train_fwd_bwd():
        _, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=True)
        F.batch_norm_backward(dy, x, mean, invstd, w, training=True)

    def nk_eval_fwd():
        F.batch_norm_forward(x, w, b, rm, rv, training=False)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xt = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=fmt)
    dyt = torch.from_numpy(np.ascontiguousarray(dy)).contiguous(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(w))
        bn.bias.copy_(torch.from_numpy(b))
    xg = xt.clone().requires_grad_()

    def torch_train_fwd():
        bn.train()
        with torch.no_grad():
            bn(xt)

    def torch_train_fwd_bwd():
        bn.train()
        y = bn(xg)
        torch.autograd.grad(y, (xg, bn.weight, bn.bias), dyt)

    def torch_eval_fwd():
        bn.eval()
        with torch.no_grad():
            bn(xt)

    ops = {"train fwd": (nk_train_fwd, torch_train_fwd),
           "train fwd+bwd": (nk_train_fwd_bwd, torch_train_fwd_bwd),
           "eval fwd": (nk_eval_fwd, torch_eval_fwd)}
    bandwidth = float(np.median([copy_bandwidth(x.nbytes, repeat) for _ in range(rounds)]))
    for name, (nk_fn, torch_fn) in ops.items():
        # Alternate the two in rounds so that drift in the machine's speed hits both alike.
        nk_t, torch_t = [], []
        for _ in range(rounds):
            nk_t.append(median_time(nk_fn, repeat))
            torch_t.append(median_time(torch_fn, repeat))
        nk_med, torch_med = float(np.median(nk_t)), float(np.median(torch_t))
        roofline = TRAFFIC[name] * x.nbytes / bandwidth
        yield name, nk_med, torch_med, roofline, bandwidth


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="calls timed per round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of normkit and torch; the table shows the median")
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="shapes as N,C,H,W (default: the three of the issue)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(f"normkit {nk.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32; times are medians in ms")
    header = (f"{'shape':>18} {'layout':>6} {'op':>14} {'normkit':>9} {'torch':>9} "
              f"{'torch/nk':>8} {'roofline':>9} {'nk/roof':>7} {'copy GB/s':>9}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for channels_last in (False, True):
            layout = "NHWC" if channels_last else "NCHW"
            for name, nk_t, torch_t, roof, bw in cases(shape, channels_last, args.repeat, args.rounds):
                print(f"{str(shape):>18} {layout:>6} {name:>14} {nk_t * 1e3:9.3f} "
                      f"{torch_t * 1e3:9.3f} {torch_t / nk_t:8.2f} {roof * 1e3:9.3f} "
                      f"{nk_t / roof:7.2f} {bw / 1e9:9.1f}", flush=True)


if __name__ == "__main__":
    main()
