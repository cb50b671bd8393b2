"""normkit.torch's StochNorm2d and MixStyle on CUDA tensors against the same layers on the CPU
with the same (CPU) generator state, and the masked batch-norm ops of one process's StochNorm
against their CPU kernels; marked gpu, skipped without a GPU and normkit's CUDA kernels."""
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_masked_batch_norm_ops_cuda_match_cpu(device, dtype, layout):
    """normkit::batch_norm_train_masked and its backward (autograd) on CUDA against the CPU
    kernels: channels 1 and 4 on the running statistics, the others on the batch ones."""
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(4, 5, 9, 7, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    x = x.to(dtype).contiguous(memory_format=layout)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=pd) + 0.5
    b = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=pd)
    use_batch = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=pd)
    rm, rv = torch.linspace(-0.5, 0.5, 5, dtype=pd), torch.linspace(0.5, 2.0, 5, dtype=pd)
    outs = []
    for dev in ("cpu", device):
        xd = x.to(dev).requires_grad_()
        wd, bd = w.to(dev).requires_grad_(), b.to(dev).requires_grad_()
        res = torch.ops.normkit.batch_norm_train_masked(xd, wd, bd, use_batch.to(dev),
                                                        rm.to(dev), rv.to(dev), 1e-5)
        res[0].backward(dy.to(dev))
        outs.append([t.detach().cpu().double() for t in (*res, xd.grad, wd.grad, bd.grad)])
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3,
           torch.bfloat16: 3e-2}[dtype]
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


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
