"""Ready networks of seed 002, from torch's conv layers and normkit's norm layers.

    IBNNet, resnet{18,34,50,101}_ibn_{a,b}   IBN-Net (XingangPan/IBN-Net's keys with num_classes
                                             given; a backbone with num_classes=None, as tllib)
    MixStyleResNet, mixstyle_resnet{18,34,50}  tllib's MixStyle ResNets (torchvision's keys)
    BasicBlock, Bottleneck                   their residual blocks (``ibn=None/"a"/"b"``)
    load_checkpoint                          released checkpoints from local files or state dicts

Every model has ``out_features`` and, as a backbone (IBN-Net with num_classes=None, the MixStyle
ResNets), returns layer4's map, so it slots into ``normkit.torch.ImageClassifier``.
``pretrained=`` is a local file path: nothing is ever downloaded.
"""
from .checkpoint import load_checkpoint
from .ibnnet import (IBNNet, resnet18_ibn_a, resnet18_ibn_b, resnet34_ibn_a, resnet34_ibn_b,
                     resnet50_ibn_a, resnet50_ibn_b, resnet101_ibn_a, resnet101_ibn_b)
from .mixstyle_resnet import (MixStyleResNet, mixstyle_resnet18, mixstyle_resnet34,
                              mixstyle_resnet50)
from .resnet import BasicBlock, Bottleneck

__all__ = ["BasicBlock", "Bottleneck", "IBNNet", "MixStyleResNet", "load_checkpoint",
           "mixstyle_resnet18", "mixstyle_resnet34", "mixstyle_resnet50", "resnet101_ibn_a",
           "resnet101_ibn_b", "resnet18_ibn_a", "resnet18_ibn_b", "resnet34_ibn_a",
           "resnet34_ibn_b", "resnet50_ibn_a", "resnet50_ibn_b"]
