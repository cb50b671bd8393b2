"""Data-parallel training with SyncBatchNorm under MPI, checked against one process.

    mpiexec -n 2 python examples/train_syncbn.py

Every rank takes its own (uneven) slice of each synthetic batch, trains a small network whose
batch norms are SyncBatchNorm, and all-reduces the parameter gradients (what DDP does). Rank 0 also
trains the same network with plain BatchNorm2d on the whole batch in one process, and the example
checks at every step that losses, running statistics and weights agree.
"""
import numpy as np

import normkit as nk
from normkit.distributed import MPICommunicator


class Conv1x1(nk.nn.Module):
    """A per-pixel linear map (N, Cin, H, W) -> (N, Cout, H, W): a user-written layer."""

    def __init__(self, cin, cout, rng):
        super().__init__()
        self.weight = nk.nn.Parameter(rng.uniform(-1, 1, (cout, cin)) / np.sqrt(cin))

    def forward(self, x):
        self._x = x
        return np.einsum("oc,nchw->nohw", self.weight.data, x)

    def backward(self, dy):
        g = np.einsum("nohw,nchw->oc", dy, self._x)
        self.weight.grad = g if self.weight.grad is None else self.weight.grad + g
        return np.einsum("oc,nohw->nchw", self.weight.data, dy)


class ReLU(nk.nn.Module):
    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


def make_net(seed):
    rng = np.random.default_rng(seed)
    return nk.nn.Sequential(nk.nn.BatchNorm2d(3, dtype=np.float64), Conv1x1(3, 8, rng),
                            nk.nn.BatchNorm2d(8, dtype=np.float64), ReLU(), Conv1x1(8, 1, rng))


def sgd_step(net, lr):
    for p in net.parameters():
        p.data -= lr * p.grad
    net.zero_grad()


def main():
    comm = MPICommunicator()
    rank, size = comm.rank, comm.size
    sizes = [6 + 3 * r for r in range(size)]         # uneven per-rank batches
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    total = sum(sizes)

    net = nk.nn.convert_sync_batchnorm(make_net(seed=0), comm)
    reference = make_net(seed=0) if rank == 0 else None   # one process, the whole batch

    data = np.random.default_rng(1)
    true_map = data.standard_normal((3,))
    worst = 0.0
    for step in range(30):
        # The whole batch, the same on every rank; each rank keeps its slice.
        x = data.standard_normal((total, 3, 5, 5)) * [[[2.0]], [[0.5]], [[1.0]]] + 3.0
        target = np.tanh(np.einsum("c,nchw->nhw", true_map, x - 3.0))[:, None]

        pred = net(x[lo:hi])
        diff = pred - target[lo:hi]
        loss = np.array([0.5 * np.sum(diff ** 2) / diff[0].size / total])
        net.backward(diff / diff[0].size / total)      # d(global mean loss) / d(local pred)
        comm.allreduce_sum(loss)
        for p in net.parameters():                       # data parallel: sum the gradients
            p.grad = comm.allreduce_sum(np.ascontiguousarray(p.grad))
        sgd_step(net, lr=0.5)

        if rank == 0:
            ref_pred = reference(x)
            ref_diff = ref_pred - target
            ref_loss = 0.5 * np.sum(ref_diff ** 2) / ref_diff[0].size / total
            reference.backward(ref_diff / ref_diff[0].size / total)
            sgd_step(reference, lr=0.5)
            errors = [abs(loss[0] - ref_loss)]
            for (name, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items()):
                errors.append(float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float)))))
            worst = max(worst, max(errors))
            print(f"step {step:2d}  loss {loss[0]:.6f}  single-process loss {ref_loss:.6f}  "
                  f"max state difference {max(errors):.2e}", flush=True)

    if rank == 0:
        ok = worst < 1e-9
        print(f"{size} ranks, batches {sizes}: SyncBatchNorm statistics, losses and weights "
              f"{'equal' if ok else 'DIFFER FROM'} one process on the concatenated batch "
              f"(max difference {worst:.2e})")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
