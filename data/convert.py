"""Writing any scene layout recon reads as a transforms.json scene (nerfstudio / instant-ngp): per-frame
intrinsics and distortion, images as PNG, loss masks and depth maps.

Poses stay in the input's world frame, except that a COLMAP model, which has no up, is turned so the
cameras' mean up is +z (recorded as nerfstudio's `applied_transform`). A layout's own box (COLMAP's
around the sparse points, NeuS's scale_mat) goes into instant-ngp's scale/offset/aabb_scale, so
`recon fit` on the result picks the same bounds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import trimesh

from .checks import nothing_to_lose
from .colmap import ColmapView, colmap_views
from .loaders import DISTORTION_KEYS, LONE, NGP_KEYS, Capture, Frame, SceneError
from .scene import points_bounds

OPENGL_ROW = [0.0, 0.0, 0.0, 1.0]
SPARSE_POINTS = "sparse_pc.ply"  # nerfstudio's name for the sparse points beside transforms.json


def write_transforms(capture: Capture, out: Path) -> list[Path]:
    """transforms.json (or transforms_{split}.json) plus images/, masks/ and depth/ under `out`; returns the
    JSON files. Raises SceneError when `out` already holds a scene."""
    problem = nothing_to_lose(out)
    if problem:
        raise SceneError(out, problem)
    (out / "images").mkdir(parents=True)
    every = np.stack([f.c2w for found in capture.lists.values() for f in found.frames])
    rotation, bounds = unit_frame(every, out, capture.points, capture.to_unit)
    written = []
    for split, found in capture.lists.items():
        frames = [_frame(frame, out, f"{split}_{i:05d}", rotation) for i, frame in enumerate(found.frames)]
        doc = {"frames": frames, **bounds}
        if capture.ngp_doc is not None:
            doc |= {key: capture.ngp_doc[key] for key in NGP_KEYS if key in capture.ngp_doc}
        if any("depth_file_path" in f for f in frames):
            doc["depth_unit_scale_factor"] = 1.0  # the .npy files hold world units
        name = "transforms.json" if split == LONE else f"transforms_{split}.json"
        (out / name).write_text(json.dumps(doc, indent=2))
        written.append(out / name)
    return written


def write_model_transforms(model_folder: Path, image_folder: Path, scene: Path) -> Path:
    """scene/transforms.json for a COLMAP model whose images stay where they are (under `scene`)."""
    views, missing, points = colmap_views(model_folder, image_folder)
    if missing:
        raise SceneError(model_folder, f"{len(missing)} registered images are not in {image_folder}, e.g. {missing[0]}")
    rotation, bounds = unit_frame(np.stack([view.c2w for view in views]), scene, points)
    frames = [camera_entry(str(view.path.relative_to(scene)), view, rotation) for view in views]
    out = scene / "transforms.json"
    out.write_text(json.dumps({"frames": frames, **bounds}, indent=2))
    return out


def unit_frame(c2w: np.ndarray, out: Path, points: np.ndarray | None = None,
               to_unit: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """A rotation for the poses [N, 3, 4] and the transforms.json keys that carry a layout's box: the
    sparse points' (up turned to +z, rotated points written beside the JSON) or a given normalisation
    (NeuS). instant-ngp's x * scale + offset in [0, 1]^3 is recon's 2x - 1 in [-1, 1]^3."""
    aabb_scale = 1.0
    if points is not None:
        found, _, aabb_scale, _ = points_bounds(points, torch.from_numpy(c2w))
        to_unit = found.double().numpy()
    if to_unit is None:
        return np.eye(3), {}
    scale = float(np.linalg.norm(to_unit[0, :3]))
    rotation = to_unit[:3, :3] / scale
    keys = {"scale": scale / 2, "offset": ((1 + to_unit[:3, 3]) / 2).tolist(), "aabb_scale": aabb_scale,
            "applied_transform": np.concatenate([rotation, np.zeros((3, 1))], axis=1).tolist()}
    if points is not None:
        trimesh.PointCloud(points @ rotation.T).export(out / SPARSE_POINTS)
        keys["ply_file_path"] = SPARSE_POINTS
    return rotation, keys


def camera_entry(file_path: str, camera: Frame | ColmapView, rotation: np.ndarray) -> dict:
    """A transforms.json frame: the pose turned by `rotation`, intrinsics, size and distortion."""
    fx, fy, cx, cy = camera.intrinsics
    w, h = camera.size if isinstance(camera, ColmapView) else camera.image.shape[1::-1]
    c2w = rotation @ np.asarray(camera.c2w)
    return {
        "file_path": file_path,
        "transform_matrix": [*c2w.tolist(), OPENGL_ROW],
        "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": int(w), "h": int(h),
        "camera_model": "OPENCV_FISHEYE" if camera.fisheye else "OPENCV",
        **dict(zip(DISTORTION_KEYS, camera.distortion)),
    }


def _frame(frame: Frame, out: Path, stem: str, rotation: np.ndarray) -> dict:
    source = Path(frame.name)
    if frame.image.dtype == np.uint8:  # as read, with a layout's masks already merged as alpha
        image = out / "images" / f"{stem}.png"
        iio.imwrite(image, frame.image)
    else:  # 16-bit: the file itself (Pillow cannot write 16-bit colour PNGs)
        image = out / "images" / f"{stem}{source.suffix}"
        shutil.copy2(source, image)
    entry = camera_entry(str(image.relative_to(out)), frame, rotation)
    if frame.loss_mask is not None:
        (out / "masks").mkdir(exist_ok=True)
        iio.imwrite(out / "masks" / f"{stem}.png", frame.loss_mask.astype(np.uint8) * 255)
        entry["mask_path"] = f"masks/{stem}.png"
    if frame.depth is not None:
        (out / "depth").mkdir(exist_ok=True)
        np.save(out / "depth" / f"{stem}.npy", frame.depth)
        entry["depth_file_path"] = f"depth/{stem}.npy"
    return entry
