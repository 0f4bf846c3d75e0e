"""What the viewer shows of one camera: the field's buffers rendered a chunk at a time under the training
lock, shaded in a render mode (colour, depth in a colour map, opacity, normals), optionally two modes split
side by side at a divider, as nerfstudio's viewer does."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from recon.app.evaluate import COLORMAPS, colorize_depth, to_uint8
from recon.app.pipeline import Pipeline
from recon.data.cameras import Cameras

MODES = ("colour", "depth", "opacity", "normals")
NEAR_FRACTION = 0.01  # of the scene box diagonal: the viewer's near plane (a camera inside the box)
NORMAL_SMOOTHING = 1.0  # pixels: the Gaussian the rendered points are averaged over before their normals
DIVIDER = np.array([255, 200, 0], dtype=np.uint8)  # the split view's divider line


@dataclass
class RenderSettings:
    mode: str = "colour"
    resolution: int = 256  # rows of a resting frame
    max_samples: int = 1024  # per ray
    crop: torch.Tensor | None = None  # [2, 3] unit-frame box to render inside (None: the scene box)
    colormap: str = "viridis"  # depth's
    depth_range: tuple[float, float] | None = None  # unit-frame near, far; None: each frame's 2nd-98th percentile
    split_mode: str | None = None  # the right side's mode (None: no split)
    split: float = 0.5  # the divider, as a fraction of the width


def render_buffers(pipeline: Pipeline, camera: Cameras, settings: RenderSettings, chunk: int, lock: Any = None,
                   stale: Callable[[], bool] = lambda: False,
                   sdf_normals: bool = False, depth_normals_needed: bool = False) -> dict[str, torch.Tensor] | None:
    """rgb [H, W, 3], depth and opacity [H, W] (and if asked the SDF's unit normals [H, W, 3], or the rays'
    origins and dirs [H, W, 3] that depth normals need) of `camera` (one camera), `chunk` rays at a time, each
    chunk under `lock`; None once `stale()` says, between chunks, that the frame is no longer wanted."""
    device = pipeline.device
    rays = camera.to(device).image_rays(0)
    height, width = int(camera.height[0]), int(camera.width[0])
    aabb = pipeline.tracer.aabb
    box = aabb if settings.crop is None else settings.crop.to(device)
    near = max(pipeline.tracer.near, NEAR_FRACTION * float((aabb[1] - aabb[0]).norm()))
    white = torch.ones(3, device=device)
    keys = ("rgb", "depth", "opacity") + (("normal",) if sdf_normals else ())
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    guard = lock or threading.Lock()
    was_training = pipeline.field.training
    for start in range(0, len(rays), chunk):
        if stale():
            return None
        part = rays[start : start + chunk]
        with guard:
            pipeline.field.eval()
            out = pipeline.render_rays_chunked(part, white, chunk, near=near, aabb=box,
                                               max_samples=settings.max_samples)
            if sdf_normals:
                points = part.origins + part.dirs * out["depth"][:, None]
                out["normal"] = torch.nn.functional.normalize(pipeline.field.gradient(points, "sdf"), dim=-1)
            pipeline.field.train(was_training)
        for key in parts:
            parts[key].append(out[key])
    image = {key: torch.cat(values).view(height, width, -1).squeeze(-1).cpu() for key, values in parts.items()}
    if depth_normals_needed:
        image["dirs"] = rays.dirs.view(height, width, 3).cpu()
        image["origins"] = rays.origins.view(height, width, 3).cpu()
    return image


def depth_normals(points: torch.Tensor, dirs: torch.Tensor, weights: torch.Tensor | None = None,
                  sigma: float = NORMAL_SMOOTHING) -> torch.Tensor:
    """Unit normals [H, W, 3] of the surface through the rendered points [H, W, 3]: the cross product of its
    central differences across columns and rows (one-sided at the borders), turned to face the camera (against
    the rays' dirs). The points are first averaged over a Gaussian of `sigma` pixels, weighted by `weights`
    [H, W] (the opacity: empty pixels do not pull the surface): a density field's expected depth wobbles with
    its texture, and its own gradient is noise off the surface."""
    if sigma > 0:
        radius = max(1, math.ceil(2 * sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=points.dtype) / sigma) ** 2)
        kernel = (taps[:, None] * taps[None])[None, None]
        weight = (torch.ones_like(points[..., 0]) if weights is None else weights.to(points.dtype))[None, None]
        blur = lambda x: torch.nn.functional.conv2d(x, kernel, padding=radius)  # noqa: E731
        total = blur(weight)
        points = (blur(points.permute(2, 0, 1)[:, None] * weight) / total.clamp(min=1e-12))[:, 0].permute(1, 2, 0)
    across = torch.gradient(points, dim=1)[0]
    down = torch.gradient(points, dim=0)[0]
    normal = torch.nn.functional.normalize(torch.linalg.cross(across, down), dim=-1)
    facing = (normal * dirs).sum(-1, keepdim=True) > 0
    return torch.where(facing, -normal, normal)


def shade(image: dict[str, torch.Tensor], mode: str, settings: RenderSettings) -> np.ndarray:
    """The buffers as uint8 [H, W, 3] in `mode`; normals mapped n * 0.5 + 0.5 and faded to white where nothing
    was hit."""
    opacity = image["opacity"]
    if mode == "colour":
        return to_uint8(image["rgb"])
    if mode == "opacity":
        return to_uint8(opacity[..., None].expand(*opacity.shape, 3))
    if mode == "normals":
        normal = image.get("normal")
        if normal is None:
            points = image["origins"] + image["dirs"] * image["depth"][..., None]
            normal = depth_normals(points, image["dirs"], opacity)
        return to_uint8((normal * 0.5 + 0.5) * opacity[..., None] + (1 - opacity[..., None]))
    depth, alpha = image["depth"].numpy(), opacity.numpy()
    if settings.depth_range is None:
        hit = depth[alpha > 0.5]
        near_far = np.percentile(hit, [2, 98]) if len(hit) else (0.0, 1.0)
    else:
        near_far = settings.depth_range
    return to_uint8(torch.from_numpy(colorize_depth(depth, alpha, *near_far, COLORMAPS[settings.colormap])).float())


def render_frame(pipeline: Pipeline, camera: Cameras, settings: RenderSettings, chunk: int,
                 lock: Any = None, stale: Callable[[], bool] = lambda: False) -> np.ndarray | None:
    """One frame [H, W, 3] uint8 of `camera` (one camera) in the settings' mode (the split mode right of the
    divider, if set), rendered `chunk` rays at a time under `lock`; None when `stale()` dropped it."""
    modes = (settings.mode,) if settings.split_mode is None else (settings.mode, settings.split_mode)
    sdf = "sdf" in pipeline.field.outputs
    normals = "normals" in modes
    image = render_buffers(pipeline, camera, settings, chunk, lock, stale, sdf_normals=sdf and normals,
                           depth_normals_needed=normals and not sdf)
    if image is None:
        return None
    frame = shade(image, modes[0], settings)
    if len(modes) == 2:
        column = int(round(settings.split * frame.shape[1]))
        frame[:, column:] = shade(image, modes[1], settings)[:, column:]
        frame[:, max(column - 1, 0) : column + 1] = DIVIDER
    return frame
