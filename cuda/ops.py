"""The kernels as differentiable torch ops, each named after the torch twin it replaces:

- `render_weights(tau, ray_idx, n_rays, ext)`: renderers.compositing.render_weights (weights, transmittance);
- `hash_encode(encoding, x, ext)`: fields.encodings.HashGridEncoding's 3D interpolation.

`ext` is a module from `recon.cuda.extension` ("cuda" for GPU tensors, "cpu" in the tests).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def ray_starts(ray_idx: Tensor, n_rays: int) -> Tensor:
    """[R + 1] int64: ray r's samples are [starts[r], starts[r + 1]) of the packed (ray-sorted) arrays."""
    counts = torch.bincount(ray_idx, minlength=n_rays)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class _RenderWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: ModuleType, tau: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        tau = tau.contiguous().float()
        weights, transmittance = ext.weights_forward(tau, starts)
        ctx.ext = ext
        ctx.save_for_backward(tau, weights, transmittance, starts)
        return weights, transmittance

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_weights: Tensor, grad_transmittance: Tensor):
        tau, weights, transmittance, starts = ctx.saved_tensors
        grad_weights = torch.zeros_like(tau) if grad_weights is None else grad_weights.contiguous().float()
        grad_transmittance = torch.zeros_like(tau) if grad_transmittance is None else grad_transmittance.contiguous().float()
        return None, ctx.ext.weights_backward(tau, weights, transmittance, grad_weights, grad_transmittance, starts), None


def render_weights(tau: Tensor, ray_idx: Tensor, n_rays: int, ext: ModuleType) -> tuple[Tensor, Tensor]:
    return _RenderWeights.apply(ext, tau, ray_starts(ray_idx, n_rays))


def level_parameters(encoding) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per level (CPU tensors): fp32 scale, vertices per axis, first table row, and the hash mask (-1: dense)."""
    scale = encoding._scale.view(-1).float().cpu()
    vertices = (encoding._pos_max.view(-1) + 1).long().cpu()
    offset = encoding._offset.view(-1).long().cpu()
    mask = encoding._mask.view(-1).long().cpu()
    return scale, vertices, offset, mask


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: ModuleType, x: Tensor, table: Tensor, levels: tuple[Tensor, ...]) -> Tensor:
        x, table = x.contiguous().float(), table.contiguous().float()
        ctx.ext, ctx.levels = ext, levels
        ctx.save_for_backward(x, table)
        return ext.hash_forward(x, table, *levels)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor):
        x, table = ctx.saved_tensors
        return None, None, ctx.ext.hash_backward(x, table, *ctx.levels, grad.contiguous().float()), None


def hash_encode(encoding, x: Tensor, ext: ModuleType) -> Tensor:
    """[N, L * F] features of x [N, 3] (in [0, 1]^3, no gradient with respect to x) from `encoding`'s table."""
    return _HashEncode.apply(ext, x, encoding.table, level_parameters(encoding))
