"""MixStyle (Dassl / tllib, seed 002) over (B, C, *) NumPy or CuPy arrays, on the per-sample
statistics ops: one instance-moments pass and one per-(sample, channel) affine pass forward, one
scale pass backward (the moments are constants in the backward, as upstream detaches them).

    y = (x - mu) / sig * (lam sig + (1 - lam) sig[perm]) + lam mu + (1 - lam) mu[perm]
      = (x - mu) * scale + shift,      dx = dy * scale,

mu the per-(instance, channel) mean over every dim >= 2 and sig = sqrt(unbiased var + eps) (a
spatial size of 1 has var 0: the output stays finite). The draws (perm, lam) are the caller's.
With ``comm``, the batch is every rank's batch concatenated in rank order: one all-gather of the
per-instance (mu, sig), and perm and lam index that global batch.
"""
from .._backend import array_module, on_array_device
from .groupnorm import group_norm_affine, group_norm_backward_elemt, group_norm_stats


@on_array_device
def instance_moments(x, eps=1e-6):
    """``(mu, sig)``, each (B, C) in the statistics dtype (float32 for float16/bfloat16 input):
    the mean over every dim >= 2 and sqrt(unbiased variance + eps) (variance 0 for size 1)."""
    if x.ndim < 3:
        raise ValueError(f"MixStyle: expected input of shape (B, C, *spatial) with at least one "
                         f"spatial dim, got {x.ndim}D input")
    xp = array_module(x)
    mu, var = group_norm_stats(x, x.shape[1])
    S = x.size // max(x.shape[0] * x.shape[1], 1)
    if S > 1:
        var *= S / (S - 1)
    return mu, xp.sqrt(var + eps)


@on_array_device
def gather_moments(mu, sig, comm):
    """The moments of the global batch (all ranks' in rank order) and this rank's first row in
    it, with one all-gather of (B_r, 2C + 1) float64 rows tagged with their rank."""
    xp = array_module(mu)
    C = mu.shape[1]
    rows = xp.empty((mu.shape[0], 2 * C + 1), xp.float64)
    rows[:, 0] = comm.rank
    rows[:, 1:C + 1] = mu
    rows[:, C + 1:] = sig
    everyone = comm.allgather(rows)
    offset = int((everyone[:, 0] < comm.rank).sum())
    return (everyone[:, 1:C + 1].astype(mu.dtype), everyone[:, C + 1:].astype(sig.dtype),
            offset)


@on_array_device
def mix_coefficients(mu, sig, perm, lam, mu_all=None, sig_all=None, offset=0):
    """(scale, shift), each (B_r, C), of this rank's rows ``offset ...`` of the global batch whose
    moments are ``mu_all``/``sig_all`` (default: this batch alone); ``perm`` and ``lam`` have one
    entry per instance of the global batch."""
    xp = array_module(mu)
    mu_all = mu if mu_all is None else mu_all
    sig_all = sig if sig_all is None else sig_all
    rows = slice(offset, offset + mu.shape[0])
    partner = xp.asarray(perm)[rows]
    lam = xp.asarray(lam, mu.dtype)[rows][:, None]
    sig_mix = lam * sig + (1 - lam) * sig_all[partner]
    shift = lam * mu + (1 - lam) * mu_all[partner]
    return sig_mix / sig, shift


@on_array_device
def mixstyle_forward(x, perm, lam, eps=1e-6, comm=None):
    """MixStyle of ``x`` for the draws ``perm`` (a permutation of the global batch) and ``lam``
    (one mixing weight per instance of it). Returns ``(y, mu, scale)``; y has x's dtype and
    layout, ``mu, scale`` are what ``mixstyle_backward`` needs."""
    mu, sig = instance_moments(x, eps)
    if comm is not None:
        mu_all, sig_all, offset = gather_moments(mu, sig, comm)
    else:
        mu_all, sig_all, offset = mu, sig, 0
    B = mu_all.shape[0]
    if len(perm) != B or len(lam) != B:
        raise ValueError(f"mixstyle_forward: perm and lam need one entry per instance of the "
                         f"batch ({B}), got {len(perm)} and {len(lam)}")
    scale, shift = mix_coefficients(mu, sig, perm, lam, mu_all, sig_all, offset)
    return group_norm_affine(x, mu, scale, shift), mu, scale


@on_array_device
def mixstyle_backward(dy, x, mu, scale):
    """dx = dy * scale per (instance, channel): mu and sig are constants (no collective)."""
    return group_norm_backward_elemt(dy, x, mu, scale)


__all__ = ["gather_moments", "instance_moments", "mix_coefficients", "mixstyle_backward",
           "mixstyle_forward"]
