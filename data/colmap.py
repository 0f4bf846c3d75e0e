"""COLMAP sparse models with their images, read with pycolmap.

Binary or text, the legacy 3-file layout (cameras, images, points3D) and the newer 5-file one
(with rigs and frames): pycolmap reads them all. Every COLMAP camera model with a closed form
that `Cameras` evaluates is accepted; one camera per image is allowed. Images are read as stored,
without applying EXIF orientation, as COLMAP saw them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loaders import (
    LONE,
    Capture,
    Frame,
    FrameList,
    SceneError,
    check_size,
    downscaled_frame,
    parallel_map,
    read_image,
    resolve_downscale,
)

# Where a sparse model may sit in a scene folder (COLMAP's own layout, nerfstudio's, a bare model)
# and where its images are then, tried before the scene folder's images/.
MODEL_FOLDERS = {"sparse/0": "images", "sparse": "images", "colmap/sparse/0": "colmap/images", ".": "images"}
MODEL_FILES = ("cameras", "images", "points3D")
# (f, cx, cy), (fx, fy, cx, cy) and the distortion that follows: which recon slot (k1, k2, k3, k4,
# p1, p2) each extra parameter fills, and whether the model is the equidistant fisheye.
MODELS = {
    "SIMPLE_PINHOLE": (1, (), False),
    "PINHOLE": (2, (), False),
    "SIMPLE_RADIAL": (1, (0,), False),
    "RADIAL": (1, (0, 1), False),
    "OPENCV": (2, (0, 1, 4, 5), False),
    "SIMPLE_RADIAL_FISHEYE": (1, (0,), True),
    "RADIAL_FISHEYE": (1, (0, 1), True),
    "OPENCV_FISHEYE": (2, (0, 1, 2, 3), True),
}
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0])  # camera axes: y down, +z forward -> y up, -z forward
# Parameter counts of COLMAP's camera model ids, for walking cameras.bin.
PARAMS_PER_MODEL = {0: 3, 1: 4, 2: 4, 3: 5, 4: 8, 5: 8, 6: 12, 7: 5, 8: 4, 9: 5, 10: 12, 11: 16}


def find_colmap(folder: Path) -> tuple[Path, Path] | None:
    """(model folder, image folder) of a COLMAP project in `folder`, or None when it holds none."""
    for name, images in MODEL_FOLDERS.items():
        model = folder / name
        if all(_model_file(model, stem) for stem in MODEL_FILES):
            for image_folder in (folder / images, folder / "images"):
                if image_folder.is_dir():
                    return model.resolve(), image_folder.resolve()
            raise SceneError(folder, f"a COLMAP model in {name} but no {images}/ folder of images")
    return None


def read_colmap(model_folder: Path, image_folder: Path, downscale: int, budget: float | None = None) -> Capture:
    views, missing, points = colmap_views(model_folder, image_folder)
    downscale, note = resolve_downscale(downscale, [view.path for view in views], budget)

    def load(view: ColmapView) -> Frame:
        pixels = read_image(view.path)
        check_size(view.path, pixels, view.size, "its COLMAP camera")
        return downscaled_frame(Frame(str(view.path), pixels, view.c2w, view.intrinsics, view.distortion,
                                      view.fisheye), downscale)

    frames = FrameList(model_folder, len(views) + len(missing), parallel_map(load, views), missing)
    files = "binary" if _model_file(model_folder, "images").suffix == ".bin" else "text"
    convention = (f"COLMAP {files} model {model_folder} ({len(points)} sparse points), images in {image_folder}; "
                  f"every 8th registered image (by name) held out for test")
    return Capture(convention, {LONE: frames}, downscale, note, points=points)


@dataclass(frozen=True)
class ColmapView:
    """One registered image of a sparse model: where it is and its camera, pixels not read."""

    path: Path
    c2w: np.ndarray  # [3, 4] OpenGL camera-to-world in the model's frame
    size: tuple[int, int]  # width, height
    intrinsics: tuple[float, float, float, float]
    distortion: tuple[float, ...]  # recon's six slots
    fisheye: bool


def colmap_views(model_folder: Path, image_folder: Path) -> tuple[list[ColmapView], list[str], np.ndarray]:
    """The registered images (by name) found in image_folder, the paths of those not found, and the
    sparse points [N, 3]. Raises SceneError for a model pycolmap cannot read."""
    import pycolmap  # only COLMAP scenes need it

    for stem in MODEL_FILES:  # pycolmap reads zeros past the end of a short file, so check first
        file = _model_file(model_folder, stem)
        if file.suffix == ".bin":
            _check_binary(file)
    try:
        reconstruction = pycolmap.Reconstruction(str(model_folder))
    except Exception as e:  # pycolmap raises whatever its C++ reader threw
        raise SceneError(model_folder, f"unreadable COLMAP model, a file truncated or corrupt? "
                                       f"({type(e).__name__}: {e})") from None
    cameras = {camera_id: _intrinsics(model_folder, camera) for camera_id, camera in reconstruction.cameras.items()}
    views, missing = [], []
    for image_id in sorted(reconstruction.reg_image_ids(), key=lambda i: reconstruction.images[i].name):
        image = reconstruction.images[image_id]
        path = image_folder / image.name
        if path.is_file():
            views.append(ColmapView(path, _camera_to_world(image), *cameras[image.camera_id]))
        else:
            missing.append(str(path))
    points = np.array([p.xyz for p in reconstruction.points3D.values()], dtype=np.float64).reshape(-1, 3)
    return views, missing, points


def _model_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".bin", ".txt"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _check_binary(file: Path) -> None:
    """Walk a cameras/images/points3D.bin record by record: it must end exactly where its last record does."""
    data = file.read_bytes()
    at = 0

    def take(fmt: str) -> tuple:
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise SceneError(file, f"truncated: {len(data)} bytes end inside a record (COLMAP binary model)")
        values = struct.unpack_from(fmt, data, at)
        at += size
        return values

    (count,) = take("<Q")
    for _ in range(count):
        if file.stem == "cameras":
            _, model_id, _, _ = take("<iiQQ")
            if model_id not in PARAMS_PER_MODEL:
                raise SceneError(file, f"corrupt: unknown camera model id {model_id}")
            take(f"<{PARAMS_PER_MODEL[model_id]}d")
        elif file.stem == "images":
            take("<i7di")
            end = data.find(b"\0", at)
            if end < 0:
                take(f"<{len(data) - at + 1}s")  # the name runs off the end
            at = end + 1
            (points,) = take("<Q")
            take(f"<{24 * points}s")
        else:
            take("<Q3d3Bd")
            (track,) = take("<Q")
            take(f"<{8 * track}s")
    if at != len(data):
        raise SceneError(file, f"corrupt: {len(data) - at} bytes after its {count} records (COLMAP binary model)")


def _intrinsics(model_folder: Path, camera) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...], bool]:
    """(width, height), (fx, fy, cx, cy), recon's six distortion slots and the fisheye flag."""
    name = camera.model.name
    if name not in MODELS:
        raise SceneError(_model_file(model_folder, "cameras"),
                         f"camera {camera.camera_id}: COLMAP model {name} is not supported "
                         f"(supported: {', '.join(MODELS)})")
    focals, slots, fisheye = MODELS[name]
    params = [float(v) for v in camera.params]
    fx, fy = (params[0], params[0]) if focals == 1 else (params[0], params[1])
    cx, cy = params[focals], params[focals + 1]
    distortion = [0.0] * 6
    for slot, value in zip(slots, params[focals + 2 :]):
        distortion[slot] = value
    if not np.isfinite(params).all() or fx <= 0 or fy <= 0:
        raise SceneError(_model_file(model_folder, "cameras"), f"camera {camera.camera_id}: bad parameters {params}")
    return (int(camera.width), int(camera.height)), (fx, fy, cx, cy), tuple(distortion), fisheye


def _camera_to_world(image) -> np.ndarray:
    """[3, 4] OpenGL camera-to-world from COLMAP's world-to-camera (OpenCV axes)."""
    pose = image.cam_from_world
    w2c = (pose() if callable(pose) else pose).matrix()  # a method since pycolmap 3.12's rigs
    rotation = w2c[:, :3].T
    centre = -rotation @ w2c[:, 3]
    return np.concatenate([rotation @ OPENCV_TO_OPENGL, centre[:, None]], axis=1)
