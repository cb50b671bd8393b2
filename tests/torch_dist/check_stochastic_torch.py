"""normkit.torch's synchronized StochNorm and cross-rank MixStyle across processes, run by
tests/test_stochastic_torch_dist.py as

    torchrun --nproc_per_node=2 check_stochastic_torch.py gloo   (process_group= / TorchCommunicator)
    mpiexec -n 2 python check_stochastic_torch.py mpi            (normkit's MPICommunicator)

Each check runs the layer on each rank's slice of a global batch (uneven sizes, then an empty rank
0) with a generator seeded alike on every rank, against the same layer in one process on the whole
batch with the same generator state, in float64; and the synchronized StochNorm and cross-rank
MixStyle compiled (fullgraph) against the eager ones. Each rank prints "rank R: ok NAME" per check and
"rank R: ALL OK" at the end; any failure raises.
"""
import datetime
import sys

import torch
import torch.distributed as dist

import normkit.torch as nkt

MODE = sys.argv[1]
if MODE == "gloo":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    world = nkt.TorchCommunicator()
else:
    from normkit.distributed import MPICommunicator

    world = MPICommunicator()
rank, size = world.rank, world.size
torch.set_default_dtype(torch.float64)


def close(name, got, want, tol=1e-10):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"rank {rank}: {name}: shape {tuple(got.shape)} vs "
                             f"{tuple(want.shape)}")
    err = float(((got - want).abs() / (1 + want.abs())).max()) if got.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"rank {rank}: {name}: max relative error {err:.3g}")


def summed(t):
    t = t.detach().clone()
    world.allreduce_sum(t if MODE == "gloo" else t.numpy())
    return t


def sync_kwargs():
    """process_group= under torchrun (the default group's handle), comm= under MPI."""
    return {"process_group": dist.group.WORLD} if MODE == "gloo" else {"comm": world}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def slices(kind):
    sizes = [3, 5] if kind == "uneven" else [0, 4]
    lo = sum(sizes[:rank])
    return sum(sizes), slice(lo, lo + sizes[rank])


def check_stochnorm(kind, p):
    B, mine = slices(kind)
    C = 4
    ref = nkt.StochNorm2d(C, p=p, generator=gen(3))
    layer = nkt.StochNorm2d(C, p=p, generator=gen(3), **sync_kwargs())
    for step in range(3):
        g = gen(50 + step)
        x = torch.randn(B, C, 3, 5, generator=g) * 1.5 + 0.3
        dy = torch.randn(x.shape, generator=g)
        xr = x.clone().requires_grad_()
        xl = x[mine].clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        yr, y = ref(xr), layer(xl)
        yr.backward(dy)
        y.backward(dy[mine])
        name = f"stochnorm {kind} p={p} step {step}"
        close(name + " y", y, yr[mine])
        close(name + " dx", xl.grad, xr.grad[mine])
        close(name + " weight.grad", summed(layer.weight.grad), ref.weight.grad)
        close(name + " bias.grad", summed(layer.bias.grad), ref.bias.grad)
        close(name + " running_var", layer.running_var, ref.running_var)
        layer.zero_grad()
        ref.zero_grad()
    print(f"rank {rank}: ok stochnorm {kind} p={p}", flush=True)


def check_mixstyle(kind, mix):
    B, mine = slices(kind)
    g = gen(70)
    x = torch.randn(B, 3, 4, 2, generator=g) * 2 + 1
    dy = torch.randn(x.shape, generator=g)
    ref = nkt.MixStyle(p=1.0, mix=mix, generator=gen(8))
    layer = nkt.MixStyle(p=1.0, mix=mix, generator=gen(8), **sync_kwargs())
    xr, xl = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
    yr, y = ref(xr), layer(xl)
    yr.backward(dy)
    y.backward(dy[mine])
    close(f"mixstyle {kind} {mix} y", y, yr[mine])
    close(f"mixstyle {kind} {mix} dx", xl.grad, xr.grad[mine])
    assert torch.equal(layer.last_draw[0], ref.last_draw[0])
    print(f"rank {rank}: ok mixstyle {kind} {mix}", flush=True)


