"""normkit.torch.SyncBatchNorm over a normkit communicator (MPI) under torch.compile, run by
tests/test_torch_dist.py as ``mpiexec -n 2 python check_compile_comm.py``.

A Conv2d -> SyncBatchNorm(comm) -> ReLU -> SyncBatchNorm(comm) model on uneven per-rank batches:
torch._dynamo.explain finds no graph break (the communicator's all-reduce is the opaque op
normkit::allreduce_sum), and torch.compile(fullgraph=True), static and dynamic shapes, training
forward and backward, gives the eager layers' outputs, gradients, running statistics and shift.
Each rank prints "rank R: ok NAME" per check and "rank R: ALL OK".
"""
import torch

import normkit.torch as nkt
from normkit.distributed import MPICommunicator

comm = MPICommunicator()
rank = comm.rank
torch.set_default_dtype(torch.float64)


def log(name):
    print(f"rank {rank}: ok {name}", flush=True)


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), nkt.SyncBatchNorm(5, comm=comm),
                            torch.nn.ReLU(), nkt.SyncBatchNorm(5, comm=comm))
    with torch.no_grad():
        for bn in (m[1], m[3]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return m


def batch(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g) * 2 + 3


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
    same(f"compiled dynamic={dynamic} shift", [compiled_model[1]._shift, compiled_model[3]._shift],
         [eager[1]._shift, eager[3]._shift])

print(f"rank {rank}: ALL OK", flush=True)
