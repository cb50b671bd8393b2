"""Adaptive Feature Norm (tllib's ``tllib.alignment.afn``, seed 002): the stepwise AFN loss and
its hard variant (HAFN), the L2-preserving ``Block`` and the AFN ``ImageClassifier``."""
import math

import torch
from torch import nn

from .batchnorm import BatchNorm1d
from .stochnorm import _check_generator


def _check_features(f, who):
    if not isinstance(f, torch.Tensor) or f.dim() != 2:
        raise ValueError(f"{who}: expected features of shape (N, F), got "
                         f"{tuple(getattr(f, 'shape', ())) or type(f).__name__}")


class AdaptiveFeatureNorm(nn.Module):
    """The AFN loss of features ``f`` (N, F), norms over dim 1.

    ``mode="stepwise"`` (SAFN, tllib's): ``mean_i (||f_i|| - (||f_i||.detach() + delta))^2``; its
    value is delta^2 and its gradient -(2 delta / N) f_i / ||f_i|| (0 for a zero row): each step
    pushes every norm up by delta. ``mode="hard"`` (HAFN): ``(mean_i ||f_i|| - radius)^2``.

    Parameters
    ----------
    delta : float
        The step by which SAFN enlarges the norms.
    radius : float or None
        HAFN's target norm (keyword-only; required for mode="hard").
    mode : str
        "stepwise" (the default) or "hard" (keyword-only).

    Shape
    -----
    (N, F) -> a scalar tensor.

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

    def forward(self, f):
        _check_features(f, "AdaptiveFeatureNorm")
        # a zero row gets a zero gradient (torch's norm backward gives 0 there)
        norm = torch.linalg.vector_norm(f, dim=1)
        if self.mode == "hard":
            return (norm.mean() - self.radius) ** 2
        return ((norm - (norm.detach() + self.delta)) ** 2).mean()

    def extra_repr(self):
        if self.mode == "hard":
            return f"radius={self.radius}, mode='hard'"
        return f"delta={self.delta}"


def dropout(x, p, training, generator=None):
    """Inverted dropout whose mask is drawn from ``generator`` (torch's default when None)."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    where = generator.device if generator is not None else x.device
    keep = torch.rand(x.shape, generator=generator, device=where) >= p
    return x * keep.to(x.device, x.dtype) * (1.0 / (1.0 - p))


class Block(nn.Module):
    """AFN's basic block: fc -> bn -> ReLU -> dropout(p) -> (training) * sqrt(1 - p), so that kept
    units are scaled by 1 / sqrt(1 - p) and the expected squared L2 norm is preserved. Keys
    ``fc.*`` and ``bn.*`` as tllib's. ``dropout_p=0`` works (tllib's backward raises: an in-place
    multiply of ReLU's saved output); the mask comes from ``generator``.

    Parameters
    ----------
    in_features : int
        The size of each input row.
    bottleneck_dim : int
        The size of each output row.
    dropout_p : float
        Dropout's probability, in [0, 1).
    generator : torch.Generator or None
        Draws the dropout masks; None: torch's default generator.

    Shape
    -----
    (N, in_features) -> (N, bottleneck_dim).

    Raises
    ------
    ValueError
        dropout_p outside [0, 1).
    TypeError
        A generator that is not a torch.Generator.
    """

    def __init__(self, in_features, bottleneck_dim=1000, dropout_p=0.5, generator=None):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"Block: dropout_p must be in [0, 1), got {dropout_p!r}")
        _check_generator(generator, "Block")
        self.fc = nn.Linear(in_features, bottleneck_dim)
        self.bn = BatchNorm1d(bottleneck_dim, affine=True)
        self.dropout_p = dropout_p
        self.generator = generator

    def forward(self, x):
        f = torch.relu(self.bn(self.fc(x)))
        if not self.training:
            return f
        return dropout(f, self.dropout_p, True, self.generator) * math.sqrt(1.0 - self.dropout_p)


class ImageClassifier(nn.Module):
    """tllib's AFN ``ImageClassifier``: backbone (with ``out_features``) -> global average pool +
    flatten -> bottleneck ``Sequential(Sequential(Block), Block, ...)`` -> head Linear.

    Keys as tllib's (``backbone.*``, ``bottleneck.0.0.*``, ``bottleneck.1.*``, ``head.*``).
    Init: bottleneck BN weight N(1, 0.01), bias 0; every Linear of bottleneck and head weight and
    bias N(0, 0.01). Training returns ``(predictions, features)``, eval the predictions.

    Parameters
    ----------
    backbone : torch.nn.Module
        Returns (N, C, H, W) maps; has ``out_features`` (C).
    num_classes : int
        The head's outputs.
    num_blocks : int
        The bottleneck's Blocks, at least 1.
    bottleneck_dim : int
        The Blocks' width (the features' size).
    dropout_p : float
        The Blocks' dropout probability, in [0, 1).
    finetune : bool
        Whether ``get_parameters`` gives the backbone 0.1 * base_lr (else base_lr).
    generator : torch.Generator or None
        Draws the Blocks' dropout masks; None: torch's default generator.

    Raises
    ------
    ValueError
        num_blocks < 1, or a bad dropout_p.
    """

    def __init__(self, backbone, num_classes, num_blocks=1, bottleneck_dim=1000, dropout_p=0.5,
                 finetune=True, generator=None):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"ImageClassifier: num_blocks must be at least 1, got {num_blocks}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.finetune = finetune
        self.pool_layer = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        blocks = [nn.Sequential(Block(backbone.out_features, bottleneck_dim, dropout_p,
                                      generator))]
        blocks += [Block(bottleneck_dim, bottleneck_dim, dropout_p, generator)
                   for _ in range(num_blocks - 1)]
        self.bottleneck = nn.Sequential(*blocks)
        self.head = nn.Linear(bottleneck_dim, num_classes)
        with torch.no_grad():
            for m in self.bottleneck.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.normal_(1.0, 0.01, generator=generator)
                    m.bias.zero_()
            for m in list(self.bottleneck.modules()) + list(self.head.modules()):
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.01, generator=generator)
                    m.bias.normal_(0.0, 0.01, generator=generator)

    @property
    def features_dim(self):
        return self.head.in_features

    def forward(self, x):
        f = self.bottleneck(self.pool_layer(self.backbone(x)))
        predictions = self.head(f)
        return (predictions, f) if self.training else predictions

    def get_parameters(self, base_lr=1.0):
        """Parameter groups with learning rates: backbone 0.1 * base_lr (base_lr when not
        finetune), bottleneck and head base_lr (tllib ignores base_lr)."""
        return [
            {"params": self.backbone.parameters(),
             "lr": 0.1 * base_lr if self.finetune else base_lr},
            {"params": self.bottleneck.parameters(), "lr": base_lr},
            {"params": self.head.parameters(), "lr": base_lr},
        ]


__all__ = ["AdaptiveFeatureNorm", "Block", "ImageClassifier", "dropout"]
