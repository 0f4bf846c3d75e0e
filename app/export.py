"""Meshes from trained fields, in the coordinates of the user's input cameras.

Radiance fields are meshed at an opacity, 1 - exp(-sigma * voxel), so the level does not depend on
the scene's scale; space that no training view sees (outside every frustum, or behind the surface
each view renders) counts as inside, which closes the unobserved side of an object instead of
leaving a hollow shell or a second wall where the untrained density inside it happens to drop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

from recon.app.pipeline import Pipeline
from recon.app.run import UserError
from recon.data.cameras import Cameras
from recon.data.rays import Rays
from recon.renderers.mesh import COARSE_STEP, extract_isosurface, lattice_shape, remove_small_components

OPACITY_LEVEL = 0.5  # opacity of one export voxel at the surface
MIN_COMPONENT_FRACTION = 0.02  # --clean drops pieces under 2% of the largest piece's area
SEEN_BY_FRACTION = 0.25  # space counts as seen when a quarter of the training views see it (rendered depth is noisy)
VISIBILITY_LATTICE = 128  # lattice points per side for the seen-space test
VISIBILITY_IMAGE_SIDE = 160  # training views are rendered at most this many pixels wide for it
FORMATS = ("ply", "obj", "glb")


@dataclass
class Mesh:
    vertices: np.ndarray  # [V, 3] float64, world (input camera) coordinates
    faces: np.ndarray  # [F, 3] int64, outward winding
    colors: np.ndarray  # [V, 3] uint8

    def save(self, path: Path) -> None:
        mesh = trimesh.Trimesh(self.vertices, self.faces, vertex_colors=self.colors, process=False)
        mesh.export(path, file_type=path.suffix[1:])


def world_to_unit_box(world_box: Tensor, to_unit: Tensor) -> Tensor:
    """The unit-frame box [2, 3] around a world-frame box's eight corners."""
    corners = torch.cartesian_prod(*world_box.T.double())
    unit = corners @ to_unit[:3, :3].double().T + to_unit[:3, 3].double()
    return torch.stack([unit.min(0).values, unit.max(0).values]).float()


def export_box(pipeline: Pipeline, to_unit: Tensor, crop: Tensor | None) -> Tensor:
    """Where to mesh, in the unit frame: the inner box (the scene box for bounded scenes), cut by the crop box."""
    box = torch.tensor(pipeline.grid_config["aabb"])
    if crop is None:
        return box
    crop_unit = world_to_unit_box(crop, to_unit)
    cut = torch.stack([torch.maximum(box[0], crop_unit[0]), torch.minimum(box[1], crop_unit[1])])
    if (cut[1] <= cut[0]).any():
        raise UserError(f"--crop {crop.flatten().tolist()}: the crop box is empty or outside the scene")
    return cut


def memory_needed(box: Tensor, resolution: int) -> int:
    """Bytes the extraction holds at once: the fine volume, its upsampling and masks (~16 bytes a point)."""
    _, cells = lattice_shape(box, resolution, COARSE_STEP)
    return 16 * math.prod(n + 1 for n in cells)


