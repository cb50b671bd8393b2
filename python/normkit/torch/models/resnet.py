"""The ResNet skeleton shared by IBN-Net and the MixStyle ResNets: torch's conv layers, normkit's
norm layers, and the module names of IBN-Net (``ibnnet/resnet_ibn.py``) and torchvision, whose
state_dict keys coincide wherever IBN adds nothing (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layerN.0.downsample.0/1``).

A block's ``ibn`` is IBN-Net's: None (a plain torchvision block), "a" (``bn1`` is an
InstanceBatchNorm2d) or "b" (an ``IN`` InstanceNorm2d after the residual add, before the last
ReLU).
"""
import math

from torch import nn

from ..batchnorm import BatchNorm2d
from ..groupnorm import InstanceBatchNorm2d, InstanceNorm2d

IBN_KINDS = (None, "a", "b")


def _first_norm(planes, ibn):
    return InstanceBatchNorm2d(planes) if ibn == "a" else BatchNorm2d(planes)


def _norm_after_add(planes, ibn):
    return InstanceNorm2d(planes, affine=True) if ibn == "b" else None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (stride on the first) and a residual; ``expansion`` 1.

    Parameters
    ----------
    inplanes : int
        The input's channels.
    planes : int
        The block's width (its output has planes * expansion channels).
    ibn : None, "a" or "b"
        IBN-Net's block kind (see the module docstring).
    stride : int
        The stride of the strided convolution.
    downsample : torch.nn.Module or None
        Maps the input to the residual's shape (needed when stride > 1 or the channels change).
    """

    expansion = 1

    def __init__(self, inplanes, planes, ibn=None, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _first_norm(planes, ibn)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.IN = _norm_after_add(planes, ibn)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's "ResNet v1.5" and IBN-Net), 1x1 expand and a
    residual; ``expansion`` 4.

    Parameters
    ----------
    inplanes : int
        The input's channels.
    planes : int
        The block's width (its output has planes * expansion channels).
    ibn : None, "a" or "b"
        IBN-Net's block kind (see the module docstring).
    stride : int
        The stride of the strided convolution.
    downsample : torch.nn.Module or None
        Maps the input to the residual's shape (needed when stride > 1 or the channels change).
    """

    expansion = 4

    def __init__(self, inplanes, planes, ibn=None, stride=1, downsample=None):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _first_norm(planes, ibn)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = BatchNorm2d(width)
        self.IN = _norm_after_add(width, ibn)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


def _check_arch(block, layers, ibn_cfg, who):
    if block not in (BasicBlock, Bottleneck):
        raise TypeError(f"{who}: block must be normkit.torch.models.BasicBlock or Bottleneck, "
                        f"got {block!r}")
    if (len(layers) != 4
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers)):
        raise ValueError(f"{who}: layers must be 4 positive block counts, got {layers!r}")
    if len(ibn_cfg) != 4 or any(kind not in IBN_KINDS for kind in ibn_cfg):
        raise ValueError(f"{who}: ibn_cfg must be 4 entries of None, 'a' or 'b', got "
                         f"{ibn_cfg!r}")


class ResNetTrunk(nn.Module):
    """Stem (7x7/2 conv, norm, ReLU, 3x3/2 max pool) and layer1-4; ``forward_features`` returns
    layer4's map (N, ``out_features``, H/32, W/32). Subclasses add their head.

    IBN-Net's stage rules: with "a" every block of the stage is an IBN-a block; with "b" only the
    stage's last block gets the ``IN`` after its add (the others are plain, and so is a stage's
    only block), and
    "b" in the first stage also makes the stem's ``bn1`` an InstanceNorm2d(64, affine=True).
    Init as IBN-Net (and torchvision): conv weights N(0, sqrt(2 / (k * k * out_channels))), norm
    weights 1 and biases 0 (the layers' defaults).
    """

    def __init__(self, block, layers, ibn_cfg=(None, None, None, None)):
        super().__init__()
        _check_arch(block, layers, ibn_cfg, type(self).__name__)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = InstanceNorm2d(64, affine=True) if ibn_cfg[0] == "b" else BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, ibn_cfg[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, ibn_cfg[1])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, ibn_cfg[2])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, ibn_cfg[3])
        self._out_features = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def _make_layer(self, block, planes, blocks, stride, ibn):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                BatchNorm2d(planes * block.expansion))
        # IBN-Net's rule: a "b" stage's IN goes to its last block unless that is its first one
        kinds = [None if ibn == "b" and (i == 0 or i < blocks - 1) else ibn
                 for i in range(blocks)]
        stage = [block(self.inplanes, planes, kinds[0], stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, kind) for kind in kinds[1:]]
        return nn.Sequential(*stage)

    @property
    def out_features(self):
        """Channels of layer4's map (512 * block.expansion)."""
        return self._out_features

    def stem(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected images of shape (N, 3, H, W), got "
                             f"{tuple(x.shape)}")
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x):
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


__all__ = ["BasicBlock", "Bottleneck", "IBN_KINDS", "ResNetTrunk"]
