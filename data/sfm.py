"""Structure from motion: a folder of photos or a video in, a scene folder `recon fit` reads out.

pycolmap's CPU pipeline (SIFT features, exhaustive or sequential matching, incremental mapping), laid
out as nerfstudio's ns-process-data does: images/, colmap/database.db, colmap/sparse/0 and a
transforms.json beside them (convert.write_model_transforms), plus process.json (the report) and
process.png (cameras and sparse points seen from above and from the side).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import trimesh

from .checks import nothing_to_lose
from .convert import SPARSE_POINTS, write_model_transforms
from .loaders import SceneError

PHOTO_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")  # what COLMAP decodes
MATCHERS = ("exhaustive", "sequential")
CAMERA_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_RADIAL", "OPENCV_FISHEYE")
POOR_REGISTRATION = 0.8  # below this registered fraction the report warns and advises
VIDEO_FRAMES = 120
SHARPNESS_SIDE = 480  # sharpness is judged on frames strided down to about this side, for speed
PICTURE_SIDE = 512


@dataclass(frozen=True)
class SfmOptions:
    matcher: str = "exhaustive"  # every pair; "sequential": each image with its next ones (video order)
    camera_model: str = "OPENCV"  # nerfstudio's default: pinhole plus two radial and two tangential terms
    max_image_side: int = 1600  # SIFT runs on images downscaled to this side (COLMAP's own default: 3200)
    sequential_overlap: int = 10
    seed: int = 0  # COLMAP's RANSAC and initial pair choice (its threads still make reruns differ slightly)


def process_images(photos: Path, scene: Path, options: SfmOptions = SfmOptions()) -> dict:
    """Poses for a folder of photos: copies them to scene/images and runs structure from motion."""
    if not photos.is_dir():
        raise SceneError(photos, "no such folder of photos")
    files = sorted(p for p in photos.iterdir() if p.suffix.lower().lstrip(".") in PHOTO_EXTENSIONS)
    if len(files) < 2:
        raise SceneError(photos, f"structure from motion needs at least 2 overlapping photos "
                                 f"({', '.join(PHOTO_EXTENSIONS)}), found {len(files)}")
    sizes = {_image_size(file) for file in files}

    def fill(images: Path) -> list[str]:
        for file in files:
            shutil.copy2(file, images / file.name)
        return [file.name for file in files]

    return _process(photos, scene, fill, options, single_camera=len(sizes) == 1)


def process_video(video: Path, scene: Path, frames: int = VIDEO_FRAMES, options: SfmOptions | None = None) -> dict:
    """Poses for a video: the sharpest frame of each of `frames` equal stretches of it, then structure
    from motion with sequential matching (unless `options` say otherwise)."""
    if not video.is_file():
        raise SceneError(video, "no such video file")
    if frames < 2:
        raise SceneError(video, f"--frames {frames}: structure from motion needs at least 2")
    options = options or SfmOptions(matcher="sequential")

    def fill(images: Path) -> list[str]:
        picked = pick_sharp_frames(video, frames)
        names = []
        for index, frame in picked:
            names.append(f"frame_{index:05d}.png")
            iio.imwrite(images / names[-1], frame)
        return names

    return _process(video, scene, fill, options, single_camera=True)


def pick_sharp_frames(video: Path, count: int) -> list[tuple[int, np.ndarray]]:
    """(frame index, RGB frame) of the sharpest frame (variance of the Laplacian, as instant-ngp's
    colmap2nerf measures it) in each of `count` equal stretches of the video, in one decoding pass."""
    try:
        meta = iio.immeta(video, plugin="FFMPEG")
        frames = iio.imiter(video, plugin="FFMPEG")
    except Exception as e:  # imageio and ffmpeg raise OSError, RuntimeError, ... for what they cannot read
        raise _unreadable(video, "video", e) from None
    estimated = max(round(meta.get("fps", 0) * meta.get("duration", 0)), 1)
    best: dict[int, tuple[float, int, np.ndarray]] = {}
    try:
        for index, frame in enumerate(frames):
            stretch = min(index * count // estimated, count - 1)  # frames past the estimate join the last
            score = sharpness(frame)
            if stretch not in best or score > best[stretch][0]:
                best[stretch] = (score, index, frame[..., :3])
    except Exception as e:
        raise _unreadable(video, "video", e) from None
    if len(best) < 2:
        raise SceneError(video, f"{len(best)} decodable frames; structure from motion needs at least 2")
    return [(index, frame) for _, index, frame in (best[k] for k in sorted(best))]


def sharpness(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image, strided to about SHARPNESS_SIDE."""
    step = max(1, max(image.shape[:2]) // SHARPNESS_SIDE)
    grey = image[::step, ::step, :3].astype(np.float32).mean(axis=-1)
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def _process(source: Path, scene: Path, fill: Callable[[Path], list[str]], options: SfmOptions,
             single_camera: bool) -> dict:
    if options.matcher not in MATCHERS:
        raise SceneError(source, f"unknown matcher {options.matcher!r} (choose from {', '.join(MATCHERS)})")
    if options.camera_model not in CAMERA_MODELS:
        raise SceneError(source, f"unknown camera model {options.camera_model!r} "
                                 f"(choose from {', '.join(CAMERA_MODELS)})")
    with _new_folder(scene):
        (scene / "images").mkdir()
        started = time.perf_counter()
        names = fill(scene / "images")
        report = {"source": str(source), "images": len(names), "prepare_s": time.perf_counter() - started}
        report |= structure_from_motion(source, scene, options, single_camera)
        write_model_transforms(scene / "colmap" / "sparse" / "0", scene / "images", scene)
        report["unregistered"] = sorted(set(names) - set(report.pop("registered_names")))
        report["registered_fraction"] = report["registered"] / len(names)
        if report["registered_fraction"] < POOR_REGISTRATION:
            report["warning"] = (
                f"only {report['registered']} of {len(names)} images registered: try --matcher exhaustive, "
                "more frames or photos with more overlap, less motion blur, and a textured, static scene")
        draw_cameras(scene / "transforms.json", scene / SPARSE_POINTS, scene / "process.png")
        (scene / "process.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def structure_from_motion(source: Path, scene: Path, options: SfmOptions, single_camera: bool) -> dict:
    """Features, matches and the largest incremental model of scene/images, written to
    scene/colmap/sparse/0; returns what the report says of it."""
    import pycolmap

    pycolmap.logging.minloglevel = 3  # COLMAP logs thousands of lines; recon says what failed itself
    colmap = scene / "colmap"
    models = colmap / "models"
    models.mkdir(parents=True)
    database = colmap / "database.db"
    times = {}
    threads = os.cpu_count() or 1

    started = time.perf_counter()
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = options.max_image_side
    extraction.num_threads = threads
    pycolmap.extract_features(
        database, scene / "images",
        camera_mode=pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.PER_IMAGE,
        reader_options=pycolmap.ImageReaderOptions(camera_model=options.camera_model),
        extraction_options=extraction, device=pycolmap.Device.cpu)
    times["features_s"] = time.perf_counter() - started

    started = time.perf_counter()
    if options.matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions(overlap=options.sequential_overlap)
        pycolmap.match_sequential(database, pairing_options=pairing, device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    times["matching_s"] = time.perf_counter() - started

    started = time.perf_counter()
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.random_seed = options.seed
    mapping.num_threads = threads
    found = pycolmap.incremental_mapping(database, scene / "images", models, mapping)
    times["mapping_s"] = time.perf_counter() - started
    if not found:
        raise SceneError(source, "structure from motion registered no images (no pair of views with enough "
                                 "matched features): take photos with more overlap and texture, or less blur")
    sizes = sorted((model.num_reg_images() for model in found.values()), reverse=True)
    largest = max(found.values(), key=lambda model: model.num_reg_images())
    (colmap / "sparse" / "0").mkdir(parents=True)
    largest.write_binary(str(colmap / "sparse" / "0"))
    shutil.rmtree(models)
    return {
        "registered": largest.num_reg_images(),
        "registered_names": [largest.images[i].name for i in largest.reg_image_ids()],
        "models": sizes,  # registered images per model; several: the views fell into unconnected groups
        "points": largest.num_points3D(),
        "reprojection_error_px": largest.compute_mean_reprojection_error(),
        "mean_track_length": largest.compute_mean_track_length(),
        "options": asdict(options) | {"single_camera": single_camera},
        "cameras": {str(k): {"model": c.model.name, "width": c.width, "height": c.height,
                             "params": [float(v) for v in c.params]} for k, c in largest.cameras.items()},
        **times,
    }


@contextmanager
def _new_folder(folder: Path) -> Iterator[None]:
    """Create `folder` (absent or empty) for the output; if anything fails, remove what was written to it (and
    the folder, when this made it)."""
    problem = nothing_to_lose(folder)
    if problem:
        raise SceneError(folder, problem)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if made:
            folder.rmdir()
        raise


def _image_size(file: Path) -> tuple[int, ...]:
    try:
        return iio.improps(file).shape[:2]
    except Exception as e:
        raise _unreadable(file, "image", e) from None


def _unreadable(path: Path, what: str, error: Exception) -> SceneError:
    first_line = (str(error).splitlines() or [""])[0]
    return SceneError(path, f"unreadable {what} ({type(error).__name__}: {first_line})")


def draw_cameras(transforms: Path, points_file: Path, out: Path) -> None:
    """A PNG of the sparse points (grey) and the cameras (red, a blue tick along the view), from above
    (x, y) on the left and from the side (x, z) on the right, in transforms.json's frame (+z up)."""
    poses = np.array([frame["transform_matrix"] for frame in json.loads(transforms.read_text())["frames"]])[:, :3]
    points = np.asarray(trimesh.load(points_file).vertices).reshape(-1, 3)
    centres, views = poses[:, :, 3], -poses[:, :, 2]
    lo, hi = np.min(centres, axis=0), np.max(centres, axis=0)
    if len(points):
        lo, hi = np.minimum(lo, np.quantile(points, 0.02, axis=0)), np.maximum(hi, np.quantile(points, 0.98, axis=0))
    extent = max(float(np.max(hi - lo)), 1e-9) * 1.1
    middle = (lo + hi) / 2
    tick = np.linspace(0, 0.06 * extent, 12)
    panels = []
    for axes in ((0, 1), (0, 2)):
        canvas = np.full((PICTURE_SIDE, PICTURE_SIDE, 3), 255, np.uint8)

        def plot(xyz: np.ndarray, colour: tuple[int, int, int], radius: int) -> None:
            uv = (xyz[:, axes] - middle[list(axes)]) / extent + 0.5
            col = np.round(uv[:, 0] * (PICTURE_SIDE - 1)).astype(int)
            row = np.round((1 - uv[:, 1]) * (PICTURE_SIDE - 1)).astype(int)
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    r, c = row + dr, col + dc
                    inside = (r >= 0) & (r < PICTURE_SIDE) & (c >= 0) & (c < PICTURE_SIDE)
                    canvas[r[inside], c[inside]] = colour

        plot(points, (110, 110, 110), 0)
        plot((centres[:, None] + tick[None, :, None] * views[:, None]).reshape(-1, 3), (40, 90, 220), 0)
        plot(centres, (220, 30, 30), 2)
        panels.append(canvas)
    iio.imwrite(out, np.concatenate([panels[0], np.full((PICTURE_SIDE, 4, 3), 0, np.uint8), panels[1]], axis=1))


def pose_errors(estimated: np.ndarray, reference: np.ndarray) -> dict:
    """How far camera poses [N, 3, 4] (OpenGL c2w) are from reference ones after the best similarity
    (Umeyama on the camera centres; SfM fixes neither scale, position nor orientation): rotation angle
    errors in degrees and centre errors as a fraction of the reference cameras' extent."""
    src, dst = estimated[:, :, 3], reference[:, :, 3]
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    a, b = src - src_mean, dst - dst_mean
    u, s, vt = np.linalg.svd(b.T @ a / len(a))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(s) @ sign) / (a**2).sum(1).mean())
    aligned = scale * src @ rotation.T + (dst_mean - scale * rotation @ src_mean)
    extent = float(np.linalg.norm(dst.max(0) - dst.min(0)))
    relative = np.einsum("nji,njk->nik", reference[:, :, :3], rotation @ estimated[:, :, :3])
    # |R - I|_F = 2 sqrt(2) sin(angle / 2): unlike arccos of the trace, exact near zero.
    angles = np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(relative - np.eye(3), axis=(1, 2)) / 8**0.5, 0, 1)))
    offsets = np.linalg.norm(aligned - dst, axis=1) / extent
    return {"rotation_deg": {"mean": float(angles.mean()), "max": float(angles.max())},
            "centre_fraction": {"mean": float(offsets.mean()), "max": float(offsets.max())},
            "scale": scale, "cameras": len(src)}
