"""The kernels as differentiable torch ops, each named after the torch twin it replaces:

- `integrate(rgb, tau, t, ray_idx, n_rays, tau_before, stop_eps, ext)`: renderers.compositing.integrate (the
  weights and their sums per ray: colour, opacity, weighted distance);
- `hash_encode(encoding, x, ext)`: fields.encodings.HashGridEncoding's 3D interpolation.

`ext` is a module from `recon.cuda.kernels_for` (the CUDA build for GPU tensors, the CPU build where asked).
Marching needs no autograd and calls the module directly (renderers/marching.py).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def ray_starts(ray_idx: Tensor, n_rays: int) -> Tensor:
    """[R + 1] int64: ray r's samples are [starts[r], starts[r + 1]) of the packed (ray-sorted) arrays.

    A binary search rather than a bincount: on a GPU, bincount reads its input's extremes back to the host,
    a sync on every call."""
    return torch.searchsorted(ray_idx, torch.arange(n_rays + 1, device=ray_idx.device, dtype=ray_idx.dtype))


class _Integrate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: ModuleType, rgb: Tensor, tau: Tensor, t: Tensor, starts: Tensor, tau_before: Tensor,
                stop_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rgb, tau, t, tau_before = (x.contiguous().float() for x in (rgb, tau, t, tau_before))
        weights, transmittance, color, opacity, weighted_t = ext.integrate_forward(tau, rgb, t, starts, tau_before,
                                                                                   stop_eps)
        ctx.ext, ctx.stop_eps = ext, stop_eps
        ctx.save_for_backward(rgb, tau, t, weights, transmittance, starts)
        return weights, color, opacity, weighted_t

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_weights: Tensor | None, grad_color: Tensor | None, grad_opacity: Tensor | None,
                 grad_weighted_t: Tensor | None):
        rgb, tau, t, weights, transmittance, starts = ctx.saved_tensors
        rays = len(starts) - 1

        def dense(grad: Tensor | None, shape: tuple[int, ...]) -> Tensor:  # an unused output's gradient is None
            return tau.new_zeros(shape) if grad is None else grad.contiguous().float()

        grad_tau, grad_rgb, grad_tau_before = ctx.ext.integrate_backward(
            tau, rgb, t, weights, transmittance, starts, ctx.stop_eps, dense(grad_weights, tau.shape),
            dense(grad_color, (rays, rgb.shape[1])), dense(grad_opacity, (rays,)), dense(grad_weighted_t, (rays,)))
        return None, grad_rgb, grad_tau, None, None, grad_tau_before, None


def integrate(rgb: Tensor, tau: Tensor, t: Tensor, ray_idx: Tensor, n_rays: int, tau_before: Tensor | None,
              stop_eps: float, ext: ModuleType) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights [S], color [R, C], opacity [R], weighted_t [R]): renderers.compositing.integrate's sums, one
    thread per ray forward and backward."""
    tau_before = tau.new_zeros(n_rays) if tau_before is None else tau_before
    return _Integrate.apply(ext, rgb, tau, t, ray_starts(ray_idx, n_rays), tau_before, stop_eps)


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
    return _HashEncode.apply(ext, x, encoding.table, encoding.kernel_levels)
