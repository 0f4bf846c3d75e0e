"""Renderers: two samplers (an occupancy grid marched, proposal density fields) and compositing over packed samples.

Their heavy loops are recon.cuda's ops (a kernel where one runs, its torch twin elsewhere). Renderers never see a
field: callers pass `density_fn(x)` and `field_fn(x, d, dt)` closures (the latter returns each interval's
optical depth and colour), so one renderer serves density and SDF fields.
"""

from recon.cuda.twins import StepRule
from recon.renderers.compositing import accumulate, composite, distortion
from recon.renderers.marching import march, ray_aabb
from recon.renderers.occupancy import DensityFn, OccupancyGrid
from recon.renderers.packing import Samples
from recon.renderers.proposal import Proposal, propose
from recon.renderers.render import FieldFn, SampleFn, query_points, render_chunked, render_rays

__all__ = [
    "DensityFn",
    "FieldFn",
    "OccupancyGrid",
    "Proposal",
    "SampleFn",
    "Samples",
    "StepRule",
    "accumulate",
    "composite",
    "distortion",
    "march",
    "propose",
    "query_points",
    "ray_aabb",
    "render_chunked",
    "render_rays",
]
