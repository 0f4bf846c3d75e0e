"""A picture of a mesh for the README: views ray cast by open3d, vertex colours under a light.

    python bench/mesh_picture.py runs/lego/export/mesh-512.ply docs/lego-mesh.png [--views 3] [--side 400]
    python bench/mesh_picture.py runs/fox/export/mesh-256.ply docs/fox-mesh.png --scene ../shared/data/fox \
        --frames 0 20 40 [--downscale 4]

By default cameras circle the mesh's bounding sphere at 30 degrees elevation, z up (the synthetic scenes'
frame). With --scene the mesh is seen from the scene's own cameras (frames by index in its transforms
file, lens distortion ignored), each photo beside its view, so a real capture's mesh can be read against
what was photographed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import open3d as o3d
import trimesh

from recon.data.loaders import read_transforms
from recon.data.synthetic import look_at_origin

LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


def shade(mesh: trimesh.Trimesh, c2w: np.ndarray, intrinsics: tuple[float, float, float, float],
          size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] in [0, 1]: the mesh seen by an OpenGL camera (c2w [3+, 4], fx fy cx cy), white background."""
    (fx, fy, cx, cy), (width, height) = intrinsics, size
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                        o3d.core.Tensor(mesh.faces.astype(np.uint32)))
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    dirs = np.stack([(u - cx) / fx, -(v - cy) / fy, -np.ones_like(u)], -1) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    rays = o3d.core.Tensor(np.concatenate([np.broadcast_to(c2w[:3, 3], dirs.shape), dirs], -1).astype(np.float32))
    hits = scene.cast_rays(rays)
    hit = np.isfinite(hits["t_hit"].numpy())
    face = hits["primitive_ids"].numpy()[hit]
    uv = hits["primitive_uvs"].numpy()[hit]
    weights = np.stack([1 - uv.sum(-1), uv[:, 0], uv[:, 1]], -1)  # barycentric over the face's three vertices
    colors = (mesh.visual.vertex_colors[:, :3] / 255.0 if mesh.visual.kind == "vertex"
              else np.full((len(mesh.vertices), 3), 0.8))
    albedo = (colors[mesh.faces[face]] * weights[..., None]).sum(1)
    normals = mesh.face_normals[face]
    normals *= np.sign(-(normals * dirs[hit]).sum(-1, keepdims=True))  # towards the camera
    image = np.ones((height, width, 3))
    image[hit] = albedo * (0.45 + 0.55 * np.clip(normals @ LIGHT, 0, None))[:, None]
    return image


def orbit_view(mesh: trimesh.Trimesh, azimuth_deg: float, side: int, elevation_deg: float = 30.0) -> np.ndarray:
    """The mesh from its bounding sphere's outside, looking at its centre (45 degrees field of view)."""
    centre = mesh.bounding_sphere.primitive.center
    radius = mesh.bounding_sphere.primitive.radius
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    offset = 2.6 * radius * np.array([np.cos(a) * np.cos(e), np.sin(a) * np.cos(e), np.sin(e)])
    c2w = look_at_origin(offset)
    c2w[:3, 3] += centre
    focal = 0.5 * side / np.tan(np.radians(22.5))
    return shade(mesh, c2w, (focal, focal, side / 2, side / 2), (side, side))


def camera_views(mesh: trimesh.Trimesh, scene: Path, frames: list[int], downscale: int) -> list[np.ndarray]:
    """For each frame: its photo beside the mesh seen from its camera."""
    listed = [frame for frames_ in read_transforms(scene, downscale).lists.values() for frame in frames_.frames]
    views = []
    for index in frames:
        frame = listed[index]
        photo = frame.image[..., :3].astype(np.float64) / (65535.0 if frame.image.dtype == np.uint16 else 255.0)
        height, width = photo.shape[:2]
        views += [photo, shade(mesh, frame.c2w, frame.intrinsics, (width, height))]
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--side", type=int, default=400)
    parser.add_argument("--scene", type=Path, help="see the mesh from this scene's cameras")
    parser.add_argument("--frames", type=int, nargs="+", default=[0], help="with --scene: frame indices")
    parser.add_argument("--downscale", type=int, default=4, help="with --scene: image downscale")
    args = parser.parse_args()
    mesh = trimesh.load(args.mesh, force="mesh")
    if args.scene:
        views = camera_views(mesh, args.scene, args.frames, args.downscale)
    else:
        views = [orbit_view(mesh, -60 + 360 * k / args.views, args.side) for k in range(args.views)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, np.round(np.concatenate(views, axis=1) * 255).astype(np.uint8))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
