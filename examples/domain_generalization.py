"""Domain generalization with a MixStyle ResNet-18 and the AFN loss, on synthetic domains (CPU).

    python examples/domain_generalization.py
    torchrun --nproc_per_node=2 examples/domain_generalization.py

Each domain draws the same four classes of 32x32 images (one fixed pattern per class) in its own
style: per-channel gain, offset and noise level. The network is normkit.torch.models'
``mixstyle_resnet18`` with cross-domain MixStyle after layer1 and layer2, under tllib's AFN
``ImageClassifier``; the loss is cross-entropy plus the stepwise AFN norm loss on the bottleneck
features. After a few steps it reports accuracy on a third domain no step has seen.

With one process the batch holds both source domains, the first half from one and the second
half from the other, so that "crossdomain" MixStyle pairs every image with one of the other
domain. Under torchrun each rank holds one domain only (as data parallelism over per-domain
loaders does): the batch norms become normkit's SyncBatchNorm (statistics of both ranks'
batches), MixStyle mixes across ranks (``process_group=``, its draws from a generator seeded
alike on every rank), and the parameter gradients are averaged, as DistributedDataParallel does.
Both launches compute the same training steps, so they print the same losses, up to rounding.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import normkit.torch as nkt
from normkit.torch import models

CLASSES, SIZE, PER_DOMAIN, STEPS = 4, 32, 8, 6
SEED = 0


def domain_batch(domain, n, step):
    """``n`` images of ``domain`` (labels cycling through the classes) for training ``step``."""
    patterns = torch.randn(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(SEED))
    patterns = F.interpolate(patterns, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    style = torch.Generator().manual_seed(1000 + domain)
    gain = torch.rand(1, 3, 1, 1, generator=style) * 2.5 + 0.3
    offset = torch.randn(1, 3, 1, 1, generator=style)
    noise = torch.rand((), generator=style).item() * 0.8 + 0.1
    g = torch.Generator().manual_seed(SEED + 7919 * domain + step)
    labels = torch.arange(n) % CLASSES
    x = patterns[labels].expand(n, 3, SIZE, SIZE) * gain + offset
    return x + noise * torch.randn(n, 3, SIZE, SIZE, generator=g), labels


def main():
    distributed = "RANK" in os.environ
    if distributed:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        sources = list(range(world))  # one domain per rank
    else:
        rank, world, sources = 0, 1, [0, 1]
    target = len(sources)  # a domain no step trains on

    torch.manual_seed(SEED)  # the same initial weights on every rank
    backbone = models.mixstyle_resnet18(
        mix_layers=["layer1", "layer2"], mix_p=0.5, mix_alpha=0.1, mix="crossdomain",
        generator=torch.Generator().manual_seed(SEED),  # the same draws on every rank
        process_group=dist.group.WORLD if distributed else None)
    # dropout_p=0: the bottleneck's dropout masks would be drawn per rank, and the two launches
    # would no longer compute the same steps
    model = nkt.ImageClassifier(backbone, CLASSES, bottleneck_dim=64, dropout_p=0.0)
    if distributed:
        model = nkt.convert_sync_batchnorm(model)
    afn = nkt.AdaptiveFeatureNorm(delta=1.0)
    opt = torch.optim.SGD(model.get_parameters(base_lr=0.05), momentum=0.9)
    if rank == 0:
        how = (f"{world} ranks, one domain each, SyncBatchNorm, cross-rank MixStyle"
               if distributed else "1 process, both domains in each batch")
        print(f"mixstyle_resnet18 + AFN on domains {sources} ({how}); unseen domain {target}")

    for step in range(STEPS):
        mine = [sources[rank]] if distributed else sources
        batches = [domain_batch(d, PER_DOMAIN, step) for d in mine]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        model.train()
        predictions, features = model(x)
        ce = F.cross_entropy(predictions, y)
        norm_loss = afn(features)
        loss = ce + 0.05 * norm_loss
        opt.zero_grad()
        loss.backward()
        # (the stepwise AFN loss is delta^2 by design; its gradient raises the feature norms)
        parts = torch.stack([ce.detach(), norm_loss.detach(),
                             features.detach().norm(dim=1).mean()])
        if distributed:  # average gradients and losses over the ranks, as DDP
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            dist.all_reduce(parts)
            parts /= world
        opt.step()
        if rank == 0:
            ce_v, afn_v, norm_v = parts.tolist()
            print(f"step {step}: loss {ce_v + 0.05 * afn_v:.6f} (cross-entropy {ce_v:.6f}, "
                  f"AFN {afn_v:.4f}), mean feature norm {norm_v:.4f}")

    model.eval()
    with torch.no_grad():
        x, y = domain_batch(target, 4 * CLASSES, STEPS)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        print(f"accuracy on the unseen domain {target}: {accuracy:.2f} (after {STEPS} steps)")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
