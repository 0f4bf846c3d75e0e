"""A posed-image scene of a mesh, rendered by an independent ray caster (open3d's RaycastingScene).

Writes the NeRF-synthetic layout (transforms_{train,test}.json, RGBA PNGs) and `mesh.ply`, the
ground truth in the scene's world frame, so `recon eval-mesh` can score an exported mesh:

    python bench/mesh_scene.py ../shared/data/meshes/armadillo.obj runs/armadillo-scene
    recon fit runs/armadillo-scene --max-time 600 --out runs/armadillo
    recon export mesh runs/armadillo --resolution 512
    recon eval-mesh runs/armadillo/export/mesh-512.ply runs/armadillo-scene/mesh.ply

The mesh is turned from y-up to z-up, centred and scaled to a half-height of 1 (the synthetic scenes'
frame: cameras 4 units away on the elevation band of recon.data.synthetic). Its colour is a smooth
procedural albedo (texture for the photometric loss) under the synthetic scenes' fixed light.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import open3d as o3d
import trimesh

from recon.data.synthetic import AMBIENT, CAMERA_ANGLE_X, LIGHT, SUPERSAMPLE, camera_positions, look_at_origin

Y_UP_TO_Z_UP = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])


def normalised_mesh(path: Path) -> trimesh.Trimesh:
    mesh = trimesh.load(path, force="mesh")
    mesh.apply_transform(np.block([[Y_UP_TO_Z_UP, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]))
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(2.0 / (hi - lo).max())
    return mesh


def albedo(points: np.ndarray) -> np.ndarray:
    """Smooth colour bands across the body, so every view has texture to match."""
    phase = points @ np.array([[3.1, 1.7, 2.3], [-1.9, 2.9, 1.3], [2.2, -2.1, 3.7]]).T
    return 0.55 + 0.35 * np.sin(phase)


def render(scene: o3d.t.geometry.RaycastingScene, mesh: trimesh.Trimesh, c2w: np.ndarray, side: int,
           focal: float) -> np.ndarray:
    """RGBA [side, side, 4] in [0, 1], straight alpha, SUPERSAMPLE^2 rays per pixel."""
    s = SUPERSAMPLE
    u, v = np.meshgrid((np.arange(side * s) + 0.5) / s, (np.arange(side * s) + 0.5) / s)
    dirs = (np.stack([(u - side / 2) / focal, -(v - side / 2) / focal, -np.ones_like(u)], -1).reshape(-1, 3)
            @ c2w[:3, :3].T)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    rays = np.concatenate([np.broadcast_to(c2w[:3, 3], dirs.shape), dirs], 1).astype(np.float32)
    hits = scene.cast_rays(o3d.core.Tensor(rays))
    t = hits["t_hit"].numpy()
    hit = np.isfinite(t)
    normals = mesh.face_normals[hits["primitive_ids"].numpy()[hit]]
    points = rays[hit, :3] + t[hit, None] * rays[hit, 3:]
    rgb = np.zeros_like(dirs)
    rgb[hit] = albedo(points) * (AMBIENT + (1 - AMBIENT) * np.clip(normals @ LIGHT, 0, None))[:, None]
    alpha = hit.reshape(side, s, side, s).mean(axis=(1, 3))
    premultiplied = rgb.reshape(side, s, side, s, 3).mean(axis=(1, 3))
    color = np.divide(premultiplied, alpha[..., None], out=np.zeros_like(premultiplied), where=alpha[..., None] > 0)
    return np.concatenate([np.clip(color, 0, 1), alpha[..., None]], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resolution", type=int, default=400)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=20)
    args = parser.parse_args()

    mesh = normalised_mesh(args.mesh)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                        o3d.core.Tensor(mesh.faces.astype(np.uint32)))
    focal = 0.5 * args.resolution / np.tan(0.5 * CAMERA_ANGLE_X)
    for split, eyes in zip(("train", "test"), camera_positions(args.train, args.test, radius=4.0, seed=0)):
        (args.out / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, eye in enumerate(eyes):
            c2w = look_at_origin(eye)
            rgba = render(scene, mesh, c2w, args.resolution, focal)
            iio.imwrite(args.out / split / f"r_{i}.png", np.round(rgba * 255).astype(np.uint8))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        transforms = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
        (args.out / f"transforms_{split}.json").write_text(json.dumps(transforms, indent=2))
    mesh.export(args.out / "mesh.ply")
    print(f"wrote {args.out}: {args.train} train and {args.test} test views at {args.resolution}², mesh.ply "
          f"({len(mesh.faces):,} faces)")


if __name__ == "__main__":
    main()
