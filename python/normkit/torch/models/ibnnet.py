"""IBN-Net (Pan et al., ECCV 2018) as released in XingangPan/IBN-Net (``ibnnet/resnet_ibn.py``)
and wrapped by tllib (``tllib.normalization.ibn``, seed 002): ResNets whose shallow stages mix
instance and batch normalization, run by normkit's norm layers.

With ``num_classes`` given, the state_dict keys are exactly those of IBN-Net's released
checkpoints, so the files load as they are. With ``num_classes=None`` (tllib's "IBNNet without
fully connected layer") the model is a backbone for ``normkit.torch.ImageClassifier``.
"""
import torch
from torch import nn

from .checkpoint import load_checkpoint, resolve_pretrained
from .resnet import BasicBlock, Bottleneck, ResNetTrunk

RELEASE_URL = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"
RELEASE_FILES = {
    "resnet18_ibn_a": "resnet18_ibn_a-2f571257.pth",
    "resnet34_ibn_a": "resnet34_ibn_a-94bc1577.pth",
    "resnet50_ibn_a": "resnet50_ibn_a-d9d0bb7b.pth",
    "resnet101_ibn_a": "resnet101_ibn_a-59ea0ac6.pth",
    "resnet18_ibn_b": "resnet18_ibn_b-bc2f3c11.pth",
    "resnet34_ibn_b": "resnet34_ibn_b-04134c37.pth",
    "resnet50_ibn_b": "resnet50_ibn_b-9ca61e85.pth",
    "resnet101_ibn_b": "resnet101_ibn_b-c55f6dba.pth",
}


class IBNNet(ResNetTrunk):
    """IBN-Net's ``ResNet_IBN`` (module names and keys) with normkit's norms.

    ``ibn_cfg`` gives each stage's block kind (None, "a", "b"; see ``ResNetTrunk``): IBN-a is
    ("a", "a", "a", None), IBN-b ("b", "b", None, None). ``num_classes=None``: no pooling and no
    ``fc``; forward returns layer4's map (N, ``out_features``, H/32, W/32). ``num_classes``
    given: global average pooling, then ``fc``, and forward returns the logits. IBN-Net pools with
    AvgPool2d(7), which works only for 193-416 px inputs; this pools over any size, and equals it
    on IBN-Net's 224 px.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
        The residual block class.
    layers : sequence of 4 int
        The blocks per stage (positive).
    ibn_cfg : sequence of 4 (None, "a" or "b")
        Each stage's block kind.
    num_classes : int or None
        The classifier's outputs; None: a backbone without pooling and fc.

    Raises
    ------
    TypeError
        Another block class.
    ValueError
        Bad layers, ibn_cfg or num_classes.
    """

    def __init__(self, block, layers, ibn_cfg=("a", "a", "a", None), num_classes=None):
        super().__init__(block, layers, ibn_cfg)
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"IBNNet: num_classes must be None (a backbone) or a positive "
                             f"integer, got {num_classes!r}")
        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.out_features, num_classes)

    def forward(self, x):
        x = self.forward_features(x)
        if self.num_classes is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


_ARCHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}
_CFGS = {"a": ("a", "a", "a", None), "b": ("b", "b", None, None)}


def _ibnnet(depth, kind, pretrained, num_classes, **kwargs):
    name = f"resnet{depth}_ibn_{kind}"
    path = resolve_pretrained(pretrained, RELEASE_URL + RELEASE_FILES[name], name)
    block, layers = _ARCHS[depth]
    model = IBNNet(block, layers, _CFGS[kind], num_classes, **kwargs)
    if path is not None:
        load_checkpoint(model, path, name)
    return model


def resnet18_ibn_a(pretrained=None, num_classes=None, **kwargs):
    """ResNet-18-IBN-a; ``pretrained``: the local path of ``resnet18_ibn_a-2f571257.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(18, "a", pretrained, num_classes, **kwargs)


def resnet34_ibn_a(pretrained=None, num_classes=None, **kwargs):
    """ResNet-34-IBN-a; ``pretrained``: the local path of ``resnet34_ibn_a-94bc1577.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(34, "a", pretrained, num_classes, **kwargs)


def resnet50_ibn_a(pretrained=None, num_classes=None, **kwargs):
    """ResNet-50-IBN-a; ``pretrained``: the local path of ``resnet50_ibn_a-d9d0bb7b.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(50, "a", pretrained, num_classes, **kwargs)


def resnet101_ibn_a(pretrained=None, num_classes=None, **kwargs):
    """ResNet-101-IBN-a; ``pretrained``: the local path of ``resnet101_ibn_a-59ea0ac6.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(101, "a", pretrained, num_classes, **kwargs)


def resnet18_ibn_b(pretrained=None, num_classes=None, **kwargs):
    """ResNet-18-IBN-b; ``pretrained``: the local path of ``resnet18_ibn_b-bc2f3c11.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(18, "b", pretrained, num_classes, **kwargs)


def resnet34_ibn_b(pretrained=None, num_classes=None, **kwargs):
    """ResNet-34-IBN-b; ``pretrained``: the local path of ``resnet34_ibn_b-04134c37.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(34, "b", pretrained, num_classes, **kwargs)


def resnet50_ibn_b(pretrained=None, num_classes=None, **kwargs):
    """ResNet-50-IBN-b; ``pretrained``: the local path of ``resnet50_ibn_b-9ca61e85.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(50, "b", pretrained, num_classes, **kwargs)


def resnet101_ibn_b(pretrained=None, num_classes=None, **kwargs):
    """ResNet-101-IBN-b; ``pretrained``: the local path of ``resnet101_ibn_b-c55f6dba.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of the released checkpoint (its ``fc`` is dropped when num_classes is
        None); None: random init. True (a download) is a ValueError: normkit never downloads.
    num_classes : int or None
        The classifier's outputs (1000 for the released files); None: a backbone.
    **kwargs
        Forwarded to ``IBNNet`` (which takes no others: any is a TypeError).

    Returns
    -------
    IBNNet
    """
    return _ibnnet(101, "b", pretrained, num_classes, **kwargs)


__all__ = ["IBNNet", "RELEASE_FILES", "resnet101_ibn_a", "resnet101_ibn_b", "resnet18_ibn_a",
           "resnet18_ibn_b", "resnet34_ibn_a", "resnet34_ibn_b", "resnet50_ibn_a",
           "resnet50_ibn_b"]
