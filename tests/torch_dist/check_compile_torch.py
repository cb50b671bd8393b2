"""normkit.torch.SyncBatchNorm under torch.compile across processes, run by tests/test_torch_dist.py
as ``torchrun --nproc_per_node=2 check_compile_torch.py`` (a gloo group, CPU tensors) and as
``mpiexec -n 2 python check_compile_torch.py mpi`` (normkit's MPICommunicator).

gloo: a Conv2d -> SyncBatchNorm -> ReLU -> SyncBatchNorm(process_group) ->
SyncBatchNorm(comm=TorchCommunicator()) model; mpi: Conv2d -> SyncBatchNorm(comm) -> ReLU ->
SyncBatchNorm(comm) (the communicator's all-reduce compiled as the op normkit::allreduce_sum).
On uneven per-rank batches: torch._dynamo.explain finds no graph break, and
torch.compile(fullgraph=True), static and dynamic shapes, training forward and backward, gives the
eager layers' outputs, gradients, running statistics and shift. gloo also: the eager path of CUDA
tensors (the global count on the device), forced on CPU tensors, equals the default eager path.
Each rank prints "rank R: ok NAME" per check and "rank R: ALL OK".
"""
import datetime
import sys

import torch
import torch.distributed as dist

import normkit.torch as nkt

MODE = sys.argv[1] if len(sys.argv) > 1 else "gloo"
if MODE == "gloo":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
else:
    from normkit.distributed import MPICommunicator

    comm = MPICommunicator()
    rank = comm.rank
torch.set_default_dtype(torch.float64)


def log(name):
    print(f"rank {rank}: ok {name}", flush=True)


def model():
    torch.manual_seed(0)
    if MODE == "gloo":
        layers = [nkt.SyncBatchNorm(5), torch.nn.ReLU(),
                  nkt.SyncBatchNorm(5, process_group=dist.group.WORLD),
                  nkt.SyncBatchNorm(5, comm=nkt.TorchCommunicator())]
    else:
        layers = [nkt.SyncBatchNorm(5, comm=comm), torch.nn.ReLU(),
                  nkt.SyncBatchNorm(5, comm=comm)]
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), *layers)
    with torch.no_grad():
        for bn in norms(m):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return m


def norms(m):
    return [layer for layer in m if isinstance(layer, nkt.SyncBatchNorm)]


def batch(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g) * 2 + 3  # |mean| > std: the shift matters


def step(m, x, seed):
    x = x.detach().requires_grad_()
    y = m(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y * dy).sum(), [x, *m.parameters()])
    return [y.detach(), *grads]


def same(name, got, want):
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    log(name)


explained = torch._dynamo.explain(model())(batch(2 + rank, 4, 4, 1))
assert explained.graph_break_count == 0, explained.break_reasons
log("explain: 0 graph breaks")

for dynamic in (False, True):
    torch._dynamo.reset()
    eager, compiled_model = model(), model()
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=dynamic)
    shapes = [(2 + rank, 5, 4), (3, 4, 6 - rank)] if dynamic else [(2 + rank, 5, 4)] * 2
    for i, (n, h, w) in enumerate(shapes):
        x = batch(n, h, w, 10 * rank + i)
        same(f"compiled dynamic={dynamic} step {i}", step(compiled, x, i), step(eager, x, i))
    same(f"compiled dynamic={dynamic} state", list(compiled_model.state_dict().values()),
         list(eager.state_dict().values()))
    same(f"compiled dynamic={dynamic} shift", [bn._shift for bn in norms(compiled_model)],
         [bn._shift for bn in norms(eager)])

if MODE != "gloo":
    print(f"rank {rank}: ALL OK", flush=True)
    sys.exit(0)

# The eager path of CUDA tensors (the global count on the device, _SyncBatchNormOps), forced on
# these CPU tensors: the same steps as the default eager path (host count), and it never reaches
# the host-count functions.
from normkit.torch import sync_batchnorm as nk_sync  # noqa: E402

host, device = model(), model()
saved = (nk_sync.SyncBatchNorm.__dict__["_counts_on_device"], nk_sync.sync_batch_norm)


def refuse(*args, **kwargs):
    raise AssertionError("the device-count path called sync_batch_norm")


for channels_last in (False, True):
    for i, (n, h, w) in enumerate([(2 + rank, 5, 4), (3 - rank, 4, 6)]):
        x = batch(n, h, w, 20 * rank + i)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        want = step(host, x, i)
        nk_sync.SyncBatchNorm._counts_on_device = staticmethod(lambda input: True)
        nk_sync.sync_batch_norm = refuse
        try:
            got = step(device, x, i)
        finally:
            nk_sync.SyncBatchNorm._counts_on_device, nk_sync.sync_batch_norm = saved
        same(f"device count channels_last={channels_last} step {i}", got, want)
same("device count state", list(device.state_dict().values()), list(host.state_dict().values()))

print(f"rank {rank}: ALL OK", flush=True)
dist.destroy_process_group()
