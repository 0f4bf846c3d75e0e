"""A picture of a mesh for the README: views around it, ray cast by open3d, vertex colours under a light.

    python bench/mesh_picture.py runs/lego/export/mesh-512.ply docs/lego-mesh.png [--views 3] [--side 400]

Cameras circle the mesh's bounding sphere at 30 degrees elevation, z up (the synthetic scenes' frame).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import open3d as o3d
import trimesh

from recon.data.synthetic import look_at_origin

LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


def picture(mesh: trimesh.Trimesh, azimuth_deg: float, side: int, elevation_deg: float = 30.0) -> np.ndarray:
    centre = mesh.bounding_sphere.primitive.center
    radius = mesh.bounding_sphere.primitive.radius
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = centre + 2.6 * radius * np.array([np.cos(a) * np.cos(e), np.sin(a) * np.cos(e), np.sin(e)])
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)), o3d.core.Tensor(mesh.faces.astype(np.uint32)))
    c2w = look_at_origin(eye - centre)
    focal = 0.5 * side / np.tan(np.radians(22.5))
    u, v = np.meshgrid(np.arange(side) + 0.5, np.arange(side) + 0.5)
    dirs = np.stack([(u - side / 2) / focal, -(v - side / 2) / focal, -np.ones_like(u)], -1) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    rays = o3d.core.Tensor(np.concatenate([np.broadcast_to(eye, dirs.shape), dirs], -1).astype(np.float32))
    hits = scene.cast_rays(rays)
    hit = np.isfinite(hits["t_hit"].numpy())
    face = hits["primitive_ids"].numpy()[hit]
    uv = hits["primitive_uvs"].numpy()[hit]
    weights = np.stack([1 - uv.sum(-1), uv[:, 0], uv[:, 1]], -1)  # barycentric over the face's three vertices
    colors = mesh.visual.vertex_colors[:, :3] / 255.0 if mesh.visual.kind == "vertex" else np.full((len(mesh.vertices), 3), 0.8)
    albedo = (colors[mesh.faces[face]] * weights[..., None]).sum(1)
    normals = mesh.face_normals[face]
    normals *= np.sign(-(normals * rays.numpy()[..., 3:][hit]).sum(-1, keepdims=True))  # towards the camera
    image = np.ones((side, side, 3))
    image[hit] = albedo * (0.45 + 0.55 * np.clip(normals @ LIGHT, 0, None))[:, None]
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--side", type=int, default=400)
    args = parser.parse_args()
    mesh = trimesh.load(args.mesh, force="mesh")
    row = np.concatenate([picture(mesh, -60 + 360 * k / args.views, args.side) for k in range(args.views)], axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, np.round(row * 255).astype(np.uint8))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
