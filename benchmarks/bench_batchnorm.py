"""normkit batch norm vs PyTorch on the CPU or the GPU, and both vs the memory roofline.

    python benchmarks/bench_batchnorm.py [--repeat 11] [--rounds 5] [--shapes 32,64,56,56 ...]
    python benchmarks/bench_batchnorm.py --device cuda [--dtypes float32 float16]
                                         [--timing graph|eager] [--shapes ...]

For each shape and layout (NCHW, channels-last) and each op (train forward, train
forward+backward, eval forward), prints the median time of normkit and of torch.nn.BatchNorm2d
(float32, run in the same process, alternating in rounds), their ratio, and the roofline: the
fewest bytes the op must move (each input read once, each output written once) over the bandwidth
of a multi-threaded copy of an array the size of the input, measured in the same run.

With --device cuda, normkit runs on CuPy arrays and PyTorch on the same memory as CUDA tensors
(cuDNN's batch norm), float32 and float16 inputs (float32 parameters), and the roofline uses the
bandwidth of a device-to-device copy. Times come from CUDA events: by default of CUDA-graph
replays of each op (device time, without Python's launch overhead); --timing eager times the
Python calls instead (launch overhead included).
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


# --------------------------------------------------------------------------------------------------
# The GPU: normkit on CuPy arrays vs torch's CUDA batch norm (cuDNN), timed with CUDA events.

CUDA_SHAPES = SHAPES + [(256, 64, 112, 112)]


class CudaTimer:
    """Median milliseconds per call of a function queued on the legacy default stream, from CUDA
    events around `repeat` calls. `timing` says whether the functions are graph replays."""

    def __init__(self, timing, repeat):
        import cupy

        self.cp, self.timing, self.repeat = cupy, timing, repeat

    def median_ms(self, fn, rounds=5, warmup=3):
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
            times.append(cp.cuda.get_elapsed_time(start, stop) / self.repeat)
        return float(np.median(times))


def normkit_graph(fn):
    """fn captured once in a CUDA graph on a private memory pool; returns the replay."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    pool = cp.cuda.MemoryPool()
    cp.cuda.Device().synchronize()  # the inputs, made on the default stream, are ready
    with cp.cuda.using_allocator(pool.malloc), stream:
        fn()  # warm up: workspace sizes, first-call setup
        stream.synchronize()
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    null = cp.cuda.Stream.null

    def replay():
        graph.launch(stream=null)

    replay.keep = (graph, pool, stream)
    return replay


def torch_graph(fn):
    """fn captured in a torch CUDA graph after a warm-up on a side stream; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cuda_copy_bandwidth(nbytes, timer):
    """Bytes moved per second (read + write) by a device-to-device copy of `nbytes`."""
    cp = timer.cp
    src, dst = cp.empty(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    kind = 3  # cudaMemcpyDeviceToDevice

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, kind,
                                    cp.cuda.get_current_stream().ptr)

    return 2 * nbytes / (timer.median_ms(copy) * 1e-3)


def cuda_cases(shape, channels_last, dtype, timer, torch_cuda):
    import cupy as cp

    rng = cp.random.default_rng(0)
    C = shape[1]
    x = (rng.standard_normal(shape, dtype=cp.float32) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape, dtype=cp.float32).astype(dtype)
    if channels_last:
        x = cp.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = cp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = rng.random(C, dtype=cp.float32) + 0.5
    b = rng.standard_normal(C, dtype=cp.float32)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)

    def nk_train_fwd():
        F.batch_norm_forward(x, w, b, rm, rv, training=True)

    def nk_train_fwd_bwd():
        _, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=True)
        F.batch_norm_backward(dy, x, mean, invstd, w, training=True)

    def nk_eval_fwd():
        F.batch_norm_forward(x, w, b, rm, rv, training=False)

    ops = {"train fwd": [nk_train_fwd], "train fwd+bwd": [nk_train_fwd_bwd],
           "eval fwd": [nk_eval_fwd]}
    if torch_cuda:
        xt, dyt = torch.from_dlpack(x), torch.from_dlpack(dy)  # the same memory and strides
        xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        bn = torch.nn.BatchNorm2d(C, device="cuda")
        with torch.no_grad():
            bn.weight.copy_(torch.from_dlpack(w))
            bn.bias.copy_(torch.from_dlpack(b))

        def torch_train_fwd():
            with torch.no_grad():
                bn.train()(xt)

        def torch_train_fwd_bwd():
            y = bn.train()(xg)
            torch.autograd.grad(y, (xg, bn.weight, bn.bias), dyt)

        def torch_eval_fwd():
            with torch.no_grad():
                bn.eval()(xt)

        for name, fn in (("train fwd", torch_train_fwd), ("train fwd+bwd", torch_train_fwd_bwd),
                         ("eval fwd", torch_eval_fwd)):
            ops[name].append(fn)
    bandwidth = cuda_copy_bandwidth(x.nbytes, timer)
    for name, fns in ops.items():
        if timer.timing == "graph":
            fns = [normkit_graph(fns[0])] + [torch_graph(f) for f in fns[1:]]
        times = [[] for _ in fns]
        for _ in range(3):  # alternate the libraries so that clock drift hits both alike
            for k, fn in enumerate(fns):
                times[k].append(timer.median_ms(fn))
        nk_ms = float(np.median(times[0]))
        torch_ms = float(np.median(times[1])) if len(times) > 1 else float("nan")
        roofline_ms = TRAFFIC[name] * x.nbytes / bandwidth * 1e3
        yield name, nk_ms, torch_ms, roofline_ms, bandwidth


def cuda_main(args, shapes):
    if not nk.cuda_available():
        raise SystemExit("--device cuda: normkit.cuda_available() is False (no GPU here, or "
                         "normkit was built without CUDA)")
    import cupy as cp

    timer = CudaTimer(args.timing, args.repeat)
    torch_cuda = torch.cuda.is_available()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"normkit {nk.__version__}, cupy {cp.__version__}, torch {torch.__version__} "
          f"({'cuDNN ' + str(torch.backends.cudnn.version()) if torch_cuda else 'no CUDA: no torch column'}), "
          f"{props['name'].decode()}, timing: {args.timing}; times are medians in ms")
    header = (f"{'shape':>18} {'layout':>6} {'dtype':>7} {'op':>14} {'normkit':>9} {'torch':>9} "
              f"{'torch/nk':>8} {'roofline':>9} {'nk/roof':>7} {'copy GB/s':>9}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for dtype in args.dtypes:
            for channels_last in (False, True):
                layout = "NHWC" if channels_last else "NCHW"
                for name, nk_t, torch_t, roof, bw in cuda_cases(shape, channels_last, dtype,
                                                                timer, torch_cuda):
                    print(f"{str(shape):>18} {layout:>6} {dtype:>7} {name:>14} {nk_t:9.3f} "
                          f"{torch_t:9.3f} {torch_t / nk_t:8.2f} {roof:9.3f} {nk_t / roof:7.2f} "
                          f"{bw / 1e9:9.1f}", flush=True)
                cp.get_default_memory_pool().free_all_blocks()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="calls timed per round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of normkit and torch; the table shows the median")
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="shapes as N,C,H,W (default: the three of the issue; on cuda also "
                             "256,64,112,112)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float16"],
                        help="input dtypes on cuda (parameters are float32)")
    parser.add_argument("--timing", choices=["graph", "eager"], default="graph",
                        help="on cuda: time CUDA-graph replays (device time) or Python calls")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.device == "cuda":
        return cuda_main(args, shapes if args.shapes else CUDA_SHAPES)
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
