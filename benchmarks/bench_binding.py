"""Host cost of handing arrays to the core through DLPack, without a GPU: the part of every CUDA
op's overhead that the binding adds before any launch.

    python benchmarks/bench_binding.py [--repeat 9] [--calls 5000]

Peers, each a _C.batch_norm_normalize on (2, 4) float32 with its 6 arrays (x, mean, invstd,
weight, bias, y) given as:
  * "exporters": stand-ins shaped like CuPy arrays: __dlpack_device__, __dlpack__ (exporting a
    NumPy capsule; CuPy's own export is not in it), a __cuda_array_interface__ property that
    builds its dict on each access, and no torch is_neg / is_conj;
  * "capsules": the same arrays' NumPy capsules made in Python first: the floor (capsule parse
    and the op on the CPU).
And the workspace-size step of normkit.functional's launch_args on such a stand-in: the
binding's query on every call ("query") against the size remembered per shape ("remembered").
Prints the median microseconds per call of each (alternating rounds) and the ratio to its floor.
"""
import argparse
import statistics
import timeit

import numpy as np

from normkit import _C
from normkit._backend import remembered_workspace_size


class Device:
    def __init__(self, index):
        self.id = index


class Exporter:
    """A CuPy-shaped stand-in over NumPy array `a` (its device a fresh object per access)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype = a, a.shape, a.dtype

    @property
    def device(self):
        return Device(0)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU: the op runs here

    def __dlpack__(self, stream=None):
        return self.a.__dlpack__()

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.a.shape, "typestr": self.a.dtype.str, "version": 3,
                "strides": None, "data": (self.a.ctypes.data, False), "stream": 1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    arrays = [x, *(np.ones(4, np.float32) for _ in range(4)), np.empty_like(x)]
    exporters = [Exporter(a) for a in arrays]
    big = Exporter(np.zeros((8, 64, 14, 14), np.float32))
    query = _C.batch_norm_workspace_size
    cases = {
        "exporters": lambda: _C.batch_norm_normalize(*exporters),
        "capsules": lambda: _C.batch_norm_normalize(*[a.__dlpack__() for a in arrays]),
        "query": lambda: query(big),
        "remembered": lambda: remembered_workspace_size(
            (query, (), big.shape, big.dtype, big.device.id), lambda: query(big)),
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, call in cases.items():
            times[name].append(timeit.timeit(call, number=args.calls) / args.calls * 1e6)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:10s} median {median[name]:6.2f} us  (range {min(t):.2f}-{max(t):.2f})")
    print(f"exporters / capsules: {median['exporters'] / median['capsules']:.2f}")
    print(f"query / remembered:   {median['query'] / median['remembered']:.2f}")


if __name__ == "__main__":
    main()
