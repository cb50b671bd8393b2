"""normkit.torch.SyncBatchNorm's device-count path over the default torch.distributed group, in
one process: a 2-rank "fake" group (torch's test backend: its all-reduce returns the input, so the
synchronized layer computes this rank's own batch norm). Run by tests/test_torch_dist.py as
``python check_device_count.py DEVICE``.

cuda: the path CUDA tensors take. A training step (forward and backward, NCHW and channels-last)
runs under torch.cuda.set_sync_debug_mode("error"), which raises on any host synchronization, is
captured in a CUDA graph and replays to the eager result; outputs, gradients and running
statistics equal normkit's BatchNorm2d on the same batch.
cpu: the same path forced on CPU tensors (no sync check or graph), against BatchNorm2d.
Prints "ok NAME" per check and "ALL OK".
"""
import copy
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import normkit.torch as nkt
from normkit.torch import sync_batchnorm as nk_sync

device = sys.argv[1]
dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
if device == "cpu":
    nk_sync.SyncBatchNorm._counts_on_device = staticmethod(lambda input: True)
nk_sync.sync_batch_norm = None  # the host-count path: calling it would be a TypeError


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def layers():
    sync = nkt.SyncBatchNorm(6)
    with torch.no_grad():
        sync.weight.copy_(randn(6, seed=1).abs() + 0.5)
        sync.bias.copy_(randn(6, seed=2))
    plain = nkt.BatchNorm2d(6)
    plain.load_state_dict(sync.state_dict())
    return sync.to(device), plain.to(device)


def close(name, got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    print(f"ok {name}", flush=True)


def step(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


for fmt in (torch.contiguous_format, torch.channels_last):
    name = "channels_last" if fmt is torch.channels_last else "NCHW"
    sync, plain = layers()
    x = (randn(5, 6, 7, 3, seed=3) * 2 + 1).to(device).contiguous(memory_format=fmt)
    dy = randn(5, 6, 7, 3, seed=4).to(device).contiguous(memory_format=fmt)
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, kernels) outside the checks
            step(copy.deepcopy(sync), x, dy)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    got = step(sync, x, dy)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode(0)
        print(f"ok {name}: no host synchronization", flush=True)
    close(f"{name}: y, dx, dweight, dbias", got, step(plain, x, dy))
    close(f"{name}: running statistics", [sync.running_mean, sync.running_var],
          [plain.running_mean, plain.running_var])
    if device == "cuda":
        eager = copy.deepcopy(sync)
        xg = x.detach().clone().requires_grad_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = sync(xg)
            y.backward(dy)
        graph.replay()
        torch.cuda.synchronize()
        close(f"{name}: CUDA graph replay", [y, xg.grad], step(eager, x, dy)[:2])

print("ALL OK", flush=True)
dist.destroy_process_group()
