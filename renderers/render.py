"""Rendering a batch of rays: march, evaluate the field on the samples, composite."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from recon.data.rays import Rays
from recon.renderers.compositing import composite, density_to_tau
from recon.renderers.marching import march, prune_occluded
from recon.renderers.occupancy import DensityFn, OccupancyGrid

FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # positions, unit dirs [S, 3] -> sigma [S], rgb [S, 3]


def render_rays(rays: Rays, field_fn: FieldFn, density_fn: DensityFn, grid: OccupancyGrid, aabb: Tensor,
                step_size: float, cone_angle: float = 0.0, near: float = 0.0, background: Tensor | None = None,
                generator: torch.Generator | None = None, early_stop_eps: float = 0.0) -> dict[str, Tensor | int]:
    """Differentiable render: `composite`'s rgb, depth, opacity, weights, plus n_samples (the field evaluations).

    With early_stop_eps > 0, a no-grad density pass first drops the samples whose transmittance is below it,
    so the (costlier, differentiated) field pass skips what lies behind opaque surfaces.
    """
    samples = march(rays, grid, aabb, step_size, cone_angle, near, generator)
    if early_stop_eps > 0:
        with torch.no_grad():
            tau = density_to_tau(density_fn(samples.positions(rays)), samples.dt)
        samples = samples[prune_occluded(samples, tau, early_stop_eps)]
    sigma, rgb = field_fn(samples.positions(rays), samples.dirs(rays))
    out: dict[str, Tensor | int] = dict(composite(rgb, density_to_tau(sigma, samples.dt), samples, background))
    out["n_samples"] = len(samples)
    return out


@torch.no_grad()
def render_chunked(rays: Rays, field_fn: FieldFn, density_fn: DensityFn, grid: OccupancyGrid, aabb: Tensor,
                   step_size: float, cone_angle: float = 0.0, near: float = 0.0, background: Tensor | None = None,
                   chunk: int = 8192, early_stop_eps: float = 1e-4) -> dict[str, Tensor]:
    """Render many rays (images, the viewer) `chunk` at a time, without grad: rgb [R, 3], depth [R], opacity [R]."""
    parts = []
    for r0 in range(0, max(len(rays), 1), chunk):  # one (empty) chunk for an empty batch
        bg = background[r0 : r0 + chunk] if background is not None and background.dim() == 2 else background
        parts.append(render_rays(rays[r0 : r0 + chunk], field_fn, density_fn, grid, aabb, step_size, cone_angle, near,
                                 bg, early_stop_eps=early_stop_eps))
    return {key: torch.cat([p[key] for p in parts]) for key in ("rgb", "depth", "opacity")}
