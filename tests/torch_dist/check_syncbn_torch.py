"""normkit.torch.SyncBatchNorm across processes, run by tests/test_torch_dist.py as

    torchrun --nproc_per_node=2 check_syncbn_torch.py gloo    (a torch.distributed gloo group)
    mpiexec -n 2 python check_syncbn_torch.py mpi             (normkit's MPICommunicator)

on CPU tensors, which torch.nn.SyncBatchNorm refuses. Every check compares the synchronized layer
on each rank's slice of a global batch with torch.nn.BatchNorm2d in one process on the whole batch,
in float64. Each rank prints "rank R: ok NAME" per check and "rank R: ALL OK" at the end; any
failure raises (and the launcher's non-zero exit fails the test).
"""
import copy
import datetime
import sys

import numpy as np
import torch
import torch.distributed as dist

import normkit.torch as nkt

MODE = sys.argv[1]
if MODE == "gloo":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    def new_comm():
        return nkt.TorchCommunicator()
else:
    from normkit.distributed import MPICommunicator

    def new_comm():
        return MPICommunicator()

world = new_comm()
rank, size = world.rank, world.size
torch.set_default_dtype(torch.float64)


def log(name):
    print(f"rank {rank}: ok {name}", flush=True)


def counting(comm):
    """`comm` with its all-reduces counted in comm.calls."""
    inner = comm.allreduce_sum
    comm.calls = 0

    def allreduce_sum(array):
        comm.calls += 1
        return inner(array)

    comm.allreduce_sum = allreduce_sum
    return comm


def close(name, got, want, tol=1e-10):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"rank {rank}: {name}: shape {tuple(got.shape)} vs "
                             f"{tuple(want.shape)}")
    err = float(((got - want).abs() / (1 + want.abs())).max()) if got.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"rank {rank}: {name}: max relative error {err:.3g}")


def summed(t):
    """The sum of `t` over all ranks (for parameter gradients, which are each rank's share)."""
    t = t.detach().clone()
    world.allreduce_sum(t if MODE == "gloo" else t.numpy())
    return t


def batch(sizes, tail, seed):
    """The global batch and output gradient (the same on every rank) and this rank's slice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((sum(sizes),) + tail, generator=g) * 1.7 + 0.4
    dy = torch.randn(x.shape, generator=g)
    lo = sum(sizes[:rank])
    return x, dy, slice(lo, lo + sizes[rank])


def random_state(C, seed):
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.rand(C, generator=g) + 0.5, "bias": torch.randn(C, generator=g),
            "running_mean": torch.randn(C, generator=g) * 0.5,
            "running_var": torch.rand(C, generator=g) + 0.5,
            "num_batches_tracked": torch.tensor(0)}


def check_against_one_process(name, layer, sizes, channels_last=False, momentum=0.1, steps=3):
    """`layer` (a normkit SyncBatchNorm on this rank's slices) against torch's BatchNorm on the
    whole batch: training steps, then eval; one collective per training pass, none in eval."""
    C = layer.num_features
    ref = torch.nn.BatchNorm2d(C, momentum=momentum)
    sd = random_state(C, 5)
    ref.load_state_dict(sd)
    layer.load_state_dict(sd)
    comm = layer.comm
    for step in range(steps + 1):
        if step == steps:
            layer.eval()
            ref.eval()
        x, dy, mine = batch(sizes, (C, 5, 3), 100 + step)
        xl = x[mine].clone()
        if channels_last:
            xl = xl.contiguous(memory_format=torch.channels_last)
        xl.requires_grad_()
        xr = x.clone().requires_grad_()
        y, yr = layer(xl), ref(xr)
        y.backward(dy[mine])
        yr.backward(dy)
        close(f"{name} step {step}: y", y, yr[mine])
        close(f"{name} step {step}: dx", xl.grad, xr.grad[mine])
        close(f"{name} step {step}: sum of weight.grad", summed(layer.weight.grad), ref.weight.grad)
        close(f"{name} step {step}: sum of bias.grad", summed(layer.bias.grad), ref.bias.grad)
        layer.zero_grad()
        ref.zero_grad()
        for key in ("running_mean", "running_var"):
            close(f"{name} step {step}: {key}", getattr(layer, key), getattr(ref, key))
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)
    if comm is not None and hasattr(comm, "calls"):
        assert comm.calls == 2 * steps, f"{name}: {comm.calls} collectives for {steps} steps"
    log(name)


def uneven_and_empty_batches():
    others = [5 + r for r in range(1, size)]
    cases = {"uneven": [3] + others, "empty rank": [0] + others}
    for label, sizes in cases.items():
        for cl in (False, True):
            layer = nkt.SyncBatchNorm(4, comm=counting(new_comm()))
            check_against_one_process(f"{label} {'NHWC' if cl else 'NCHW'}", layer, sizes, cl)
    layer = nkt.SyncBatchNorm(4, momentum=None, comm=counting(new_comm()))
    check_against_one_process("momentum None", layer, [2] * size, momentum=None)


def global_count_error():
    """One value per channel over all ranks together is an error on every rank alike."""
    layer = nkt.SyncBatchNorm(3, comm=new_comm())
    x = torch.randn(1 if rank == 0 else 0, 3)
    try:
        layer(x)
    except ValueError as e:
        assert f"got 1 over all {size} ranks" in str(e), str(e)
    else:
        raise AssertionError("a global count of 1 was accepted")
    log("global count error")


class DropGrad(torch.autograd.Function):
    """Identity whose backward sends an undefined gradient upstream."""

    @staticmethod
    def forward(ctx, y):
        ctx.set_materialize_grads(False)
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def undefined_gradient_on_one_rank():
    """Rank 0's output gets no gradient; it still joins the backward collective, and its dx is
    that of the other ranks' losses through the shared statistics."""
    sizes = [3] * size
    layer = nkt.SyncBatchNorm(2, comm=new_comm())
    ref = torch.nn.BatchNorm2d(2)
    x, dy, mine = batch(sizes, (2, 4, 2), 300)
    dy[:sizes[0]] = 0
    xl, xr = x[mine].clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xl)
    if rank == 0:
        DropGrad.apply(y).sum().backward()
    else:
        y.backward(dy[mine])
    ref(xr).backward(dy)
    close("undefined gradient: dx", xl.grad, xr.grad[mine])
    log("undefined gradient on rank 0")


