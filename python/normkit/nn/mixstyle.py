"""MixStyle (Dassl's ``dassl.modeling.ops.mixstyle``, tllib's ``tllib.normalization.mixstyle``;
seed 002) over NumPy / CuPy arrays, and Dassl's helpers to switch it on, off and between modes.

The helpers (``activate_mixstyle`` ... ``run_without_mixstyle``) act on normkit.nn's and
normkit.torch's MixStyle alike, subclasses included (Dassl compares ``type(m) == MixStyle``).
"""
from contextlib import contextmanager

import numpy as np

from ..functional import mixstyle as F
from ..functional.groupnorm import group_norm_affine
from .. import random as nk_random
from ..distributed import check_communicator
from .module import Module

MODES = ("random", "crossdomain")


class MixStyleControls:
    """What both packages' MixStyle share: the arguments, their checks and Dassl's switches."""

    def _init_controls(self, p, alpha, eps, mix):
        who = type(self).__name__
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{who}: p must be a probability in [0, 1], got {p!r}")
        if not alpha > 0:
            raise ValueError(f"{who}: alpha must be > 0 (the Beta(alpha, alpha) parameter), got "
                             f"{alpha!r}")
        if not eps > 0:
            raise ValueError(f"{who}: eps must be > 0, got {eps!r}")
        self.p, self.alpha, self.eps = float(p), float(alpha), float(eps)
        self.update_mix_method(mix)
        self._activated = True

    def set_activation_status(self, status=True):
        self._activated = bool(status)

    def update_mix_method(self, mix="random"):
        if mix not in MODES:
            raise ValueError(f"{type(self).__name__}: mix must be 'random' or 'crossdomain', got "
                             f"{mix!r}")
        self.mix = mix

    def extra_repr(self):
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}, mix={self.mix!r}"


