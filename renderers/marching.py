"""Ray marching through an occupancy grid into packed samples."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.cuda import ops
from recon.cuda.twins import StepRule
from recon.data.rays import Rays
from recon.renderers.occupancy import OccupancyGrid, rand
from recon.renderers.packing import Samples


def ray_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test: t_near, t_far [R] of each ray's line through the box; t_far <= t_near for a miss.

    Both may be negative (origin inside: t_near < 0; box behind: t_far < 0).
    """
    t_lo, t_hi = (aabb[0] - origins) / dirs, (aabb[1] - origins) / dirs  # +-inf where a direction component is 0
    near, far = torch.minimum(t_lo, t_hi), torch.maximum(t_lo, t_hi)
    # 0/0 = NaN: a ray lying in a slab's boundary plane, which that slab does not constrain.
    t_near = torch.where(near.isnan(), -math.inf, near).amax(-1)
    t_far = torch.where(far.isnan(), math.inf, far).amin(-1)
    return t_near, t_far


def march(rays: Rays, grid: OccupancyGrid, aabb: Tensor, step_size: float, cone_angle: float = 0.0, near: float = 0.0,
          generator: torch.Generator | None = None, max_samples_per_ray: int = 1024) -> Samples:
    """Samples along each ray through `aabb`, in the cells `grid` marks occupied.

    Rays start at max(near, entry into aabb) and step by StepRule: constant for cone_angle 0, growing
    with distance otherwise, up to a cell diagonal of the grid's coarsest level (instant-ngp) so no coarse
    cell is stepped over. The last interval ends at the box exit. A generator jitters each ray's first
    boundary by u * dt (stratified sampling, for training). An interval is kept where its midpoint is
    occupied, at most `max_samples_per_ray` per ray (the nearest): recon.cuda.ops.march.
    """
    rule = StepRule(step_size, cone_angle, max(step_size, grid.cell_diagonal * 2 ** (grid.levels - 1)))
    t_near, t_far = ray_aabb(rays.origins, rays.dirs, aabb)
    t_start = t_near.clamp(min=near)
    if generator is not None:
        t_start = t_start + rand(t_start.shape, generator, t_start.device) * rule.dt(t_start)
    ray_idx, t0, t1 = ops.march(rays.origins, rays.dirs, t_start, t_far, grid.occupied, grid.bounds, grid.resolution,
                                rule, max_samples_per_ray)
    return Samples(ray_idx, t0, t1, len(rays))
