"""The MixStyle ResNets of tllib (``tllib.normalization.mixstyle.resnet``, seed 002): torchvision's
ResNet modules (names and keys, so torchvision's ImageNet checkpoints load strictly, the unused
``fc`` included) with normkit's norm layers and one MixStyle after the stages named in
``mix_layers``. Forward returns layer4's map: a backbone for ``normkit.torch.ImageClassifier``.
"""
import copy

from torch import nn

from ..mixstyle import MixStyle
from .checkpoint import load_checkpoint, resolve_pretrained
from .resnet import BasicBlock, Bottleneck, ResNetTrunk

RELEASE_URL = "https://download.pytorch.org/models/"
RELEASE_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
                 "resnet50": "resnet50-0676ba61.pth"}
MIX_LAYERS = ("layer1", "layer2", "layer3")


class MixStyleResNet(ResNetTrunk):
    """torchvision's ResNet (``conv1``, ``bn1``, ``layer1-4``, ``fc``) whose forward returns
    layer4's map, with ``mixStyle`` (tllib's attribute name) applied after each stage in
    ``mix_layers`` (a subset of layer1-3, none by default).

    ``mix_p``, ``mix_alpha``, ``mix`` and ``generator``, ``process_group``, ``comm`` go to
    normkit's MixStyle: "random" by default, as Dassl; tllib's own MixStyle always mixes
    "crossdomain" (pass ``mix="crossdomain"`` for its behaviour). ``fc`` (``num_classes``
    outputs) is unused by forward, kept for torchvision's keys and for ``copy_head``; torchvision's
    ``avgpool`` (no keys) is left out, as forward does not pool.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
        The residual block class.
    layers : sequence of 4 int
        The blocks per stage.
    mix_layers : sequence of str or None
        The stages after which MixStyle runs, among "layer1", "layer2", "layer3"; None: none.
    mix_p, mix_alpha : float
        MixStyle's p and alpha.
    mix : str
        MixStyle's mode: "random" (the default) or "crossdomain" (tllib's behaviour).
    generator : torch.Generator or None
        MixStyle's draws; None: torch's default generator.
    process_group : torch.distributed.ProcessGroup or None
        MixStyle over all ranks of this group.
    comm : communicator or None
        MixStyle over all ranks of this normkit communicator instead.
    num_classes : int
        The (unused by forward) fc's outputs.

    Raises
    ------
    ValueError
        mix_layers naming other stages; bad layers or MixStyle arguments.
    """

    def __init__(self, block, layers, mix_layers=None, mix_p=0.5, mix_alpha=0.1, mix="random",
                 generator=None, process_group=None, comm=None, num_classes=1000):
        super().__init__(block, layers)
        mix_layers = [] if mix_layers is None else list(mix_layers)
        wrong = [name for name in mix_layers if name not in MIX_LAYERS]
        if wrong:
            raise ValueError(f"MixStyleResNet: mix_layers must name stages among {MIX_LAYERS}, "
                             f"got {wrong}")
        self.mix_layers = mix_layers
        self.mixStyle = MixStyle(mix_p, mix_alpha, mix=mix, generator=generator,
                                 process_group=process_group, comm=comm)
        self.fc = nn.Linear(self.out_features, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for name in ("layer1", "layer2", "layer3"):
            x = getattr(self, name)(x)
            if name in self.mix_layers:
                x = self.mixStyle(x)
        return self.layer4(x)

    def copy_head(self):
        """A copy of the ImageNet classifier ``fc`` (tllib's ``copy_head``)."""
        return copy.deepcopy(self.fc)


_ARCHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3])}


def _mixstyle_resnet(depth, pretrained, mix_layers, mix_p, mix_alpha, mix, **kwargs):
    name = f"mixstyle_resnet{depth}"
    path = resolve_pretrained(pretrained, RELEASE_URL + RELEASE_FILES[f"resnet{depth}"], name)
    block, layers = _ARCHS[depth]
    model = MixStyleResNet(block, layers, mix_layers, mix_p, mix_alpha, mix, **kwargs)
    if path is not None:
        load_checkpoint(model, path, name)
    return model


def mixstyle_resnet18(pretrained=None, mix_layers=None, mix_p=0.5, mix_alpha=0.1, mix="random",
                      **kwargs):
    """ResNet-18 with MixStyle (tllib's ``mixstyle.resnet.resnet18``); ``pretrained``: the local
    path of torchvision's ``resnet18-f37072fd.pth``; ``kwargs`` as MixStyleResNet's.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of torchvision's checkpoint; None: random init. True (a download) is a
        ValueError: normkit never downloads.
    mix_layers : sequence of str or None
        The stages after which MixStyle runs, among "layer1", "layer2", "layer3"; None: none.
    mix_p, mix_alpha : float
        MixStyle's p and alpha.
    mix : str
        MixStyle's mode: "random" (the default) or "crossdomain" (tllib's behaviour).
    **kwargs
        Forwarded to ``MixStyleResNet``: generator, process_group, comm, num_classes.

    Returns
    -------
    MixStyleResNet
    """
    return _mixstyle_resnet(18, pretrained, mix_layers, mix_p, mix_alpha, mix, **kwargs)


def mixstyle_resnet34(pretrained=None, mix_layers=None, mix_p=0.5, mix_alpha=0.1, mix="random",
                      **kwargs):
    """ResNet-34 with MixStyle; ``pretrained``: the local path of ``resnet34-b627a593.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of torchvision's checkpoint; None: random init. True (a download) is a
        ValueError: normkit never downloads.
    mix_layers : sequence of str or None
        The stages after which MixStyle runs, among "layer1", "layer2", "layer3"; None: none.
    mix_p, mix_alpha : float
        MixStyle's p and alpha.
    mix : str
        MixStyle's mode: "random" (the default) or "crossdomain" (tllib's behaviour).
    **kwargs
        Forwarded to ``MixStyleResNet``: generator, process_group, comm, num_classes.

    Returns
    -------
    MixStyleResNet
    """
    return _mixstyle_resnet(34, pretrained, mix_layers, mix_p, mix_alpha, mix, **kwargs)


def mixstyle_resnet50(pretrained=None, mix_layers=None, mix_p=0.5, mix_alpha=0.1, mix="random",
                      **kwargs):
    """ResNet-50 with MixStyle; ``pretrained``: the local path of ``resnet50-0676ba61.pth``.

    Parameters
    ----------
    pretrained : str, os.PathLike or None
        The local path of torchvision's checkpoint; None: random init. True (a download) is a
        ValueError: normkit never downloads.
    mix_layers : sequence of str or None
        The stages after which MixStyle runs, among "layer1", "layer2", "layer3"; None: none.
    mix_p, mix_alpha : float
        MixStyle's p and alpha.
    mix : str
        MixStyle's mode: "random" (the default) or "crossdomain" (tllib's behaviour).
    **kwargs
        Forwarded to ``MixStyleResNet``: generator, process_group, comm, num_classes.

    Returns
    -------
    MixStyleResNet
    """
    return _mixstyle_resnet(50, pretrained, mix_layers, mix_p, mix_alpha, mix, **kwargs)


__all__ = ["MixStyleResNet", "mixstyle_resnet18", "mixstyle_resnet34", "mixstyle_resnet50"]