def _cnn():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5), torch.nn.BatchNorm1d(5))


def converted_model(**where):
    """convert_sync_batchnorm on a torch model: one data-parallel step equals the model on the
    whole batch (parameter gradients summed over ranks, as DDP would)."""
    ref = _cnn()
    model = nkt.convert_sync_batchnorm(copy.deepcopy(ref), **where)
    assert sum(isinstance(m, nkt.SyncBatchNorm) for m in model.modules()) == 3
    sizes = [2 + 3 * r for r in range(size)]
    x, _, mine = batch(sizes, (3, 5, 5), 400)
    g = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(401))
    (model(x[mine]) * g[mine]).sum().backward()
    (ref(x) * g).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        close(f"converted model: {name}.grad", summed(p.grad), q.grad)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        close(f"converted model: {name}", b, c)
    log(f"convert_sync_batchnorm {'and'.join(where) or 'default group'}")


def data_parallel():
    """The converted model in DistributedDataParallel on the CPU (which refuses torch's own
    SyncBatchNorm there): DDP's averaged gradients are the whole batch's over the rank count."""
    ref = _cnn()
    DDP = torch.nn.parallel.DistributedDataParallel
    model = DDP(nkt.convert_sync_batchnorm(copy.deepcopy(ref)))
    sizes = [4 - r % 2 for r in range(size)]
    x, _, mine = batch(sizes, (3, 5, 5), 450)
    g = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(451))
    (model(x[mine]) * g[mine]).sum().backward()
    (ref(x) * g).sum().backward()
    for (name, p), q in zip(model.module.named_parameters(), ref.parameters()):
        close(f"DDP: {name}.grad", p.grad * size, q.grad)
    try:
        DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(_cnn()))
    except ValueError as e:
        assert "SyncBatchNorm layers only work with GPU modules" in str(e), str(e)
    else:
        raise AssertionError("DDP accepted torch's SyncBatchNorm on the CPU: update this test")
    log("DistributedDataParallel")


