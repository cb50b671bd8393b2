"""MixStyle for torch tensors (Dassl's / tllib's, seed 002): the instance moments and the
per-(sample, channel) affine pass run in normkit's per-sample statistics ops, the tiny (B, C)
mixing math in torch ops. Dassl's helpers are re-exported from normkit.nn.mixstyle: they switch
both packages' layers."""
import torch
from torch.autograd.function import once_differentiable

from .. import _C
from ..distributed import check_communicator
from ..nn.mixstyle import (MODES, MixStyleControls, activate_mixstyle, crossdomain_mixstyle,
                           deactivate_mixstyle, random_mixstyle, run_with_mixstyle,
                           run_without_mixstyle)
from ._dlpack import dl, group_workspace, kernel_input, launch, like, param_dtype
from ._ops import communicator_key, mix_draws
from .stochnorm import _Seeded, _check_generator

_ops = torch.ops.normkit


def _sig(x, var, eps):
    """sqrt(unbiased var + eps) from the biased (B, C) var of x's instances, in place."""
    B, C = x.shape[:2]
    S = x[0, 0].numel() if B and C else 1
    if S > 1:
        var.mul_(S / (S - 1))
    return var.add_(eps).sqrt_()


def instance_moments(x, eps=1e-6):
    """(mu, sig), each (B, C) in the statistics dtype: the per-(instance, channel) mean over every
    dim >= 2 and sqrt(unbiased var + eps) (var 0 for a spatial size of 1). Constants (no grad).

    Parameters
    ----------
    x : torch.Tensor (B, C, *)
        float16, bfloat16, float32 or float64; any layout.
    eps : float
        Added to the variance.

    Returns
    -------
    mu, sig : torch.Tensor (B, C)
        float32 for half-precision input, else x's dtype.
    """
    B, C = x.shape[:2]
    pd = param_dtype(x.dtype)
    mu = torch.empty(B, C, dtype=pd, device=x.device)
    var = torch.empty(B, C, dtype=pd, device=x.device)
    _C.group_norm_stats(dl(x), dl(mu), dl(var), **launch(x, group_workspace(C)))
    return mu, _sig(x, var, eps)


class _StyleAffine(torch.autograd.Function):
    """y = (x - mu) * scale + shift per (instance, channel); dx = dy * scale (mu, scale and shift
    are constants, as upstream detaches the statistics)."""

    @staticmethod
    def forward(ctx, x, mu, scale, shift):
        ctx.set_materialize_grads(False)
        y = torch.empty_like(x)
        _C.group_norm_affine(dl(x), dl(mu), dl(scale), dl(shift), dl(y), **launch(x))
        ctx.save_for_backward(x, mu, scale)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, mu, scale = ctx.saved_tensors
        dy = like(x, dy)
        dx = torch.empty_like(x)
        _C.group_norm_backward_elemt(dl(dy), dl(x), dl(mu), dl(scale), None, None, dl(dx),
                                     **launch(x))
        return dx, None, None, None


def _gather(mu, sig, comm):
    """Global (mu, sig) of all ranks in rank order and this rank's offset: one all-gather."""
    C = mu.shape[1]
    rows = torch.cat([torch.full((mu.shape[0], 1), float(comm.rank), dtype=torch.float64,
                                 device=mu.device), mu.double(), sig.double()], dim=1)
    if hasattr(comm, "group"):  # a TorchCommunicator: tensors as they are
        everyone = comm.allgather(rows)
    else:  # normkit's communicators take NumPy arrays
        everyone = torch.from_numpy(comm.allgather(rows.cpu().numpy())).to(mu.device)
    offset = int((everyone[:, 0] < comm.rank).sum())
    return everyone[:, 1:C + 1].to(mu.dtype), everyone[:, C + 1:].to(mu.dtype), offset


def _coefficients(mu, sig, mu_all, sig_all, rows, perm, lam):
    """(scale, shift), each (B_r, C), of this rank's ``rows`` of the global batch (a slice, or a
    tensor of their indices)."""
    partner = perm[rows]
    lam = lam[rows].to(mu.dtype)[:, None]
    scale = (lam * sig + (1 - lam) * sig_all[partner]).div_(sig)
    return scale, lam * mu + (1 - lam) * mu_all[partner]


def mix_coefficients(mu, sig, comm, generator, alpha, crossdomain):
    """One mixing call after its gate: the all-gather of (mu, sig) over ``comm`` (None: this
    batch alone), the draws for the global batch from ``generator`` and this rank's rows'
    coefficients: (perm, lam, scale, shift), or None for a global batch of one instance (no
    draw). Shared by the eager layer and the compiled cross-rank op, so both draw alike."""
    mu_all, sig_all, offset = _gather(mu, sig, comm) if comm else (mu, sig, 0)
    B = mu_all.shape[0]
    if B <= 1:
        return None
    perm, lam = mix_draws(generator, alpha, B, crossdomain)
    lam = lam.to(mu.dtype)
    scale, shift = _coefficients(mu, sig, mu_all, sig_all, slice(offset, offset + mu.shape[0]),
                                 perm.to(mu.device), lam.to(mu.device))
    return perm, lam, scale, shift


