"""normkit.torch.Encoding vs PyTorch compositions of the same math, all on torch tensors (the
adapter's costs included: DLPack capsules, output allocation, autograd.Function).

    python benchmarks/bench_torch_encoding.py [--repeat 11] [--shapes B,D,H,W,K ...]
                                              [--device cpu|cuda] [--broadcast-limit-mib 512]
                                              [--between-gemm-threads N]

Variants, float32, x (B, D, H, W) NCHW, codewords C (K, D), scale s (K,):
  normkit     normkit.torch.Encoding: torch's matmul (its BLAS) + the core's fused kernels.
  torch-gemm  bench_encoding.py's best GEMM form in torch ops, differentiated by autograd.
  broadcast   bench_encoding.py's PyTorch-Encoding CPU composition (residuals materialized); run
              only where one B*N*K*D float32 tensor stays under --broadcast-limit-mib.
Ops: forward under no_grad, and forward + backward (dx, dC, ds by torch.autograd.grad).
Prints the median time per call of each variant (sampled in turns in one process, as
bench_torch.py does, so that the load of a shared machine hits all alike) and peer / normkit
(> 1: normkit faster). On CUDA each sample ends with a synchronize.

--between-gemm-threads N runs the core's CPU kernels on N OpenMP threads (default 1, the calling
thread; 0: OpenMP's default). In a torch process they share torch's OpenMP runtime and pool (one
libgomp is loaded), which also runs torch's BLAS, so more threads there compete with nothing.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encoding import broadcast_encoding, gemm_encoding  # noqa: E402
from bench_torch import paired_times  # noqa: E402

import normkit  # noqa: E402
import normkit.torch as nkt  # noqa: E402

# A small shape where per-call overhead shows, a middle one where the broadcast composition fits,
# then bench_encoding.py's two.
SHAPES = [(2, 32, 8, 8, 8), (8, 64, 16, 16, 32), (16, 512, 32, 32, 32), (8, 128, 64, 64, 64)]


def variants(shape, device, broadcast_limit):
    """name -> (forward, forward + backward) closures over the same inputs and parameters."""
    B, D, H, W, K = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, H, W, generator=g).to(device)
    dE = torch.randn(B, K, D, generator=g).to(device)
    layer = nkt.Encoding(D, K, device=device)
    xg = x.clone().requires_grad_()
    C, s = layer.codewords, layer.scale

    def pair(fn):
        def forward():
            with torch.no_grad():
                fn(x)

        def forward_backward():
            torch.autograd.grad(fn(xg), (xg, C, s), dE)

        return forward, forward_backward

    out = {"normkit": pair(layer), "torch-gemm": pair(lambda t: gemm_encoding(t, C, s))}
    if B * H * W * K * D * 4 <= broadcast_limit * 2**20:
        out["broadcast"] = pair(lambda t: broadcast_encoding(t, C, s))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--shapes", nargs="*", default=None, help="shapes as B,D,H,W,K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--broadcast-limit-mib", type=float, default=512)
    parser.add_argument("--between-gemm-threads", type=int, default=None)
    args = parser.parse_args()
    if args.between_gemm_threads is not None:
        normkit.functional.set_between_gemm_threads(args.between_gemm_threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    between = normkit.functional.get_between_gemm_threads()
    print(f"normkit {normkit.__version__}, torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} torch threads, {between} between-GEMM thread(s) (0: "
          f"OpenMP's default), float32; median ms per call")
    header = (f"{'B,D,H,W,K':>18} {'op':>8} {'normkit':>9} {'torch-gemm':>10} {'x':>6} "
              f"{'broadcast':>10} {'x':>6}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        vs = variants(shape, args.device, args.broadcast_limit_mib)
        names = list(vs)
        for op, index in (("fwd", 0), ("fwd+bwd", 1)):
            t = dict(zip(names, paired_times([vs[n][index] for n in names], args.repeat, sync)))
            nk = t["normkit"]
            bc = (f"{t['broadcast'] * 1e3:10.2f} {t['broadcast'] / nk:6.2f}" if "broadcast" in t
                  else f"{'skipped':>10} {'':>6}")
            print(f"{','.join(map(str, shape)):>18} {op:>8} {nk * 1e3:9.2f} "
                  f"{t['torch-gemm'] * 1e3:10.2f} {t['torch-gemm'] / nk:6.2f} {bc}", flush=True)


if __name__ == "__main__":
    main()