def torch_groups():
    """The default group, an explicit process_group and TorchCommunicator.split."""
    sizes = [2 + r for r in range(size)]
    check_against_one_process("default group", nkt.SyncBatchNorm(3), sizes)
    group = dist.new_group(list(range(size)))
    check_against_one_process("process_group", nkt.SyncBatchNorm(3, process_group=group), sizes)
    alone = world.split(color=rank)
    assert (alone.size, alone.rank) == (1, 0), (alone.size, alone.rank)
    reversed_world = world.split(color=7, key=-rank)
    assert (reversed_world.size, reversed_world.rank) == (size, size - 1 - rank)
    check_against_one_process("split (reversed ranks)",
                              nkt.SyncBatchNorm(3, comm=counting(reversed_world)), sizes)
    # A group of one is a plain batch norm on this rank's own batch.
    layer, ref = nkt.SyncBatchNorm(3, comm=alone), torch.nn.BatchNorm2d(3)
    x = batch(sizes, (3, 4, 4), 500 + rank)[0]
    close("split (alone)", layer(x), ref(x))
    log("split")
    # torch's own SyncBatchNorm refuses CPU tensors: the reason normkit's exists.
    try:
        torch.nn.SyncBatchNorm(3)(torch.randn(4, 3, 2, 2))
    except ValueError as e:
        assert "GPU" in str(e), str(e)
    else:
        raise AssertionError("torch.nn.SyncBatchNorm accepted CPU tensors: update this test")
    log("torch.nn.SyncBatchNorm refuses CPU tensors")


def numpy_layers_over_torch_distributed():
    """TorchCommunicator serves normkit.nn's NumPy SyncBatchNorm too (NumPy all-reduces)."""
    import normkit

    sizes = [4, 1] + [3] * (size - 2)
    layer = normkit.nn.SyncBatchNorm(3, comm=world, dtype=np.float64)
    ref = torch.nn.BatchNorm2d(3)
    x, dy, mine = batch(sizes, (3, 2, 5), 600)
    xr = x.clone().requires_grad_()
    y = layer(x[mine].numpy())
    dx = layer.backward(dy[mine].numpy())
    yr = ref(xr)
    yr.backward(dy)
    close("numpy layer: y", torch.from_numpy(y), yr[mine])
    close("numpy layer: dx", torch.from_numpy(dx), xr.grad[mine])
    close("numpy layer: running_var", torch.from_numpy(layer.running_var), ref.running_var)
    log("normkit.nn.SyncBatchNorm over TorchCommunicator")


def exact_combine():
    """|mean| >> std in float64: the cross-rank sums about a common shift keep the global variance
    within float64's rounding of the per-rank means of torch's one-process batch norm (1e-7 and
    2e-3 relative before, ~1e-13 and ~4e-12 after). The first forward sums twice (its zero shift
    is far off), the next ones once."""
    for mean, tol in ((1e5, 2e-12), (1e7, 1e-10)):
        comm = counting(new_comm())
        layer = nkt.SyncBatchNorm(3, momentum=1.0, comm=comm)
        for step in range(2):
            ref = torch.nn.BatchNorm1d(3, momentum=1.0)
            g = torch.Generator().manual_seed(700 + step)
            x = torch.randn(5 * size, 3, 40, generator=g) * 3.0 + mean
            dy = torch.randn(x.shape, generator=g)
            mine = slice(5 * rank, 5 * rank + 5)
            xl, xr = x[mine].clone().requires_grad_(), x.clone().requires_grad_()
            calls = comm.calls
            y, yr = layer(xl), ref(xr)
            if comm.calls - calls != (2 if step == 0 else 1):
                raise AssertionError(f"rank {rank}: {comm.calls - calls} forward collectives")
            y.backward(dy[mine])
            yr.backward(dy)
            err = float(((layer.running_var - ref.running_var).abs() / ref.running_var).max())
            if not err <= tol:
                raise AssertionError(f"rank {rank}: mean {mean:g}: var relative error {err:.3g}")
            close(f"mean {mean:g}: running_mean", layer.running_mean, ref.running_mean, 1e-15)
            close(f"mean {mean:g}: y", y, yr[mine], 1e-8)
            close(f"mean {mean:g}: dx", xl.grad, xr.grad[mine], 1e-8)
    log("exact combine with |mean| >> std")


uneven_and_empty_batches()
global_count_error()
exact_combine()
undefined_gradient_on_one_rank()
if MODE == "gloo":
    converted_model()
    converted_model(process_group=dist.new_group(list(range(size))))
    data_parallel()
    torch_groups()
    numpy_layers_over_torch_distributed()
    dist.destroy_process_group()
else:
    converted_model(comm=world)
print(f"rank {rank}: ALL OK", flush=True)
