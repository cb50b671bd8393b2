"""normkit.torch's StochNorm2d and MixStyle on CUDA tensors against the same layers on the CPU
with the same (CPU) generator state; marked gpu, skipped without a GPU and normkit's CUDA
kernels."""
import copy

import pytest
import torch

import normkit.torch as nkt
from torch_helpers import DEVICES

CUDA = [d for d in DEVICES if getattr(d, "values", None) == ("cuda",)]


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stochnorm_cuda_matches_cpu(device, dtype):
    x = torch.randn(6, 5, 7, 3, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    x = x.to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    cpu = nkt.StochNorm2d(5, p=0.5, generator=torch.Generator().manual_seed(2))
    gpu = copy.deepcopy(cpu).to(device)  # deepcopy shares the generator: give each its own
    cpu.generator = torch.Generator().manual_seed(4)
    gpu.generator = torch.Generator().manual_seed(4)
    for _ in range(2):
        xc, xg = x.clone().requires_grad_(), x.to(device).requires_grad_()
        yc, yg = cpu(xc), gpu(xg)  # float16 on the CPU too (float32 statistics)
        yc.backward(dy)
        yg.backward(dy.to(device))
        tol = 1e-5 if dtype == torch.float32 else 5e-3
        torch.testing.assert_close(yg.float().cpu(), yc.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(xg.grad.float().cpu(), xc.grad.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_mixstyle_cuda_matches_cpu(device, layout):
    x = (torch.randn(5, 4, 6, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1)
    x = x.contiguous(memory_format=layout)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    outs = []
    for dev in ("cpu", device):
        layer = nkt.MixStyle(p=1.0, mix="crossdomain", generator=torch.Generator().manual_seed(3))
        xd = x.to(dev).requires_grad_()
        y = layer(xd)
        y.backward(dy.to(dev))
        outs.append((y.cpu(), xd.grad.cpu()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
