"""normkit's Encoding layer (forward + backward) against two PyTorch compositions of the same math,
on the CPU in float32: time and peak extra memory.

    python benchmarks/bench_encoding.py [--threads N] [--repeat 6] [--rounds 3]
                                        [--shapes B,D,H,W,K ...]

Variants, each computing E (B, K, D) from x (B, D, H, W), then dx, dcodewords and dscale for a
random dE:
  normkit    nn.Encoding: GEMMs on NumPy's BLAS + the core's fused kernels.
  broadcast  the composition PyTorch-Encoding ships for the CPU: scaled_l2 and aggregate as
             autograd Functions over X[:, :, None, :] - C, which materialize B*N*K*D tensors,
             with their hand-written backwards (including ds from SL / s).
  torch-gemm the best GEMM form in torch ops that this file's author found (of four tried):
             ||x||^2 (summed over the contiguous (B, D, N) input) + ||c||^2 - 2 X C^T as one
             baddbmm, softmax, E = A^T X - (sum_i A) c as one baddbmm; autograd backward.

--threads N sets every thread pool (OpenMP: normkit's kernels and torch; OpenBLAS: NumPy's GEMMs;
MKL) to N threads; without it each library uses its default (all cores). On a machine shared with
other work, multi-threaded timings mostly measure the other work: use --threads 1 there.

Time: median over rounds of each variant's median of `repeat` runs after a warm-up, each in a fresh
process (so that no variant's thread pools or heap sway another's), the variants alternating in
rounds so that drift in the machine's speed hits all alike.
Memory: peak extra resident memory of one forward + backward, measured in a fresh subprocess per
variant: after a warm-up run (BLAS buffers, thread pools), the kernel's resident high-water mark
(VmHWM) is reset through /proc/self/clear_refs, and the peak over the run is read from
/proc/self/status minus the resident size just before it. glibc's mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so that freed blocks go back to the system and later peaks are seen.
For normkit the peak of NumPy's allocations under tracemalloc is printed too, as a cross-check.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

if "--threads" in sys.argv:  # before NumPy and torch start their thread pools
    _n = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _n

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = [(16, 512, 32, 32, 32), (8, 128, 64, 64, 64)]
VARIANTS = ["normkit", "broadcast", "torch-gemm"]


# --------------------------------------------------------------------------------------------------
# The PyTorch-Encoding CPU composition (encoding/lib/cpu/encoding_cpu.cpp + functions/encoding.py).


class _ScaledL2Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, C, S):
        B, N, K, D = X.shape[0], X.shape[1], C.shape[0], C.shape[1]
        SL = S.view(1, 1, K) * (X.unsqueeze(2).expand(B, N, K, D) - C[None, None]).pow(2).sum(3)
        ctx.save_for_backward(X, C, S, SL)
        return SL

    @staticmethod
    def backward(ctx, gSL):
        X, C, S, SL = ctx.saved_tensors
        B, N, K, D = X.shape[0], X.shape[1], C.shape[0], C.shape[1]
        tmp = (2 * gSL * S.view(1, 1, K)).unsqueeze(3) * (X.unsqueeze(2).expand(B, N, K, D)
                                                           - C[None, None])
        return tmp.sum(2), -tmp.sum(0).sum(0), (gSL * (SL / S.view(1, 1, K))).sum(0).sum(0)


class _AggregateBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, X, C):
        B, N, K, D = X.shape[0], X.shape[1], C.shape[0], C.shape[1]
        ctx.save_for_backward(A, X, C)
        return (A.unsqueeze(3) * (X.unsqueeze(2).expand(B, N, K, D) - C[None, None])).sum(1)

    @staticmethod
    def backward(ctx, gE):
        A, X, C = ctx.saved_tensors
        B, N, K, D = X.shape[0], X.shape[1], C.shape[0], C.shape[1]
        gA = (gE.unsqueeze(1) * (X.unsqueeze(2).expand(B, N, K, D) - C[None, None])).sum(3)
        return gA, torch.bmm(A, gE), (-gE * A.sum(1).unsqueeze(2)).sum(0)


def broadcast_encoding(x, C, s):
    B, D = x.shape[:2]
    X = x.view(B, D, -1).transpose(1, 2).contiguous()
    A = torch.softmax(_ScaledL2Broadcast.apply(X, C, s), dim=2)
    return _AggregateBroadcast.apply(A, X, C)


def gemm_encoding(x, C, s):
    B, D = x.shape[:2]
    K = C.shape[0]
    xv = x.view(B, D, -1)
    X = xv.transpose(1, 2)  # (B, N, D), no copy
    d2 = torch.baddbmm((xv * xv).sum(1).unsqueeze(2) + (C * C).sum(1), X,
                       C.t().expand(B, D, K), alpha=-2)
    A = torch.softmax(d2 * s, dim=2)
    return torch.baddbmm(-A.sum(1).unsqueeze(2) * C, A.transpose(1, 2), X)


# --------------------------------------------------------------------------------------------------
# One variant's forward + backward as a closure over fixed inputs.


def make_step(variant, shape):
    B, D, H, W, K = shape
    g = np.random.default_rng(0)
    x = g.standard_normal((B, D, H, W), dtype=np.float32)
    dE = g.standard_normal((B, K, D), dtype=np.float32)
    if variant == "normkit":
        import normkit as nk

        layer = nk.nn.Encoding(D, K, generator=np.random.default_rng(1))

        def step():
            layer(x)
            layer.backward(dE)
            layer.zero_grad()

        return step
    bound = 1 / np.sqrt(K * D)
    C = torch.empty(K, D).uniform_(-bound, bound).requires_grad_()
    s = torch.empty(K).uniform_(-1, 0).requires_grad_()
    xt = torch.from_numpy(x).requires_grad_()
    dEt = torch.from_numpy(dE)
    fn = broadcast_encoding if variant == "broadcast" else gemm_encoding

    def step():
        torch.autograd.grad(fn(xt, C, s), (xt, C, s), dEt)

    return step


def median_time(step, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_variant(variant, shape, repeat):
    """Runs in the subprocess: the median time of `repeat` steps after a warm-up one."""
    step = make_step(variant, shape)
    step()
    return {"time": median_time(step, repeat)}


def times(shape, repeat, rounds):
    per_round = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            # the broadcast composition is slow: fewer repeats keep the benchmark short
            n = max(1, repeat // 2) if v == "broadcast" else repeat
            per_round[v].append(in_subprocess("--time-of", v, shape, n)["time"])
    return {v: float(np.median(t)) for v, t in per_round.items()}


# --------------------------------------------------------------------------------------------------
# Memory, in a subprocess per variant.


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(variant, shape):
    """Runs in the subprocess: peak extra RSS (bytes) of one step, and for normkit the tracemalloc
    peak of NumPy's allocations."""
    step = make_step(variant, shape)
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    result = {"rss": (_status_kib("VmHWM") - before) * 1024}
    if variant == "normkit":
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        step()
        result["tracemalloc"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result


def in_subprocess(flag, variant, shape, repeat=1):
    """Runs this file with `flag` for one variant in a fresh process: no other library's thread
    pool (OpenBLAS's keeps spinning for ~0.1 s after a product, torch's OpenMP one for less) or
    heap left over from another variant sways it."""
    env = dict(os.environ)  # carries --threads' settings
    if flag == "--memory-of":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    out = subprocess.run([sys.executable, __file__, flag, variant, "--repeat", str(repeat),
                          "--shapes", ",".join(map(str, shape))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


# --------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", default=None, help="shapes as B,D,H,W,K")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every pool (default: each library's own)")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--time-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, shapes[0])))
        return
    if args.time_of:
        print(json.dumps(time_variant(args.time_of, shapes[0], args.repeat)))
        return
    import normkit as nk

    threads = f"{args.threads} thread(s) everywhere" if args.threads else "default threads"
    print(f"normkit {nk.__version__}, torch {torch.__version__}, numpy {np.__version__}, {threads} "
          f"(torch: {torch.get_num_threads()}); float32 forward + backward; times are medians in "
          f"ms, memory is peak extra RSS in MiB")
    header = (f"{'B,D,H,W,K':>18} {'variant':>10} {'time':>9} {'x normkit':>9} {'memory':>8} "
              f"{'x normkit':>9}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        t = times(shape, args.repeat, args.rounds)
        mem = {v: in_subprocess("--memory-of", v, shape) for v in VARIANTS}
        for v in VARIANTS:
            print(f"{','.join(map(str, shape)):>18} {v:>10} {t[v] * 1e3:9.1f} "
                  f"{t[v] / t['normkit']:9.2f} {mem[v]['rss'] / 2**20:8.1f} "
                  f"{mem[v]['rss'] / mem['normkit']['rss']:9.2f}", flush=True)
        print(f"{'':>18} normkit's NumPy allocations peak at "
              f"{mem['normkit']['tracemalloc'] / 2**20:.1f} MiB (tracemalloc)")


if __name__ == "__main__":
    main()
