"""LLFF's forward-facing layout (the original NeRF's `llff` data): `poses_bounds.npy` beside `images/`,
`images_4/`, `images_8/` ...

Each row holds a 3x5 matrix, row-major: the camera-to-world rotation and position in LLFF's axes (x down,
y right, z backwards) and a fifth column (height, width, focal) of the full-size images, then the near and
far depth bounds of what the camera sees. As the original loader does, the columns become OpenGL's (right,
up, backwards), `images_N` is read for `--downscale N` (its focal the full one over N), and every 8th
image is held out. The principal point is the image centre, in recon's pixel convention (COLMAP's, whose
poses LLFF stores); the original code's rays are half a pixel off it.

The bounds set the box: points in every camera's view between its near and far bound go through the rule
COLMAP's sparse points go through (the central 96% is the unit box, grown until the cameras are inside).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .loaders import (
    AUTO,
    HOLDOUT,
    LONE,
    Capture,
    Frame,
    FrameList,
    SceneError,
    downscaled_frame,
    images_in,
    parallel_map,
    read_image,
    resolve_downscale,
)

POSES = "poses_bounds.npy"
# Rotation columns (down, right, back) -> (right, up, back): R_opengl = R_llff @ LLFF_TO_OPENGL.
LLFF_TO_OPENGL = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
FRUSTUM_STEPS = 8  # depths between a camera's bounds, per axis of its image, that stand for the scene
NEAR_FRACTION = 0.75  # the near plane at 0.75 x the nearest bound: NeRF's bd_factor, whose NDC starts there


def read_llff(file: Path, downscale: int, budget: float | None = None) -> Capture:
    folder = file.parent
    try:
        table = np.load(file)
    except Exception as e:  # a truncated or foreign file
        raise SceneError(file, f"unreadable ({type(e).__name__}: {e})") from None
    if table.ndim != 2 or table.shape[1] != 17 or not np.isfinite(table).all():
        raise SceneError(file, f"expected N x 17 finite numbers (3x5 pose, near, far per image), got {table.shape}")
    folders = image_folders(folder)
    if not folders:
        raise SceneError(folder, f"no images/ or images_N/ folder beside {file.name}")
    factor, images, source = choose_folder(folder, folders, downscale, budget)
    if len(images) != len(table):
        raise SceneError(source, f"{len(images)} images for the {len(table)} poses in {file.name}")
    poses = table[:, :15].reshape(-1, 3, 5)
    bounds = table[:, 15:]
    if (bounds <= 0).any() or (bounds[:, 1] <= bounds[:, 0]).any():
        raise SceneError(file, "near and far bounds must be positive, near < far")
    full_height, full_width, focal = poses[0, :, 4]
    read_factor = 1 if source.name == "images" else factor  # images/ is shrunk after reading

    def load(i: int) -> Frame:
        pixels = read_image(images[i])
        expected = (full_width / read_factor, full_height / read_factor)
        if abs(pixels.shape[1] - expected[0]) > 1 or abs(pixels.shape[0] - expected[1]) > 1:
            raise SceneError(images[i], f"{pixels.shape[1]}x{pixels.shape[0]}, but {file.name} gives "
                                        f"{full_width:g}x{full_height:g}, so {source.name}/ should hold "
                                        f"{expected[0]:g}x{expected[1]:g}")
        c2w = np.concatenate([poses[i, :, :3] @ LLFF_TO_OPENGL, poses[i, :, 3:4]], axis=1)
        height, width = pixels.shape[:2]
        f = poses[i, 2, 4] / read_factor
        frame = Frame(str(images[i]), pixels, c2w, (f, f, width / 2, height / 2), (0.0,) * 6, False)
        return downscaled_frame(frame, factor // read_factor)

    frames = FrameList(file, len(table), parallel_map(load, list(range(len(table)))))
    convention = (f"LLFF {file} (forward-facing; {source.name}/ for --downscale {factor}, focal {focal:g} at "
                  f"{full_width:g}x{full_height:g}); every {HOLDOUT}th image held out for test")
    note = None if downscale != AUTO else f"automatic: {source.name}/"
    return Capture(convention, {LONE: frames}, factor, note, points=frustum_points(frames.frames, bounds),
                   points_what="points in the cameras' views between their near and far bounds",
                   near=NEAR_FRACTION * float(bounds[:, 0].min()))


def image_folders(folder: Path) -> dict[int, Path]:
    """images/ (factor 1) and images_N/ (factor N) beside poses_bounds.npy."""
    found = {}
    for child in folder.iterdir():
        match = re.fullmatch(r"images(?:_(\d+))?", child.name)
        if child.is_dir() and match and (int(match.group(1)) if match.group(1) else 1) > 0:
            found[int(match.group(1)) if match.group(1) else 1] = child
    return found


def choose_folder(folder: Path, folders: dict[int, Path], downscale: int,
                  budget: float | None) -> tuple[int, list[Path], Path]:
    """The factor and images to read: images_N for --downscale N, else images/ shrunk N times; automatic:
    the smallest factor whose pixels fit the budget, among the folders there are."""
    if downscale == AUTO:
        for factor in sorted(folders):
            images = images_in(folders[factor])
            if resolve_downscale(AUTO, images, budget)[0] == 1:
                return factor, images, folders[factor]
        factor = max(folders)
        return factor, images_in(folders[factor]), folders[factor]
    if downscale in folders:
        return downscale, images_in(folders[downscale]), folders[downscale]
    if 1 in folders:
        return downscale, images_in(folders[1]), folders[1]
    have = ", ".join(f"--downscale {n}" for n in sorted(folders))
    raise SceneError(folder, f"no images_{downscale}/ (nor images/ to shrink) for --downscale {downscale}; "
                             f"this capture has {have}")


def frustum_points(frames: list[Frame], bounds: np.ndarray) -> np.ndarray:
    """[N, 3] world points spread over each camera's view between its near and far bound."""
    points = []
    for frame, (near, far) in zip(frames, bounds):
        fx, fy, cx, cy = frame.intrinsics
        height, width = frame.image.shape[:2]
        u, v, depth = np.meshgrid(np.linspace(0, width, FRUSTUM_STEPS), np.linspace(0, height, FRUSTUM_STEPS),
                                  np.linspace(near, far, FRUSTUM_STEPS), indexing="ij")
        local = np.stack([(u - cx) / fx * depth, -(v - cy) / fy * depth, -depth], -1).reshape(-1, 3)  # OpenGL
        points.append(local @ frame.c2w[:, :3].T + frame.c2w[:, 3])
    return np.concatenate(points)