def crossdomain_order(B, shuffle):
    """Dassl's cross-domain partners for a batch of B: reverse(arange(B)) split in two (the first
    part the larger for odd B), each part shuffled by ``shuffle(n)`` (a permutation of n), then
    concatenated: the first half of the batch mixes with the second and vice versa."""
    order = np.arange(B)[::-1]
    first, second = order[:(B + 1) // 2], order[(B + 1) // 2:]
    return np.concatenate([first[np.asarray(shuffle(len(first)))],
                           second[np.asarray(shuffle(len(second)))]])


class MixStyle(MixStyleControls, Module):
    """MixStyle: mixes the instance-level feature statistics of pairs of samples.

    Identity in eval, when deactivated, or with probability 1 - p per training call. Otherwise,
    for (B, C, *) input (3D, 4D, 5D...): mu, sig = per-(instance, channel) mean and
    sqrt(unbiased var + eps) over every dim >= 2; lam ~ Beta(alpha, alpha), one per instance;
    perm a permutation of the batch ("random") or Dassl's cross-domain pairing ("crossdomain":
    the batch's halves exchange partners); y = (x - mu) / sig * sig_mix + mu_mix with
    sig_mix = lam sig + (1 - lam) sig[perm] and mu_mix likewise. mu and sig are constants in the
    backward: dx = dy * sig_mix / sig. B = 1 is the identity. Output in the input's dtype and
    layout, statistics and lam in float32 (float64 for float64 input).

    Draws (the gate, lam, perm, in that order) come from ``generator`` (a
    ``numpy.random.Generator``; default: normkit's, see ``normkit.manual_seed``). With ``comm``,
    the batch is all ranks' batches in rank order (uneven sizes, empty ranks): one all-gather of
    the per-instance (mu, sig) forward, none backward; every rank must pass a generator seeded
    alike so that all draw the same gate, perm and lam.

    tllib's MixStyle has no ``mix`` argument and always mixes cross-domain (its batch is two
    domains concatenated); Dassl's default is "random", as here.

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
    generator : numpy.random.Generator or None
        Draws the gate, lam and perm; None: normkit's default.
    comm : communicator or None
        Mixes over all ranks' batches (with ``allgather``); None: this process's batch.

    Shape
    -----
    (B, C, *) -> (B, C, *), in the input's layout.

    Raises
    ------
    ValueError
        p, alpha, eps or mix out of range.
    TypeError
        A generator that is not a numpy.random.Generator, a comm that is not a communicator.
    """

    def __init__(self, p=0.5, alpha=0.1, eps=1e-6, mix="random", generator=None, comm=None):
        super().__init__()
        self._init_controls(p, alpha, eps, mix)
        nk_random.resolve(generator, "MixStyle")
        self.generator = generator
        self.comm = check_communicator(comm, "MixStyle", ("allgather",))
        self._saved = None
        self.last_draw = None  # (perm, lam) of the last mixing call, for inspection

    def forward(self, x):
        self._saved = None
        if x.ndim < 3:
            raise ValueError(f"MixStyle: expected input of shape (B, C, *spatial), got {x.ndim}D "
                             f"input")
        if not self.training or not self._activated:
            return x
        rng = nk_random.resolve(self.generator, "MixStyle")
        if rng.random() >= self.p:
            return x
        comm = self.comm if self.comm is not None and self.comm.size > 1 else None
        mu, sig = F.instance_moments(x, self.eps)
        if comm is not None:
            mu_all, sig_all, offset = F.gather_moments(mu, sig, comm)
        else:
            mu_all, sig_all, offset = mu, sig, 0
        B = mu_all.shape[0]
        if B <= 1:
            return x
        lam = rng.beta(self.alpha, self.alpha, B)
        if self.mix == "random":
            perm = rng.permutation(B)
        else:
            perm = crossdomain_order(B, rng.permutation)
        self.last_draw = (perm, lam)
        scale, shift = F.mix_coefficients(mu, sig, perm, lam, mu_all, sig_all, offset)
        self._saved = (x, mu, scale)
        return group_norm_affine(x, mu, scale, shift)

    def backward(self, dy):
        if self._saved is None:  # the last forward was the identity
            return dy
        x, mu, scale = self._saved
        self._saved = None
        return F.mixstyle_backward(dy, x, mu, scale)


def _is_mixstyle(m):
    return isinstance(m, MixStyleControls)


def deactivate_mixstyle(m):
    """For ``model.apply``: switches a MixStyle off (identity).

    Parameters
    ----------
    m : module
        Any module; only MixStyle layers (normkit.nn's or normkit.torch's) change.
    """
    if _is_mixstyle(m):
        m.set_activation_status(False)


def activate_mixstyle(m):
    """For ``model.apply``: switches a MixStyle on.

    Parameters
    ----------
    m : module
        Any module; only MixStyle layers (normkit.nn's or normkit.torch's) change.
    """
    if _is_mixstyle(m):
        m.set_activation_status(True)


def random_mixstyle(m):
    """For ``model.apply``: sets a MixStyle to mix="random".

    Parameters
    ----------
    m : module
        Any module; only MixStyle layers (normkit.nn's or normkit.torch's) change.
    """
    if _is_mixstyle(m):
        m.update_mix_method("random")


def crossdomain_mixstyle(m):
    """For ``model.apply``: sets a MixStyle to mix="crossdomain".

    Parameters
    ----------
    m : module
        Any module; only MixStyle layers (normkit.nn's or normkit.torch's) change.
    """
    if _is_mixstyle(m):
        m.update_mix_method("crossdomain")


def _apply(model, fn):
    for m in model.modules():
        fn(m)


@contextmanager
def run_without_mixstyle(model):
    """Every MixStyle of ``model`` off inside the block, on again after it (as Dassl's).

    Parameters
    ----------
    model : normkit.nn.Module or torch.nn.Module
        Its MixStyle layers (any depth) are switched.
    """
    try:
        _apply(model, deactivate_mixstyle)
        yield
    finally:
        _apply(model, activate_mixstyle)


@contextmanager
def run_with_mixstyle(model, mix=None):
    """Every MixStyle of ``model`` on inside the block (with mode ``mix`` when given), off after
    it (as Dassl's).

    Parameters
    ----------
    model : normkit.nn.Module or torch.nn.Module
        Its MixStyle layers (any depth) are switched.
    mix : str or None
        "random" or "crossdomain" for the block; None: each layer's own mode.
    """
    if mix is not None:
        if mix not in MODES:
            raise ValueError(f"run_with_mixstyle: mix must be 'random' or 'crossdomain', got "
                             f"{mix!r}")
        _apply(model, random_mixstyle if mix == "random" else crossdomain_mixstyle)
    try:
        _apply(model, activate_mixstyle)
        yield
    finally:
        _apply(model, deactivate_mixstyle)


__all__ = ["MixStyle", "activate_mixstyle", "crossdomain_mixstyle", "deactivate_mixstyle",
           "random_mixstyle", "run_with_mixstyle", "run_without_mixstyle"]
