"""A pipeline = a field plus the renderer settings that trace it (Kaolin Wisp's pairing).

Training, evaluation, rendering and (later) the viewer and export all render through this
one object, so they can never disagree about the box, the step size or the occupancy grid.
The coordinate tasks (an image, a mesh's SDF) query their field directly: their pipeline has
no tracer and no grid.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from recon.app.checkpoint import load_resizing
from recon.data.cameras import AppearanceCodes, Cameras
from recon.data.rays import Rays
from recon.fields import Field, build_field
from recon.fields.proposal import BakedDensity, ProposalDensity
from recon.fields.surface import SurfaceInBackground
from recon.renderers import (
    OccupancyGrid,
    Proposal,
    Samples,
    march,
    propose,
    query_points,
    ray_aabb,
    render_chunked,
    render_rays,
)

BACKGROUND = ("hashgrid", {"levels": 8, "log2_table": 17})  # the density field around an SDF in unbounded scenes
PROPOSAL_RESOLUTIONS = (128, 256)  # nerfacto's proposal fields' finest levels, the first level's coarsest


@dataclass
class Tracer:
    """How rays are marched through the scene box (unit frame)."""

    aabb: torch.Tensor  # [2, 3] the field's box
    step_size: float
    cone_angle: float
    near: float

    def to_json(self) -> dict[str, Any]:
        return {"aabb": self.aabb.tolist(), "step_size": self.step_size, "cone_angle": self.cone_angle,
                "near": self.near}


class Pipeline:
    def __init__(self, field: Field, grid_config: dict[str, Any] | None = None, tracer: Tracer | None = None,
                 appearance: AppearanceCodes | None = None, background: Field | None = None,
                 proposal_config: dict[str, Any] | None = None):
        self.field, self.tracer = field, tracer
        self.appearance = appearance  # per-training-image colour transforms; views render with their mean
        self.background = background  # an SDF field's surroundings in an unbounded scene (density, NeRF++)
        # What the renderer queries: the field, or a surface with the background around it.
        self.model = field if background is None else SurfaceInBackground(field, background)
        self.grid_config = grid_config  # OccupancyGrid keyword arguments, kept to rebuild it from a checkpoint
        self.grid = None if grid_config is None else OccupancyGrid(
            aabb=torch.tensor(grid_config["aabb"]), resolution=grid_config["resolution"],
            levels=grid_config["levels"], step_size=grid_config["step_size"])
        # The other sampler (renderers.proposal): density fields that place a fixed number of samples per ray.
        self.proposal_config = proposal_config
        self.proposals = None if proposal_config is None else torch.nn.ModuleList(
            _proposal_field(proposal_config, resolution) for resolution in proposal_config["resolutions"])
        self.anneal = 1.0  # the proposal weights' exponent while resampling (training sets it; renders use 1)
        self.baked: list[BakedDensity] | None = None  # the proposal fields as grids while `baked_proposals` holds

    @classmethod
    def build(cls, field_name: str, field_options: dict[str, Any], scene_aabb: torch.Tensor, aabb_scale: float,
              near: float, cone_angle: float, grid_resolution: int, samples_per_diagonal: int,
              quantize: float = 0.0, cam: dict[str, Any] | None = None, model: str = "radiance",
              surface_box: torch.Tensor | None = None, proposal_samples: list[int] | None = None,
              field_samples: int = 48, forward_facing: bool = False) -> "Pipeline":
        """A radiance field and its tracer. quantize: CQ-NIR's cell size relative to the object radius
        (Field.set_quantization), 0 for off; cam: Field.enable_cam's options, None for off; model "sdf": a NeuS
        SDF field (fields.surface) instead of a density. In an
        unbounded scene a bounded backend contracts space outside the inner box (Field.set_contraction); an SDF
        field covers the inner box (or `surface_box`, unit frame, where the object is elsewhere) and a density
        field (BACKGROUND) the space around it, as NeRF++ does, so the background is not carved into the surface.
        proposal_samples: sample with proposal fields (renderers.proposal), one level per count, then
        `field_samples` per ray for the field, instead of marching an occupancy grid (None); `forward_facing`: its
        first level even in disparity from the near plane (LLFF captures), else in nerfacto's piecewise spacing."""
        # instant-ngp cascades: level 0 is the inner box, each further level doubles it.
        levels = int(round(math.log2(max(aabb_scale, 1.0)))) + 1
        inner = scene_aabb / (2 ** (levels - 1))
        background = None
        if model == "sdf":
            surface_box = inner if surface_box is None else surface_box
            field = build_field(field_name, surface_box, "surface", **field_options)
            if not torch.equal(surface_box, scene_aabb):
                background = build_field(BACKGROUND[0], scene_aabb, "radiance", **BACKGROUND[1])
        else:
            field = build_field(field_name, scene_aabb, "radiance", **field_options)
            if field.bounded and levels > 1:
                field.set_contraction(inner)
        field.set_quantization(quantize)
        if cam:
            field.enable_cam(**cam)
        step_size = float(torch.linalg.norm(inner[1] - inner[0])) / samples_per_diagonal
        tracer = Tracer(scene_aabb.clone(), step_size, cone_angle, near)
        if proposal_samples:
            # nerfacto's: the proposal fields contract space beyond the inner box; spacing in disparity out there.
            proposal = {"aabb": scene_aabb.tolist(), "inner": inner.tolist() if levels > 1 else None,
                        "resolutions": list(PROPOSAL_RESOLUTIONS[:len(proposal_samples)]),
                        "samples": list(proposal_samples), "field_samples": field_samples,
                        "spacing": "disparity" if forward_facing else "piecewise" if levels > 1 else "linear"}
            return cls(field, None, tracer, background=background, proposal_config=proposal)
        grid_config = {"aabb": inner.tolist(), "resolution": grid_resolution, "levels": levels, "step_size": step_size}
        return cls(field, grid_config, tracer, background=background)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Pipeline":
        """Rebuild from `state_dict()`; shapes come from the saved tensors, not the config."""
        t = state["tracer"]
        tracer = None if t is None else Tracer(torch.tensor(t["aabb"]), t["step_size"], t["cone_angle"], t["near"])
        codes = state.get("appearance")  # absent from checkpoints of earlier versions
        appearance = None if codes is None else AppearanceCodes(len(codes["transform"]))
        if appearance is not None:
            appearance.load_state_dict(codes)
        background = state.get("background")
        pipeline = cls(_field_from_state(state["field"]), state["grid_config"], tracer, appearance,
                       None if background is None else _field_from_state(background), state.get("proposal_config"))
        if pipeline.grid is not None:
            load_resizing(pipeline.grid, state["grid"])
        if pipeline.proposals is not None:
            pipeline.proposals.load_state_dict(state["proposals"])
        return pipeline

    def modules(self) -> list[torch.nn.Module]:
        """What holds weights or state: the field, its background, the proposal fields, appearance, the grid."""
        return [m for m in (self.field, self.background, self.proposals, self.appearance, self.grid) if m is not None]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No gradient reaches the weights inside the block (their inputs, such as rays, still get theirs)."""
        weights = [(w, w.requires_grad) for module in self.modules() for w in module.parameters()]
        for w, _ in weights:
            w.requires_grad_(False)
        try:
            yield
        finally:
            for w, wanted in weights:
                w.requires_grad_(wanted)

    @contextlib.contextmanager
    def baked_proposals(self, views: Cameras | None = None) -> Iterator[None]:
        """Inside the block the proposal fields answer renders from grids of themselves (`ProposalDensity.bake`),
        while their weights stay still (no training). views: what the block renders; the fields are baked only
        if its pixels' rays would query them at more points than baking does (None: bake)."""
        if self.proposals is None or self.baked is not None:
            yield
            return
        baked_points = sum((proposal.max_resolution + 1) ** 3 for proposal in self.proposals)
        if views is not None and int((views.width * views.height).sum()) * sum(self.proposal_config["samples"]) \
                <= baked_points:
            yield
            return
        with record_function("bake proposals"):
            self.baked = [proposal.bake(query_points(self.device)) for proposal in self.proposals]
        try:
            yield
        finally:
            self.baked = None

    def to(self, device: torch.device | str) -> "Pipeline":
        for module in self.modules():
            module.to(device)
        if self.tracer is not None:
            self.tracer.aabb = self.tracer.aabb.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.field.aabb.device

    @property
    def is_surface(self) -> bool:
        """An SDF field rendered by NeuS's opacity (fields.surface) rather than a density."""
        return "sdf" in self.field.outputs

    def field_fn(self, x: torch.Tensor, d: torch.Tensor, dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The renderer's closure (renderers.FieldFn): the model's `intervals`."""
        # bf16 matmuls on CUDA only; the field keeps positions and interpolation in fp32.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.model.intervals(x, d, dt)

    def density_fn(self, x: torch.Tensor) -> torch.Tensor:
        """The occupancy grid's closure (renderers.DensityFn), also the exporters': the model's density over the
        marching step (the grid's)."""
        return self._autocast(functools.partial(self.model.occupancy_density, step=self.tracer.step_size), x)

    @property
    def inner_box(self) -> torch.Tensor:
        """[2, 3] the scene's inner box (unit frame): the whole box of a bounded scene, the finest cascade of an
        unbounded one, which a density field's mesh covers."""
        if self.grid_config is not None:
            return torch.tensor(self.grid_config["aabb"])
        config = self.proposal_config
        return torch.tensor(config["inner"] if config["inner"] is not None else config["aabb"])

    def sample(self, rays: Rays, generator: torch.Generator | None = None, near: float | None = None,
               aabb: torch.Tensor | None = None, max_samples: int = 1024) -> Samples | Proposal:
        """The samples along `rays` in `aabb` (default the tracer's) from `near` on: marched through the occupancy
        grid (at most `max_samples` per ray), or placed by the proposal fields (their losses come along). A
        generator jitters them (training)."""
        t = self.tracer
        aabb, near = t.aabb if aabb is None else aabb, t.near if near is None else near
        if self.proposals is None:
            return march(rays, self.grid, aabb, t.step_size, t.cone_angle, near, generator, max_samples)
        config = self.proposal_config
        t_near, t_far = ray_aabb(rays.origins, rays.dirs, aabb)
        # Training (jittered) queries the fields it trains; renders read them baked while `baked_proposals` holds.
        fields = self.baked if self.baked is not None and generator is None else self.proposals
        density_fns = [functools.partial(self._autocast, proposal.density) for proposal in fields]
        return propose(rays, t_near.clamp(min=near), t_far, density_fns, config["samples"], config["field_samples"],
                       config["spacing"], generator, self.anneal if generator is not None else 1.0)

    @staticmethod
    def _autocast(function, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return function(x)

    def render(self, rays: Rays, background: torch.Tensor | None, generator: torch.Generator | None = None,
               train_proposals: bool = True, near_scale: float | None = None) -> dict[str, Any]:
        """Differentiable render of a ray batch (training); an SDF field adds "eikonal", the mean of
        (|grad sdf| - 1)^2 over the samples; the proposal sampler adds "spacing", the samples in its normalised
        spacing (where the distortion loss is measured), and, when `train_proposals`, "interlevel", its loss
        (else the proposal fields run without grad, as nerfacto's do between their updates). near_scale:
        render_rays' near-camera gradient scaling (None: off)."""
        # Where the samples lie needs no gradient (the field's positions are recomputed from the rays), so refined
        # poses learn through the field only, not through the proposal fields too.
        with record_function("sample"), torch.set_grad_enabled(torch.is_grad_enabled() and train_proposals):
            sampled = self.sample(rays.detach(), generator)
        proposal = sampled if isinstance(sampled, Proposal) else None
        out = render_rays(rays, self.field_fn, sampled if proposal is None else proposal.samples, background,
                          near_scale)
        if proposal is not None:
            out["spacing"] = proposal.spacing
        if proposal is not None and train_proposals:
            with record_function("interlevel"):
                out["interlevel"] = proposal.interlevel(out["weights"])
        gradient = out["extras"].get("sdf_gradient")
        if gradient is not None and len(gradient):
            out["eikonal"] = (gradient.norm(dim=-1) - 1).square().mean()
        return out

    @torch.no_grad()
    def render_rays_chunked(self, rays: Rays, background: torch.Tensor | None, chunk: int, near: float | None = None,
                            aabb: torch.Tensor | None = None, max_samples: int = 1024) -> dict[str, torch.Tensor]:
        """rgb, depth, opacity of many rays without grad; `near` and `aabb` override the tracer's (rays starting
        at a surface, a crop box), `max_samples` caps the samples per ray (the viewer)."""
        def sample_fn(part: Rays) -> Samples:
            sampled = self.sample(part, near=near, aabb=aabb, max_samples=max_samples)
            return sampled.samples if isinstance(sampled, Proposal) else sampled

        return render_chunked(rays, self.field_fn, sample_fn, background=background, chunk=chunk)

    @torch.no_grad()
    def render_view(self, cameras: Cameras, index: int, chunk: int = 16384,
                    background: float = 1.0) -> dict[str, torch.Tensor]:
        """Render camera `index` as images: rgb [H, W, 3], depth [H, W], opacity [H, W]."""
        width, height = int(cameras.width[index]), int(cameras.height[index])
        rays = cameras.image_rays(index).to(self.device)
        bg = torch.full((3,), background, device=self.device)
        was_training = self.field.training
        self.field.eval()
        out = self.render_rays_chunked(rays, bg, chunk)
        if self.appearance is not None:
            out["rgb"] = self.appearance(out["rgb"], out["opacity"], bg).clamp(0, 1)
        self.field.train(was_training)
        return {k: out[k].reshape(height, width, -1).squeeze(-1) for k in ("rgb", "depth", "opacity")}

    def state_dict(self) -> dict[str, Any]:
        return {
            "field": _field_state(self.field),
            "background": None if self.background is None else _field_state(self.background),
            "grid": None if self.grid is None else self.grid.state_dict(),
            "grid_config": self.grid_config,
            "tracer": None if self.tracer is None else self.tracer.to_json(),
            "appearance": None if self.appearance is None else self.appearance.state_dict(),
            "proposal_config": self.proposal_config,
            "proposals": None if self.proposals is None else self.proposals.state_dict(),
        }


def _proposal_field(config: dict[str, Any], resolution: int) -> ProposalDensity:
    field = ProposalDensity(torch.tensor(config["aabb"]), max_resolution=resolution)
    field.set_contraction(None if config["inner"] is None else torch.tensor(config["inner"]))
    return field


def _field_state(field: Field) -> dict[str, Any]:
    """What rebuilds a field: its builder name, box, options, coordinate transforms and weights."""
    contraction = None if field.contraction is None else field.contraction.tolist()
    return {"name": field.name, "aabb": field.aabb.tolist(), "config": field.options,
            "quantize": field.quantize_relative, "contraction": contraction, "cam": field.cam,
            "state": field.state_dict()}


def _field_from_state(saved: dict[str, Any]) -> Field:
    field = build_field(saved["name"], torch.tensor(saved["aabb"]), **saved["config"])
    field.set_quantization(saved["quantize"])
    field.set_contraction(None if saved["contraction"] is None else torch.tensor(saved["contraction"]))
    if saved["cam"]:
        field.enable_cam(**saved["cam"])
    load_resizing(field, saved["state"])
    return field
