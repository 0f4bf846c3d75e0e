"""A pipeline = a field plus the renderer settings that trace it (Kaolin Wisp's pairing).

Training, evaluation, rendering and (later) the viewer and export all render through this
one object, so they can never disagree about the box, the step size or the occupancy grid.
The coordinate tasks (an image, a mesh's SDF) query their field directly: their pipeline has
no tracer and no grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recon.app.checkpoint import load_resizing
from recon.data.cameras import AppearanceCodes, Cameras
from recon.data.rays import Rays
from recon.fields import Field, build_field
from recon.fields.surface import SurfaceInBackground
from recon.renderers import OccupancyGrid, render_chunked, render_rays

BACKGROUND = ("hashgrid", {"levels": 8, "log2_table": 17})  # the density field around an SDF in unbounded scenes


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
                 appearance: AppearanceCodes | None = None, background: Field | None = None):
        self.field, self.tracer = field, tracer
        self.appearance = appearance  # per-training-image colour transforms; views render with their mean
        self.background = background  # an SDF field's surroundings in an unbounded scene (density, NeRF++)
        # What the renderer queries: the field, or a surface with the background around it.
        self.model = field if background is None else SurfaceInBackground(field, background)
        self.grid_config = grid_config  # OccupancyGrid keyword arguments, kept to rebuild it from a checkpoint
        self.grid = None if grid_config is None else OccupancyGrid(
            aabb=torch.tensor(grid_config["aabb"]), resolution=grid_config["resolution"],
            levels=grid_config["levels"], step_size=grid_config["step_size"])

    @classmethod
    def build(cls, field_name: str, field_options: dict[str, Any], scene_aabb: torch.Tensor, aabb_scale: float,
              near: float, cone_angle: float, grid_resolution: int, samples_per_diagonal: int,
              quantize: float = 0.0, cam: dict[str, Any] | None = None, model: str = "radiance",
              surface_box: torch.Tensor | None = None) -> "Pipeline":
        """A radiance field and its tracer. quantize: CQ-NIR's cell size relative to the object radius
        (Field.set_quantization), 0 for off; cam: Field.enable_cam's options, None for off; model "sdf": a NeuS
        SDF field (fields.surface) instead of a density. In an
        unbounded scene a bounded backend contracts space outside the inner box (Field.set_contraction); an SDF
        field covers the inner box (or `surface_box`, unit frame, where the object is elsewhere) and a density
        field (BACKGROUND) the space around it, as NeRF++ does, so the background is not carved into the surface."""
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
        grid_config = {"aabb": inner.tolist(), "resolution": grid_resolution, "levels": levels, "step_size": step_size}
        return cls(field, grid_config, Tracer(scene_aabb.clone(), step_size, cone_angle, near), background=background)

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
                       None if background is None else _field_from_state(background))
        if pipeline.grid is not None:
            load_resizing(pipeline.grid, state["grid"])
        return pipeline

    def to(self, device: torch.device | str) -> "Pipeline":
        self.field.to(device)
        if self.background is not None:
            self.background.to(device)
        if self.appearance is not None:
            self.appearance.to(device)
        if self.tracer is not None:
            self.grid.to(device)
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
        """The occupancy grid's closure (renderers.DensityFn): the model's density over the grid's step."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.model.occupancy_density(x, self.grid.step_size)

    def _trace_args(self) -> dict[str, Any]:
        t = self.tracer
        return {"grid": self.grid, "aabb": t.aabb, "step_size": t.step_size, "cone_angle": t.cone_angle, "near": t.near}

    def render(self, rays: Rays, background: torch.Tensor | None,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        """Differentiable render of a ray batch (training); an SDF field adds "eikonal", the mean of
        (|grad sdf| - 1)^2 over the samples."""
        out = render_rays(rays, self.field_fn, background=background, generator=generator, **self._trace_args())
        gradient = out["extras"].get("sdf_gradient")
        if gradient is not None and len(gradient):
            out["eikonal"] = (gradient.norm(dim=-1) - 1).square().mean()
        return out

    @torch.no_grad()
    def render_rays_chunked(self, rays: Rays, background: torch.Tensor | None, chunk: int, near: float | None = None,
                            aabb: torch.Tensor | None = None, max_samples: int = 1024) -> dict[str, torch.Tensor]:
        """rgb, depth, opacity of many rays without grad; `near` and `aabb` override the tracer's (rays starting
        at a surface, a crop box), `max_samples` caps the samples per ray (the viewer)."""
        args = self._trace_args() | ({} if near is None else {"near": near}) | ({} if aabb is None else {"aabb": aabb})
        return render_chunked(rays, self.field_fn, background=background, chunk=chunk, max_samples_per_ray=max_samples,
                              **args)

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
        }


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