def memory_free(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # unknown: do not refuse


@torch.no_grad()
def seen_space(pipeline: Pipeline, cameras: Cameras, box: Tensor, resolution: int = VISIBILITY_LATTICE,
               image_side: int = VISIBILITY_IMAGE_SIDE, views_per_chunk: int = 4) -> tuple[Tensor, float]:
    """How many views see each point of the lattice over `box` ([n+1, n+1, n+1], spacing returned): have it
    inside their image and in front of the surface they render there (plus two lattice steps, so the
    field, not this test, places the surface)."""
    device = pipeline.device
    spacing, cells = lattice_shape(box, resolution)
    shrink = max(1, math.ceil(int(cameras.width.max()) / image_side))
    views = cameras.downscaled(shrink).to(device)
    ticks = [box[0, a].item() + spacing * torch.arange(n + 1, device=device) for a, n in enumerate(cells)]
    points = torch.stack(torch.meshgrid(*ticks, indexing="ij"), -1).reshape(-1, 3)
    seen = torch.zeros(len(points), dtype=torch.long, device=device)
    for start in range(0, len(views), views_per_chunk):
        chunk = views[start : start + views_per_chunk]
        surface = []
        for i in range(len(chunk)):
            out = pipeline.render_view(chunk, i)
            surface.append(torch.where(out["opacity"] > 0.5, out["depth"], torch.inf).reshape(-1))
        px, py, z = chunk.project(points)
        w, h = chunk.width[:, None], chunk.height[:, None]
        inside = (z > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        pixel = torch.where(inside, py.long() * w + px.long(), 0)
        depth_there = torch.stack([s[p] for s, p in zip(surface, pixel)])
        distance = (points[None] - chunk.c2w[:, None, :, 3]).norm(dim=-1)
        seen += (inside & (distance < depth_there + 2 * spacing)).sum(0)
    return seen.view(*(n + 1 for n in cells)), spacing


@torch.no_grad()
def vertex_colors(pipeline: Pipeline, vertices: Tensor, normals: Tensor, offset: float, chunk: int) -> Tensor:
    """Colour [V, 3] seen by a short ray from just outside each vertex (along its normal) looking back at it:
    what a camera would see there, rather than the colour head at the iso-point, untrained inside surfaces."""
    rays = Rays(vertices + offset * normals, -normals)
    out = pipeline.render_rays_chunked(rays, background=None, chunk=chunk, near=0.0)
    opacity = out["opacity"][:, None]
    return torch.where(opacity > 0.05, out["rgb"] / opacity.clamp(min=1e-6), 0.5).clamp(0, 1)


@torch.no_grad()
def extract_mesh(pipeline: Pipeline, train_cameras: Cameras, to_unit: Tensor, resolution: int = 512,
                 level: float | None = None, crop: Tensor | None = None, clean: bool = True,
                 chunk: int = 2**16) -> tuple[Mesh, dict[str, Any]]:
    """Mesh a radiance field's pipeline (level None: OPACITY_LEVEL); returns the mesh in world coordinates
    and what was done."""
    level = OPACITY_LEVEL if level is None else level
    if "density" not in pipeline.field.outputs:
        raise UserError(f"field {pipeline.field.name!r} has no density output to mesh")
    started = time.perf_counter()
    box = export_box(pipeline, to_unit, crop).to(pipeline.device)
    need, free = memory_needed(box, resolution), memory_free(pipeline.device)
    if need > free:
        raise UserError(f"--resolution {resolution}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    voxel, _ = lattice_shape(box, resolution)
    seen_by, spacing = seen_space(pipeline, train_cameras, box)
    seen = seen_by >= max(1, round(SEEN_BY_FRACTION * len(train_cameras)))
    seen_max = torch.tensor(seen.shape, device=seen.device) - 1
    field = pipeline.field
    was_training = field.training
    field.eval()

    def inside_fn(x: Tensor) -> Tensor:
        opacity = 1 - torch.exp(-pipeline.density_fn(x) * voxel)
        i, j, k = ((x - box[0]) / spacing).round().long().clamp(min=torch.zeros_like(seen_max), max=seen_max).unbind(-1)
        return torch.where(seen[i, j, k], opacity, 1.0)

    vertices, faces = extract_isosurface(inside_fn, box, resolution, level, chunk=chunk)
    if clean:
        vertices, faces = remove_small_components(vertices, faces, MIN_COMPONENT_FRACTION)
    normals = torch.from_numpy(np.array(trimesh.Trimesh(vertices, faces, process=False).vertex_normals)).float()
    verts = torch.from_numpy(vertices).float().to(pipeline.device)
    colors = vertex_colors(pipeline, verts, normals.to(pipeline.device), 2 * voxel, chunk)
    field.train(was_training)

    # Unit frame -> the input cameras' frame: x_world = A^-1 (x_unit - t).
    linear, shift = to_unit[:3, :3].double().numpy(), to_unit[:3, 3].double().numpy()
    world = (vertices - shift) @ np.linalg.inv(linear).T
    if np.linalg.det(linear) < 0:  # a reflection would turn the faces inside out
        faces = faces[:, ::-1]
    mesh = Mesh(world, np.ascontiguousarray(faces), (colors.cpu().numpy() * 255).round().astype(np.uint8))
    info = {"resolution": resolution, "voxel_unit": voxel, "level": level, "level_meaning": "opacity 1 - exp(-sigma * voxel)",
            "unit_box": box.tolist(), "world_from_unit": np.linalg.inv(to_unit.double().numpy()).tolist(),
            "clean": clean, "vertices": len(world), "faces": len(faces), "seconds": round(time.perf_counter() - started, 2)}
    return mesh, info
