"""Writing any scene layout recon reads as a transforms.json scene (nerfstudio / instant-ngp), in the
input's world frame: per-frame intrinsics and distortion, images as PNG, loss masks and depth maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .loaders import DISTORTION_KEYS, LONE, NGP_KEYS, Capture, Frame, SceneError

OPENGL_ROW = [0.0, 0.0, 0.0, 1.0]


def write_transforms(capture: Capture, out: Path) -> list[Path]:
    """transforms.json (or transforms_{split}.json) plus images/, masks/ and depth/ under `out`; returns the
    JSON files. Raises SceneError when `out` already holds a scene."""
    if out.exists() and any(out.iterdir()):
        raise SceneError(out, "is not empty; choose a new folder")
    (out / "images").mkdir(parents=True)
    written = []
    for split, found in capture.lists.items():
        frames = [_frame(frame, out, f"{split}_{i:05d}") for i, frame in enumerate(found.frames)]
        doc = {"frames": frames}
        if capture.ngp_doc is not None:
            doc |= {key: capture.ngp_doc[key] for key in NGP_KEYS if key in capture.ngp_doc}
        if any("depth_file_path" in f for f in frames):
            doc["depth_unit_scale_factor"] = 1.0  # the .npy files hold world units
        name = "transforms.json" if split == LONE else f"transforms_{split}.json"
        (out / name).write_text(json.dumps(doc, indent=2))
        written.append(out / name)
    return written


def _frame(frame: Frame, out: Path, stem: str) -> dict:
    source = Path(frame.name)
    if frame.image.dtype == np.uint8:  # as read, with a layout's masks already merged as alpha
        image = out / "images" / f"{stem}.png"
        iio.imwrite(image, frame.image)
    else:  # 16-bit: the file itself (Pillow cannot write 16-bit colour PNGs)
        image = out / "images" / f"{stem}{source.suffix}"
        shutil.copy2(source, image)
    fx, fy, cx, cy = frame.intrinsics
    h, w = frame.image.shape[:2]
    entry = {
        "file_path": str(image.relative_to(out)),
        "transform_matrix": [*np.asarray(frame.c2w).tolist(), OPENGL_ROW],
        "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": w, "h": h,
        "camera_model": "OPENCV_FISHEYE" if frame.fisheye else "OPENCV",
        **dict(zip(DISTORTION_KEYS, frame.distortion)),
    }
    if frame.loss_mask is not None:
        (out / "masks").mkdir(exist_ok=True)
        iio.imwrite(out / "masks" / f"{stem}.png", frame.loss_mask.astype(np.uint8) * 255)
        entry["mask_path"] = f"masks/{stem}.png"
    if frame.depth is not None:
        (out / "depth").mkdir(exist_ok=True)
        np.save(out / "depth" / f"{stem}.npy", frame.depth)
        entry["depth_file_path"] = f"depth/{stem}.npy"
    return entry