def mixstyle(x, perm, lam, eps=1e-6, comm=None):
    """MixStyle of ``x`` (B, C, *) for given draws: ``perm`` (a permutation of the global batch:
    all ranks of ``comm`` in rank order, else this batch) and ``lam`` (one weight per instance of
    it). Differentiable in x (dx = dy * sig_mix / sig).

    Parameters
    ----------
    x : torch.Tensor (B, C, *)
        At least one spatial dim.
    perm : torch.Tensor or sequence of int (B_global,)
        Each instance's partner.
    lam : torch.Tensor or sequence of float (B_global,)
        Each instance's weight of its own statistics.
    eps : float
        Added to the variance.
    comm : communicator or None
        The global batch is all its ranks' (one all-gather); None: this batch.

    Returns
    -------
    torch.Tensor like x

    Raises
    ------
    ValueError
        x of fewer than 3 dims; perm or lam of another length than the global batch.
    """
    if x.dim() < 3:
        raise ValueError(f"mixstyle: expected input of shape (B, C, *spatial), got {x.dim()}D "
                         f"input")
    x = kernel_input(x)
    mu, sig = instance_moments(x, eps)
    if comm is not None:
        mu_all, sig_all, offset = _gather(mu, sig, comm)
    else:
        mu_all, sig_all, offset = mu, sig, 0
    B = mu_all.shape[0]
    perm = torch.as_tensor(perm, device=x.device)
    lam = torch.as_tensor(lam, device=x.device)
    if perm.shape != (B,) or lam.shape != (B,):
        raise ValueError(f"mixstyle: perm and lam need one entry per instance of the batch ({B}), "
                         f"got shapes {tuple(perm.shape)} and {tuple(lam.shape)}")
    scale, shift = _coefficients(mu, sig, mu_all, sig_all,
                                 slice(offset, offset + mu.shape[0]), perm, lam)
    if torch.is_grad_enabled() and x.requires_grad:
        return _StyleAffine.apply(x, mu, scale, shift)
    y = torch.empty_like(x)
    _C.group_norm_affine(dl(x), dl(mu), dl(scale), dl(shift), dl(y), **launch(x))
    return y


