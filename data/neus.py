"""NeuS / IDR scenes (the DTU and BlendedMVS convention of NeuS and CQ-NIR): `cameras_sphere.npz`
with `image/` and, optionally, `mask/`.

Camera i is the projection world_mat_i = K [R | t] (4x4, any scale); scale_mat_i maps the unit
sphere around the object into the world, so its inverse is the normalisation. Masks become the
images' alpha, which gives the mask loss and the alpha-aware box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .colmap import OPENCV_TO_OPENGL
from .loaders import (
    LONE,
    Capture,
    Frame,
    FrameList,
    SceneError,
    check_size,
    downscaled_frame,
    images_in,
    parallel_map,
    read_image,
    resolve_downscale,
)

CAMERAS = "cameras_sphere.npz"


def read_neus(file: Path, downscale: int, budget: float | None = None) -> Capture:
    folder = file.parent
    images = images_in(folder / "image")
    if not images:
        raise SceneError(folder / "image", f"no images beside {file.name}")
    masks = images_in(folder / "mask")
    if masks and len(masks) != len(images):
        raise SceneError(folder / "mask", f"{len(masks)} masks for {len(images)} images")
    try:
        npz = np.load(file)
        world_mats = [np.asarray(npz[f"world_mat_{i}"], dtype=np.float64) for i in range(len(images))]
        scale_mat = np.asarray(npz["scale_mat_0"], dtype=np.float64)
    except KeyError as e:
        raise SceneError(file, f"no {e.args[0]} for {len(images)} images") from None
    except Exception as e:  # a truncated or foreign file
        raise SceneError(file, f"unreadable ({type(e).__name__}: {e})") from None
    poses = [_decompose(file, i, m) for i, m in enumerate(world_mats)]
    downscale, note = resolve_downscale(downscale, images, budget)

    def load(i: int) -> Frame:
        pixels = read_image(images[i])
        if masks:
            mask = read_image(masks[i])
            check_size(masks[i], mask, (pixels.shape[1], pixels.shape[0]), f"its image {images[i].name}")
            alpha = mask[..., :1] / np.iinfo(mask.dtype).max * np.iinfo(pixels.dtype).max
            pixels = np.concatenate([pixels[..., :3], alpha.round().astype(pixels.dtype)], axis=2)
        c2w, intrinsics = poses[i]
        return downscaled_frame(Frame(str(images[i]), pixels, c2w, intrinsics, (0.0,) * 6, False), downscale)

    frames = FrameList(file, len(images), parallel_map(load, list(range(len(images)))))
    with_masks = f"masks from {folder / 'mask'} as alpha" if masks else "no masks"
    convention = f"NeuS/IDR {file} ({with_masks}); the unit sphere from scale_mat_0; every 8th image held out for test"
    return Capture(convention, {LONE: frames}, downscale, note, to_unit=np.linalg.inv(scale_mat))


def _decompose(file: Path, i: int, world_mat: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """OpenGL camera-to-world [3, 4] and (fx, fy, cx, cy) of a projection K [R | t], by RQ decomposition."""
    projection = world_mat[:3, :4]
    m = projection[:, :3]
    if not np.isfinite(projection).all() or abs(np.linalg.det(m)) < 1e-12:
        raise SceneError(file, f"world_mat_{i} is not a camera projection")
    if np.linalg.det(m) < 0:  # the projection's arbitrary scale may be negative
        m = -m
    q, r = np.linalg.qr(np.flipud(m).T)  # RQ of m through QR of its row-reversed transpose
    k, rotation = np.flipud(np.fliplr(r.T)), np.flipud(q.T)
    signs = np.diag(np.sign(np.diag(k)))  # make K's diagonal positive (signs @ signs = I)
    k, rotation = k @ signs, signs @ rotation
    k = k / k[2, 2]
    if abs(k[0, 1]) > 1e-6 * k[0, 0]:
        raise SceneError(file, f"world_mat_{i}: skewed pixels (K[0, 1] = {k[0, 1]:.3g}) are not supported")
    centre = -np.linalg.solve(projection[:, :3], projection[:, 3])
    c2w = np.concatenate([rotation.T @ OPENCV_TO_OPENGL, centre[:, None]], axis=1)
    # IDR puts pixel centres at integer coordinates, recon at half-integers.
    return c2w, (k[0, 0], k[1, 1], k[0, 2] + 0.5, k[1, 2] + 0.5)
