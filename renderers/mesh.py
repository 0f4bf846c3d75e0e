"""Mesh extraction: marching cubes (PyMCubes) over any scalar field, coarse to fine.

The field is a closure, as for the renderers: `inside_fn(x)` is larger than the level inside the
surface (an opacity for radiance fields, minus the distance for SDF fields), so one extractor
serves both and its faces always wind outward.
"""

from __future__ import annotations

from typing import Callable

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor

InsideFn = Callable[[Tensor], Tensor]  # positions [N, 3] -> values [N], > level inside
COARSE_STEP = 4  # voxels between the coarse evaluations that find where to refine


def lattice_shape(box: Tensor, resolution: int, coarse_step: int = 1) -> tuple[float, list[int]]:
    """The cubic voxel (longest side / resolution) and the cells per axis, rounded up to whole coarse cells."""
    extent = box[1] - box[0]
    voxel = float(extent.max()) / resolution
    cells = [coarse_step * max(1, -(-round(float(e) / voxel) // coarse_step)) for e in extent.tolist()]
    return voxel, cells


@torch.no_grad()
def extract_isosurface(inside_fn: InsideFn, box: Tensor, resolution: int, level: float, coarse_step: int = COARSE_STEP,
                       chunk: int = 2**18, closed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] (float64, box frame) and faces [F, 3] of the surface where inside_fn crosses `level`.

    The box is cut into cubic voxels, `resolution` along its longest side. The field is first evaluated
    every `coarse_step` voxels; coarse cells whose corners straddle the level, and their neighbours, are
    evaluated at full resolution. Elsewhere the fine values are the coarse ones trilinearly interpolated,
    so skipped space keeps the sign the coarse evaluation found (a constant there would make a second shell).
    Faces wind counter-clockwise seen from outside (positive signed volume). closed: what is inside is capped
    where the box cuts it (within a voxel inside its faces: the lattice in the box is ringed by outside
    values), so the mesh bounds a solid.
    """
    voxel, cells = lattice_shape(box, resolution, coarse_step)
    coarse_cells = [n // coarse_step for n in cells]
    coarse = _evaluate_lattice(inside_fn, box[0], voxel * coarse_step, coarse_cells, chunk)

    volume = coarse
    if coarse_step > 1:
        corners = coarse[None, None]
        straddles = (F.max_pool3d(corners, 2, stride=1) > level) & (-F.max_pool3d(-corners, 2, stride=1) <= level)
        active = F.max_pool3d(straddles.float(), 3, stride=1, padding=1) > 0  # and their neighbours
        volume = F.interpolate(corners, size=[n + 1 for n in cells], mode="trilinear", align_corners=True)[0, 0]
        fine_cells = active[0, 0]
        for axis in range(3):
            fine_cells = fine_cells.repeat_interleave(coarse_step, dim=axis)
        # A lattice point is refined when any of the (up to 8) cells around it is.
        points = F.max_pool3d(fine_cells[None, None].float(), 2, stride=1, padding=1)[0, 0] > 0
        index = points.nonzero()
        for part in index.split(chunk):
            volume[part[:, 0], part[:, 1], part[:, 2]] = inside_fn(box[0] + part.float() * voxel).float()

    origin = box[0].cpu().double().numpy()
    if closed:  # the lattice inside the box, ringed by values far outside: caps on its outermost points
        inside = [int(float(e) / voxel + 1e-6) + 1 for e in (box[1] - box[0]).tolist()]
        volume = volume[: inside[0], : inside[1], : inside[2]]
        volume = F.pad(volume, (1,) * 6, value=level - 1e3 * (1 + float((volume - level).abs().max())))
        origin = origin - voxel
    vertices, faces = mcubes.marching_cubes(volume.cpu().numpy(), level)
    return origin + vertices * voxel, faces.astype(np.int64)


def _evaluate_lattice(inside_fn: InsideFn, origin: Tensor, spacing: float, cells: list[int], chunk: int) -> Tensor:
    """inside_fn on the (cells + 1)^3 lattice points origin + spacing * (i, j, k), as a [nx+1, ny+1, nz+1] tensor."""
    shape = [n + 1 for n in cells]
    values = torch.empty(shape[0] * shape[1] * shape[2], device=origin.device)
    for start in range(0, len(values), chunk):  # positions made per chunk bound the memory
        flat = torch.arange(start, min(start + chunk, len(values)), device=origin.device)
        ijk = torch.stack([flat // (shape[1] * shape[2]), flat // shape[2] % shape[1], flat % shape[2]], -1)
        values[flat] = inside_fn(origin + spacing * ijk.float()).float()
    return values.view(shape)


def remove_small_components(vertices: np.ndarray, faces: np.ndarray,
                            min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop connected pieces whose area is below `min_fraction` of the largest piece's (floaters)."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    if len(faces) == 0:
        return vertices, faces
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))
    area = np.bincount(labels, weights=mesh.area_faces)
    mesh.update_faces(area[labels] >= min_fraction * area.max())
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)