class MixStyle(_Seeded, MixStyleControls, torch.nn.Module):
    """Dassl's / tllib's ``MixStyle`` (same constructor, plus ``mix`` for tllib's users,
    ``generator``, ``process_group`` and ``comm``) run by normkit.

    Identity in eval, when deactivated, or with probability 1 - p per training call. Otherwise
    y = (x - mu) / sig * (lam sig + (1 - lam) sig[perm]) + lam mu + (1 - lam) mu[perm], with mu,
    sig = per-(instance, channel) mean and sqrt(unbiased var + eps) over every dim >= 2 (any N-d
    input; constants in the backward), lam ~ Beta(alpha, alpha) per instance and perm a
    permutation ("random") or Dassl's cross-domain pairing ("crossdomain", odd batches as
    Dassl's). B = 1 is the identity. Output in the input's dtype and layout; statistics and lam
    in float32 (float64 for float64 input).

    Draws (gate, lam, perm, in that order) come from ``generator`` (a ``torch.Generator``;
    torch's default when None). With ``comm`` or ``process_group`` the batch is all ranks'
    batches in rank order: one all-gather of the per-instance (mu, sig) forward, none backward,
    and every rank must draw alike (a generator seeded alike, or torch's default seeded alike).
    tllib's MixStyle has no ``mix`` and always mixes cross-domain; Dassl's default is "random".
    The layer compiles with ``fullgraph=True``: a compiled call draws eager's gate, lam and perm
    from the same generator, computes the mix every call and selects x where the gate says so
    (its ``last_draw`` is not updated); a cross-rank one all-gathers inside the op
    ``normkit::mixstyle_cross_rank`` (only when the gate mixes, as eager).

    Parameters
    ----------
    p : float
        The probability of mixing in a training call, in [0, 1].
    alpha : float
        The Beta(alpha, alpha) parameter of lam, > 0.
    eps : float
        Added to the variance, > 0.
    mix : str
        "random" (the default) or "crossdomain".
    generator : torch.Generator or None
        Draws the gate, lam and perm; None: torch's default generator.
    process_group : torch.distributed.ProcessGroup or None
        Mixes over all ranks of this group; not together with ``comm``.
    comm : communicator or None
        Mixes over all ranks of this normkit communicator instead.

    Shape
    -----
    (B, C, *) -> (B, C, *), in the input's memory format.

    Raises
    ------
    ValueError
        p, alpha, eps or mix out of range; both process_group and comm.
    TypeError
        A generator that is not a torch.Generator; a comm that is not a communicator.
    """

    def __init__(self, p=0.5, alpha=0.1, eps=1e-6, mix="random", generator=None,
                 process_group=None, comm=None):
        torch.nn.Module.__init__(self)
        self._init_controls(p, alpha, eps, mix)
        _check_generator(generator, "MixStyle")
        if process_group is not None and comm is not None:
            raise ValueError("MixStyle: pass a process_group or a comm, not both")
        self.generator = generator
        self.process_group = process_group
        self.comm = check_communicator(comm, "MixStyle", ("allgather",))
        self.last_draw = None  # (perm, lam) of the last mixing call, for inspection
        # The communicator a compiled call's mixstyle_cross_rank finds (one over the process
        # group made here, outside any compiled region).
        self._comm_key = None
        if comm is not None or process_group is not None:
            from .distributed import TorchCommunicator

            self._sync_comm = comm if comm is not None else TorchCommunicator(process_group)
            self._comm_key = communicator_key(self._sync_comm)

    def _communicator(self):
        if self.comm is not None:
            comm = self.comm
        elif self.process_group is not None:
            from .distributed import TorchCommunicator

            comm = TorchCommunicator(self.process_group)
        else:
            return None
        return comm if comm.size > 1 else None

    def _rand(self, *shape):
        where = self.generator.device if self.generator is not None else "cpu"
        return torch.rand(*shape, generator=self.generator, device=where)

    def _compiled_forward(self, x):
        """A local layer's mixing call under torch.compile: the draws by the ``mixstyle_draw`` op
        (eager's numbers from the layer's generator, the gate included), the moments and the
        affine pass by normkit's ops, and the gate as a select (a traced graph cannot branch on
        it): an inactive call returns x's values. ``last_draw`` is left as it is."""
        active, perm, lam = _ops.mixstyle_draw(x, self._generator_key, float(self.p),
                                               float(self.alpha), x.shape[0],
                                               self.mix == "crossdomain")
        mu, var = _ops.group_norm_stats(x.detach(), x.shape[1])  # constants, as upstream's
        sig = _sig(x, var, self.eps)
        scale, shift = _coefficients(mu, sig, mu, sig, slice(None), perm, lam)
        return torch.where(active, _ops.group_norm_affine(x, mu, scale, shift), x)

    def _compiled_cross_rank_forward(self, x):
        """A cross-rank layer's mixing call under torch.compile: the moments by normkit's ops,
        then the gate, the all-gather (registered communicator), the draws and this rank's
        coefficients in the one op ``mixstyle_cross_rank`` (eager's order and numbers), the
        affine pass, and the gate as a select. ``last_draw`` is left as it is."""
        mu, var = _ops.group_norm_stats(x.detach(), x.shape[1])  # constants, as upstream's
        sig = _sig(x, var, self.eps)
        active, scale, shift = _ops.mixstyle_cross_rank(mu, sig, self._comm_key,
                                                        self._generator_key, float(self.p),
                                                        float(self.alpha),
                                                        self.mix == "crossdomain")
        return torch.where(active, _ops.group_norm_affine(x, mu, scale, shift), x)

    def forward(self, x):
        if x.dim() < 3:
            raise ValueError(f"MixStyle: expected input of shape (B, C, *spatial), got "
                             f"{x.dim()}D input")
        if not self.training or not self._activated:
            return x
        if torch.compiler.is_compiling():
            if self.comm is None and self.process_group is None:
                return self._compiled_forward(x)
            return self._compiled_cross_rank_forward(x)
        if self._rand(()).item() >= self.p:
            return x
        x = kernel_input(x)
        mu, sig = instance_moments(x, self.eps)
        # cross-rank, the global batch size comes with the one all-gather
        mixed = mix_coefficients(mu, sig, self._communicator(), self.generator, self.alpha,
                                 self.mix == "crossdomain")
        if mixed is None:
            return x
        perm, lam, scale, shift = mixed
        self.last_draw = (perm, lam)
        return _StyleAffine.apply(x, mu, scale, shift)

    def __getstate__(self):
        return dict(self.__dict__, comm=None, process_group=None, _generator=None,
                    _sync_comm=None, _comm_key=None)


__all__ = ["MODES", "MixStyle", "activate_mixstyle", "crossdomain_mixstyle",
           "deactivate_mixstyle", "instance_moments", "mixstyle", "random_mixstyle",
           "run_with_mixstyle", "run_without_mixstyle"]
