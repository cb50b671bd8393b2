"""Adaptive Feature Norm (tllib's ``tllib.alignment.afn``, seed 002) over NumPy / CuPy arrays:
the stepwise AFN loss and HAFN, the L2-preserving ``Block``, and the minimal plain layers it is
built from (Linear, ReLU, Dropout). normkit is not a general framework: these stay minimal."""
import math


from .. import random as nk_random
from .._backend import array_module
from .batchnorm import BatchNorm1d
from .conv import _SavesInput, _float_dtype, accumulate_grad
from .module import Module, Parameter


class Linear(_SavesInput):
    """``y = x @ weight.T + bias`` over (N, in_features), initialized as torch.nn.Linear
    (U(-b, b), b = 1 / sqrt(in_features)) from ``generator`` (normkit's default when None).

    Parameters
    ----------
    in_features, out_features : int
        The sizes of each input and output row.
    bias : bool
        Whether the layer has a bias.
    dtype : numpy dtype or None
        float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the initialization; None: normkit's default (``normkit.manual_seed``).

    Shape
    -----
    (N, in_features) -> (N, out_features).

    Raises
    ------
    TypeError
        Another dtype, or a generator that is not a numpy.random.Generator.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=None, generator=None):
        super().__init__()
        dtype = _float_dtype("Linear", dtype)
        rng = nk_random.resolve(generator, "Linear")
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, (self.out_features,
                                                            self.in_features)).astype(dtype))
        if bias:
            self.bias = Parameter(rng.uniform(-bound, bound, self.out_features).astype(dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}): expected input "
                             f"of shape (N, {self.in_features}), got {tuple(x.shape)}")
        self._saved = x
        y = x @ self.weight.data.T
        return y if self.bias is None else y + self.bias.data

    def backward(self, dy):
        x = self._take_saved()
        accumulate_grad(self.weight, dy.T @ x)
        if self.bias is not None:
            accumulate_grad(self.bias, dy.sum(axis=0))
        return dy @ self.weight.data

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class ReLU(_SavesInput):
    """``max(x, 0)`` elementwise; ``backward(dy)`` passes dy where x > 0. No parameters."""

    def forward(self, x):
        self._saved = x > 0
        return x * self._saved

    def backward(self, dy):
        return dy * self._take_saved()


class Dropout(_SavesInput):
    """Inverted dropout (kept units scaled 1 / (1 - p)) in training; the mask is drawn from
    ``generator`` (normkit's default when None). Identity in eval.

    Parameters
    ----------
    p : float
        The probability of zeroing a unit, in [0, 1].
    generator : numpy.random.Generator or None
        Draws the masks; None: normkit's default (``normkit.manual_seed``).

    Raises
    ------
    ValueError
        p outside [0, 1].
    TypeError
        A generator that is not a numpy.random.Generator.
    """

    def __init__(self, p=0.5, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        nk_random.resolve(generator, "Dropout")
        self.p, self.generator = float(p), generator

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._saved = 1.0
            return x
        xp = array_module(x)
        keep = nk_random.resolve(self.generator, "Dropout").random(x.shape) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        self._saved = xp.asarray(keep * scale, x.dtype)
        return x * self._saved

    def backward(self, dy):
        return dy * self._take_saved()

    def extra_repr(self):
        return f"p={self.p}"


class AdaptiveFeatureNorm(Module):
    """The AFN loss of features ``f`` (N, F), norms over dim 1: ``forward(f)`` returns the loss,
    ``backward(dloss=1.0)`` its gradient with respect to ``f``.

    ``mode="stepwise"`` (SAFN): ``mean_i (||f_i|| - (||f_i||.detached + delta))^2`` = delta^2, of
    gradient -(2 delta / N) f_i / ||f_i|| (0 for a zero row). ``mode="hard"`` (HAFN):
    ``(mean_i ||f_i|| - radius)^2``.

    Parameters
    ----------
    delta : float
        The step by which SAFN enlarges the norms.
    radius : float or None
        HAFN's target norm (keyword-only; required for mode="hard").
    mode : str
        "stepwise" (the default) or "hard" (keyword-only).

    Raises
    ------
    ValueError
        An unknown mode, or mode="hard" without a radius.
    """

    def __init__(self, delta=1.0, *, radius=None, mode="stepwise"):
        super().__init__()
        if mode not in ("stepwise", "hard"):
            raise ValueError(f"AdaptiveFeatureNorm: mode must be 'stepwise' or 'hard', got "
                             f"{mode!r}")
        if mode == "hard" and radius is None:
            raise ValueError("AdaptiveFeatureNorm: mode='hard' needs a radius")
        self.delta, self.radius, self.mode = delta, radius, mode
        self._saved = None

    def forward(self, f):
        if getattr(f, "ndim", None) != 2:
            raise ValueError(f"AdaptiveFeatureNorm: expected features of shape (N, F), got "
                             f"{tuple(getattr(f, 'shape', ())) or type(f).__name__}")
        xp = array_module(f, "f")
        norm = xp.sqrt((f.astype(xp.float64) ** 2).sum(axis=1))
        if self.mode == "hard":
            excess = norm.mean() - self.radius
            self._saved = (f, norm, 2.0 * excess / f.shape[0])
            return (excess ** 2).astype(f.dtype)
        self._saved = (f, norm, -2.0 * self.delta / f.shape[0])
        # the detached norms cancel the live ones exactly: the value is delta^2 per row
        return xp.asarray(((norm - (norm + self.delta)) ** 2).mean(), f.dtype)

    def backward(self, dloss=1.0):
        if self._saved is None:
            raise RuntimeError("AdaptiveFeatureNorm.backward: call forward first")
        f, norm, coef = self._saved
        self._saved = None
        xp = array_module(f, "f")
        safe = xp.where(norm > 0, norm, 1.0)
        unit = xp.where((norm > 0)[:, None], f / safe[:, None], 0.0)
        return (dloss * coef * unit).astype(f.dtype)

    def extra_repr(self):
        if self.mode == "hard":
            return f"radius={self.radius}, mode='hard'"
        return f"delta={self.delta}"


class Block(Module):
    """AFN's basic block: fc -> bn -> ReLU -> Dropout(p) -> (training) * sqrt(1 - p) (kept units
    scaled 1 / sqrt(1 - p), "L2-preserved"). Keys ``fc.*`` and ``bn.*`` as tllib's.

    Parameters
    ----------
    in_features : int
        The size of each input row.
    bottleneck_dim : int
        The size of each output row (fc's and bn's width).
    dropout_p : float
        Dropout's probability, in [0, 1).
    dtype : numpy dtype or None
        float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws fc's initialization and the dropout masks; None: normkit's default.

    Shape
    -----
    (N, in_features) -> (N, bottleneck_dim).

    Raises
    ------
    ValueError
        dropout_p outside [0, 1).
    """

    def __init__(self, in_features, bottleneck_dim=1000, dropout_p=0.5, dtype=None,
                 generator=None):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"Block: dropout_p must be in [0, 1), got {dropout_p!r}")
        self.fc = Linear(in_features, bottleneck_dim, dtype=dtype, generator=generator)
        self.bn = BatchNorm1d(bottleneck_dim, dtype=dtype)
        self.relu = ReLU()
        self.dropout = Dropout(dropout_p, generator=generator)
        self.dropout_p = dropout_p

    def _scale(self):
        return math.sqrt(1.0 - self.dropout_p) if self.training else 1.0

    def forward(self, x):
        return self.dropout(self.relu(self.bn(self.fc(x)))) * self._scale()

    def backward(self, dy):
        dy = self.dropout.backward(dy * self._scale())
        return self.fc.backward(self.bn.backward(self.relu.backward(dy)))


__all__ = ["AdaptiveFeatureNorm", "Block", "Dropout", "Linear", "ReLU"]
