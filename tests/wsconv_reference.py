"""References of the weight-standardization tests, as torch ops (never imported from upstream):
each convention's formula, elektronn3's layers' standardize_weight, and timm's F.batch_norm form."""
import torch
from torch.nn import functional as F


def ref_standardize(w, gain, eps, convention):
    """Each convention's formula of LAYERS.md, in the input's dtype (float64 in the tests)."""
    dims = tuple(range(1, w.dim()))
    shape = (-1,) + (1,) * (w.dim() - 1)
    if convention == "elektronn3":
        var, mean = torch.var_mean(w, dim=dims, keepdim=True)  # unbiased
        d = torch.clamp(var * w.numel(), min=eps)
    elif convention == "nfnet":
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=0)
        d = torch.clamp(var * (w.numel() // w.shape[0]), min=eps)
    else:
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=0)
        d = var + eps
    g = torch.ones(w.shape[0], dtype=w.dtype) if gain is None else gain
    return (w - mean) * torch.rsqrt(d) * g.view(shape)


def elektronn3_standardize(weight, gain, eps):
    """elektronn3's WSConv*d.standardize_weight, as its source writes it (var_mean, max, rsqrt,
    weight * scale - shift)."""
    var, mean = torch.var_mean(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
    fan_in = torch.prod(torch.tensor(weight.shape))
    scale = torch.rsqrt(torch.max(var * fan_in, torch.tensor(eps).to(var.device)))
    scale = scale * gain.view_as(var)
    shift = mean * scale
    return weight * scale - shift


def timm_standardize(weight, gain, eps):
    """timm's StdConv2d form: F.batch_norm over the weight as (1, C_out, K), times a gain."""
    C = weight.shape[0]
    w = F.batch_norm(weight.reshape(1, C, -1), None, None, training=True, momentum=0.0, eps=eps)
    return w.reshape_as(weight) * gain.view((-1,) + (1,) * (weight.dim() - 1))
