"""Renderers: occupancy grid, ray marching and compositing over packed samples, in pure torch.

Each function is the reference twin of a CUDA kernel with the same signature. Renderers never see a
field: callers pass `density_fn(x)` and `field_fn(x, d, dt)` closures (the latter returns each interval's
optical depth and colour), so one renderer serves density and SDF fields.
"""

from recon.renderers.compositing import (accumulate, alpha_to_tau, composite, density_to_tau, distortion,
                                         render_weights)
from recon.renderers.marching import Samples, StepRule, march, ray_aabb
from recon.renderers.occupancy import DensityFn, OccupancyGrid
from recon.renderers.render import FieldFn, render_chunked, render_rays

__all__ = [
    "DensityFn",
    "FieldFn",
    "OccupancyGrid",
    "Samples",
    "StepRule",
    "accumulate",
    "alpha_to_tau",
    "composite",
    "density_to_tau",
    "distortion",
    "march",
    "ray_aabb",
    "render_chunked",
    "render_rays",
    "render_weights",
]
