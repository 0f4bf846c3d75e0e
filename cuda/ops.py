"""recon's kernels as torch ops, each beside its twin in `recon.cuda.twins` (same name, arguments and results):

- `integrate`: the weights and their sums per packed ray (colour, opacity, weighted distance), one thread a ray;
- `hash_encode`: the 3D hash-grid encoding, one thread a point and level;
- `march`: occupancy-grid marching, one thread a ray, a counting pass then a filling pass;
- `nearest`: NeuRBF's k nearest centres, one thread a point scanning its cell's candidate list.

Each op runs the compiled module that `recon.cuda.compiled_for` picks for its inputs (by device and
RECON_KERNELS) and the twin where there is none, or where the kernel does not cover the call (noted per op).
Callers pass plain tensors and never see which ran.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recon.cuda import compiled_for, twins
from recon.cuda.twins import HashLevels, StepRule

MAX_NEIGHBOURS = 8  # nearest centres the kernel keeps in registers (NeuRBF asks for 4, 5 or 8)


class _Integrate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, compiled: ModuleType, rgb: Tensor, tau: Tensor, t: Tensor, starts: Tensor,
                tau_before: Tensor, stop_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rgb, tau, t, tau_before = (x.contiguous().float() for x in (rgb, tau, t, tau_before))
        weights, transmittance, color, opacity, weighted_t = compiled.integrate_forward(tau, rgb, t, starts,
                                                                                        tau_before, stop_eps)
        ctx.compiled, ctx.stop_eps = compiled, stop_eps
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

        grad_tau, grad_rgb, grad_tau_before = ctx.compiled.integrate_backward(
            tau, rgb, t, weights, transmittance, starts, ctx.stop_eps, dense(grad_weights, tau.shape),
            dense(grad_color, (rays, rgb.shape[1])), dense(grad_opacity, (rays,)), dense(grad_weighted_t, (rays,)))
        return None, grad_rgb, grad_tau, None, None, grad_tau_before, None


def integrate(rgb: Tensor, tau: Tensor, t: Tensor, ray_idx: Tensor, starts: Tensor, tau_before: Tensor | None,
              stop_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """twins.integrate: (weights [S], colour [R, C], opacity [R], weighted distance [R])."""
    compiled = compiled_for(tau)
    if compiled is None:
        return twins.integrate(rgb, tau, t, ray_idx, starts, tau_before, stop_eps)
    tau_before = tau.new_zeros(len(starts) - 1) if tau_before is None else tau_before
    return _Integrate.apply(compiled, rgb, tau, t, starts, tau_before, stop_eps)


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, compiled: ModuleType, x: Tensor, table: Tensor, levels: HashLevels) -> Tensor:
        x, table = x.contiguous().float(), table.contiguous().float()
        ctx.compiled, ctx.levels = compiled, levels
        ctx.save_for_backward(x, table)
        return compiled.hash_forward(x, table, *levels)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor):
        x, table = ctx.saved_tensors
        return None, None, ctx.compiled.hash_backward(x, table, *ctx.levels, grad.contiguous().float()), None


def hash_encode(x: Tensor, table: Tensor, levels: HashLevels) -> Tensor:
    """twins.hash_encode: [N, L * F] features. The kernel covers 3D points needing no gradient (the table's it
    gives); a gradient with respect to x (twice, for eikonal terms) and 2D grids stay on the twin."""
    compiled = compiled_for(x)
    if compiled is None or x.shape[1] != 3 or (x.requires_grad and torch.is_grad_enabled()):
        return twins.hash_encode(x, table, levels)
    return _HashEncode.apply(compiled, x, table, levels)


def march(origins: Tensor, dirs: Tensor, t_start: Tensor, t_far: Tensor, occupied: Tensor, box: list[float],
          resolution: int, rule: StepRule, max_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """twins.march: (ray_idx [S], t0 [S], t1 [S]), packed by ray."""
    compiled = compiled_for(origins)
    if compiled is None:
        return twins.march(origins, dirs, t_start, t_far, occupied, box, resolution, rule, max_samples)
    args = (origins.contiguous(), dirs.contiguous(), t_start.contiguous(), t_far.contiguous(),
            occupied.view(-1).contiguous(), box, occupied.shape[0], resolution, rule.step, rule.cone_angle,
            rule.max_step, max_samples)
    counts = compiled.march_count(*args)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    total = int(offsets[-1])  # the one host sync of marching, as the twin's
    t0, t1 = compiled.march_fill(*args, offsets, total)
    ray_idx = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    return ray_idx, t0, t1


def nearest(points: Tensor, centres: Tensor, candidates: Tensor, resolution: int, k: int) -> tuple[Tensor, Tensor]:
    """twins.nearest: (indices [N, k] int64, squared distances [N, k]), nearest first. The kernel keeps up to
    MAX_NEIGHBOURS in up to 3 dimensions."""
    compiled = compiled_for(points)
    if compiled is None or k > MAX_NEIGHBOURS or points.shape[1] > 3:
        return twins.nearest(points, centres, candidates, resolution, k)
    return compiled.nearest_kernels(points.detach().float().contiguous(), centres.float().contiguous(), candidates,
                                    resolution, k)