def check_untracked(kind):
    """track_running_stats=False: synchronized plain batch norm (no draw, no buffers)."""
    B, mine = slices(kind)
    g = gen(90)
    x = torch.randn(B, 3, 5, generator=g) * 2 - 1
    dy = torch.randn(x.shape, generator=g)
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False)
    layer = nkt.StochNorm1d(3, track_running_stats=False, **sync_kwargs())
    layer.load_state_dict(ref.state_dict())
    xr, xl = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
    yr, y = ref(xr), layer(xl)
    yr.backward(dy)
    y.backward(dy[mine])
    close(f"untracked {kind} y", y, yr[mine])
    close(f"untracked {kind} dx", xl.grad, xr.grad[mine])
    print(f"rank {rank}: ok stochnorm untracked {kind}", flush=True)


def check_compiled_stochnorm(track):
    """The synchronized layer under torch.compile(fullgraph=True): no graph break, and eager's
    outputs, gradients and running statistics (the same draws from the same generator state)
    over three steps of uneven batches."""
    torch._dynamo.reset()
    C = 4
    eager = nkt.StochNorm2d(C, p=0.5, generator=gen(5), track_running_stats=track,
                            **sync_kwargs())
    layer = nkt.StochNorm2d(C, p=0.5, generator=gen(5), track_running_stats=track,
                            **sync_kwargs())
    x0 = torch.randn(2 + rank, C, 3, 4, generator=gen(60))
    explained = torch._dynamo.explain(layer)(x0)
    assert explained.graph_break_count == 0, explained.break_reasons
    layer = nkt.StochNorm2d(C, p=0.5, generator=gen(5), track_running_stats=track,
                            **sync_kwargs())  # the explain run drew once
    compiled = torch.compile(layer, fullgraph=True)
    for step in range(3):
        g = gen(61 + 10 * rank + step)
        x = torch.randn(2 + rank, C, 3, 4, generator=g) * 1.5 + 0.3
        dy = torch.randn(x.shape, generator=g)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(dy)
        yc.backward(dy)
        name = f"compiled stochnorm track={track} step {step}"
        close(name + " y", yc, ye, 1e-9)
        close(name + " dx", xc.grad, xe.grad, 1e-9)
        close(name + " weight.grad", layer.weight.grad, eager.weight.grad, 1e-9)
        if track:
            close(name + " running_var", layer.running_var, eager.running_var, 1e-9)
    print(f"rank {rank}: ok compiled stochnorm track={track}", flush=True)


def check_compiled_mixstyle(mix, p):
    """Cross-rank MixStyle under torch.compile(fullgraph=True): no graph break, and eager's
    outputs and dx (the same draws from the same generator state) over three calls of uneven
    batches (p = 0.5: some calls mix, some do not)."""
    torch._dynamo.reset()
    eager = nkt.MixStyle(p=p, mix=mix, generator=gen(9), **sync_kwargs())
    probe = nkt.MixStyle(p=p, mix=mix, generator=gen(9), **sync_kwargs())
    explained = torch._dynamo.explain(probe)(torch.randn(2 + rank, 3, 4, 2, generator=gen(1)))
    assert explained.graph_break_count == 0, explained.break_reasons
    layer = nkt.MixStyle(p=p, mix=mix, generator=gen(9), **sync_kwargs())
    compiled = torch.compile(layer, fullgraph=True)
    for step in range(3):
        g = gen(80 + 10 * rank + step)
        x = torch.randn(2 + rank, 3, 4, 2, generator=g) * 2 + 1
        dy = torch.randn(x.shape, generator=g)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(dy)
        yc.backward(dy)
        close(f"compiled mixstyle {mix} p={p} step {step} y", yc, ye, 1e-9)
        close(f"compiled mixstyle {mix} p={p} step {step} dx", xc.grad, xe.grad, 1e-9)
    print(f"rank {rank}: ok compiled mixstyle {mix} p={p}", flush=True)


for track in (True, False):
    check_compiled_stochnorm(track)
for mix, p in (("random", 1.0), ("crossdomain", 0.5)):
    check_compiled_mixstyle(mix, p)
for kind in ("uneven", "empty"):
    for p in (0.0, 0.5, 1.0):
        check_stochnorm(kind, p)
    check_untracked(kind)
    for mix in ("random", "crossdomain"):
        check_mixstyle(kind, mix)
print(f"rank {rank}: ALL OK", flush=True)
if MODE == "gloo":
    dist.destroy_process_group()
