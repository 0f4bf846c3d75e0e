"""Reading transforms.json scenes (Blender / instant-ngp / nerfstudio): files, frames and images,
and what every scene layout's reader returns (`Capture`).

Everything here is in the user's world frame; `scene.load_scene` picks the bounds and maps
the result to the unit frame.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

from .checks import FINITE, POSITIVE, Number, checked_field

SPLITS = ("train", "val", "test")
LONE = "all"  # key of a lone frame list, before the every-8th holdout splits it
HOLDOUT = 8  # a lone frame list holds out every 8th usable frame for test
NGP_KEYS = ("scale", "offset", "aabb_scale")
AUTO = 0  # downscale: the smallest factor whose pixels fit the memory budget
DEFAULT_PIXEL_BUDGET = 8 * 2**30  # bytes of decoded pixels, when the caller gives no budget
# Tried in order when a file_path has no extension (lego's "./train/r_0").
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "PNG", "JPG", "JPEG", "exr", "webp", "bmp", "tif", "tiff")
CAMERA_MODELS = ("OPENCV", "OPENCV_FISHEYE", "PINHOLE")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIELD_OF_VIEW = Number(float, 0, math.pi, low_open=True, high_open=True)  # radians, camera_angle_x / _y


class SceneError(ValueError):
    """Bad scene input. str(e) is one line: "<file or folder>: <what is wrong>"."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = Path(path)
        self.message = " ".join(str(message).split())  # decoder messages may span lines
        super().__init__(f"{self.path}: {self.message}")


@dataclass
class Frame:
    """One usable view, as read (world frame, intrinsics already downscaled)."""

    name: str  # image path as resolved
    image: np.ndarray  # [H, W, C] uint8 or uint16, C = 3 or 4
    c2w: np.ndarray  # [3, 4] float64, OpenGL convention, orthonormal rotation
    intrinsics: tuple[float, float, float, float]  # fx, fy, cx, cy in pixels
    distortion: tuple[float, ...]  # k1, k2, k3, k4, p1, p2
    fisheye: bool
    loss_mask: np.ndarray | None = None  # [H, W] bool: False = pixel left out of the loss (nerfstudio's mask_path)
    depth: np.ndarray | None = None  # [H, W] float32 z-depth in world units, 0 = unknown (depth_file_path)


@dataclass
class FrameList:
    """The frames of one transforms file, with what was left out and why."""

    file: Path
    listed: int  # frames in the JSON
    frames: list[Frame]
    missing: list[str] = field(default_factory=list)  # image paths not found: frames skipped
    parent_paths: list[str] = field(default_factory=list)  # file_paths with '..', as resolved


@dataclass
class Capture:
    """What a layout reader found, in the user's world frame, and what it knows about the bounds."""

    convention: str  # how the layout was read and split, for the summary
    lists: dict[str, FrameList]  # split (or LONE, held out later) -> frames
    downscale: int  # the factor the images were read at
    downscale_note: str | None  # why, when it was chosen automatically
    ngp_doc: dict | None = None  # a transforms JSON whose instant-ngp keys set the box
    points: np.ndarray | None = None  # [N, 3] sparse points (COLMAP): the box comes from them
    points_what: str = "sparse points"  # what the points are, for the summary
    to_unit: np.ndarray | None = None  # [4, 4] a normalisation the layout gives (NeuS scale_mat)
    near: float | None = None  # a forward-facing capture's near plane (world distance): samples space from it


def read_transforms(path: Path, downscale: int, budget: float | None = None) -> Capture:
    files = find_transforms(path)
    docs = {split: read_json(file) for split, file in files.items()}
    main = "train" if "train" in files else LONE
    convention = (
        f"lone {files[LONE].name}: every {HOLDOUT}th usable frame (i % {HOLDOUT} == 0) held out for test"
        if LONE in files
        else "Blender split files transforms_{train,val,test}.json"
    )
    listed = {split: list_frames(file, docs[split]) for split, file in files.items()}
    downscale, note = resolve_downscale(downscale, [e[2] for _, found in listed.values() for e in found], budget)
    lists = {split: load_frames(result, found, downscale) for split, (result, found) in listed.items()}
    ngp = docs[main] if any(key in docs[main] for key in NGP_KEYS) else None
    return Capture(convention, lists, downscale, note, ngp_doc=ngp and {**ngp, "file": str(files[main])})


def find_transforms(path: Path) -> dict[str, Path]:
    """Split name -> transforms file; a lone transforms.json comes back under LONE."""
    if not path.exists():
        raise SceneError(path, "no such file or folder")
    if path.is_file() and not re.fullmatch(r"transforms_(train|val|test)\.json", path.name):
        return {LONE: path}
    folder = path if path.is_dir() else path.parent
    split_files = {s: folder / f"transforms_{s}.json" for s in SPLITS}
    if split_files["train"].is_file():
        if not split_files["test"].is_file():
            raise SceneError(split_files["test"], "missing (transforms_train.json needs a test split beside it)")
        return {s: f for s, f in split_files.items() if f.is_file()}
    if path.is_dir() and (folder / "transforms.json").is_file():
        return {LONE: folder / "transforms.json"}
    raise SceneError(folder, "no transforms.json or transforms_train.json")


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SceneError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SceneError(path, f"unreadable: {e}") from None
    except RecursionError:
        raise SceneError(path, "JSON nested too deep to be a scene") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list) or not doc["frames"]:
        raise SceneError(path, "no frames")
    return doc


def list_frames(path: Path, doc: dict) -> tuple[FrameList, list[tuple[dict, np.ndarray, Path]]]:
    """Validate every frame of one transforms file: the frame list so far, and (camera dict, pose, image
    path) of each frame whose image exists."""
    top = {k: v for k, v in doc.items() if k != "frames"}
    result = FrameList(path, len(doc["frames"]), [])
    found = []
    for i, frame in enumerate(doc["frames"]):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise SceneError(path, f"frame {i} lacks file_path or transform_matrix")
        file_path = str(frame["file_path"])
        c2w = _pose(path, f"frame {i} ({file_path})", frame["transform_matrix"])
        image_path = _find_image(path.parent, file_path)
        if ".." in Path(file_path).parts:
            result.parent_paths.append(str(image_path))
        if image_path.is_file():
            found.append(({**top, **frame}, c2w, image_path))  # per-frame keys override the top level
        else:
            result.missing.append(str(image_path))
    return result, found


def load_frames(result: FrameList, found: list[tuple[dict, np.ndarray, Path]], downscale: int) -> FrameList:
    """Read the listed frames' images (in parallel), with their masks and depth maps."""
    folder = result.file.parent

    def load(camera: dict, c2w: np.ndarray, image_path: Path) -> Frame:
        image = read_image(image_path)
        intrinsics, distortion, fisheye = _camera(result.file, image_path, camera, image)
        mask = _loss_mask(folder / camera["mask_path"], image) if "mask_path" in camera else None
        depth = None
        if "depth_file_path" in camera:
            try:
                scale = checked_field(POSITIVE, "depth_unit_scale_factor", camera.get("depth_unit_scale_factor", 1e-3))
            except ValueError as error:
                raise SceneError(result.file, f"{image_path.name}: {error}") from None
            depth = _depth(folder / camera["depth_file_path"], image, scale)
        frame = Frame(str(image_path), image, c2w, intrinsics, distortion, fisheye, mask, depth)
        return downscaled_frame(frame, downscale)

    result.frames = parallel_map(lambda entry: load(*entry), found)
    return result


def resolve_downscale(requested: int, images: list[Path], budget: float | None) -> tuple[int, str | None]:
    """`requested`, or for AUTO the smallest factor that fits the images' pixels into `budget` bytes (read
    from the files' headers before any image is decoded), and a note saying why."""
    if requested != AUTO:
        return requested, None
    budget = budget or DEFAULT_PIXEL_BUDGET
    need = 0
    for path in images:
        try:
            props = iio.improps(path)
        except Exception:  # reading it will say what is wrong
            continue
        channels = props.shape[2] if len(props.shape) == 3 else 1
        need += props.shape[0] * props.shape[1] * max(channels, 3) * props.dtype.itemsize
    factor = 1
    while need / factor**2 > budget:
        factor += 1
    if factor == 1:
        return 1, None
    return factor, (f"automatic: {len(images)} images need {need / 2**30:.2f} GiB of pixels, "
                    f"over the {budget / 2**30:.2f} GiB budget")


def parallel_map(fn, items: list) -> list:
    """fn over items on a few threads: image decoding releases the GIL."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def downscaled_frame(frame: Frame, n: int) -> Frame:
    """Images average n x n blocks; a block keeps a loss-mask pixel or a depth only when all of it has one."""
    if n == 1:
        return frame
    if n > min(frame.image.shape[:2]):
        raise SceneError(frame.name, f"--downscale {n} is larger than the image ({frame.image.shape[1]}x"
                                     f"{frame.image.shape[0]})")
    intrinsics = tuple(v / n for v in frame.intrinsics)  # pixel centres: x' = x / n

    def pooled(values: np.ndarray) -> np.ndarray:
        h, w = values.shape[0] // n * n, values.shape[1] // n * n
        return values[:h, :w].reshape(h // n, n, w // n, n).transpose(0, 2, 1, 3).reshape(h // n, w // n, -1)

    mask = None if frame.loss_mask is None else pooled(frame.loss_mask).all(-1)
    depth = None
    if frame.depth is not None:
        blocks = pooled(frame.depth)
        depth = np.where((blocks > 0).all(-1), blocks.mean(-1), 0).astype(np.float32)
    return replace(frame, image=_downscale(frame.image, n), intrinsics=intrinsics, loss_mask=mask, depth=depth)


def check_size(image_path: Path, image: np.ndarray, stated: tuple[int, int], source: str = "its camera") -> None:
    """The image must be the size (width, height) its camera (or mask) says."""
    size = (image.shape[1], image.shape[0])
    if size != stated:
        raise SceneError(image_path, f"image is {size[0]}x{size[1]} but {source} says {stated[0]}x{stated[1]}")


def images_in(folder: Path) -> list[Path]:
    """The images in a folder, sorted by name (none when it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lstrip(".") in IMAGE_EXTENSIONS)


def read_image(path: Path) -> np.ndarray:
    """[H, W, 3 or 4] uint8 or uint16. Greyscale is expanded to RGB (grey + alpha to RGBA)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
        # Pillow truncates 16-bit colour PNGs to 8 bits, so those go through ffmpeg.
        if head[:8] == PNG_SIGNATURE and head[24] == 16:
            image = _read_png16(path, alpha=head[25] in (4, 6))
        else:
            image = iio.imread(path)
    except Exception as e:  # any decoder failure means the same thing: the file is unusable
        raise SceneError(path, f"unreadable image ({type(e).__name__}: {e})") from None
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] > 4:
        raise SceneError(path, f"unsupported image shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise SceneError(path, f"unsupported pixel type {image.dtype} (8- or 16-bit integers expected)")
    if image.shape[2] <= 2:
        image = np.concatenate([image[..., :1].repeat(3, axis=2), image[..., 1:]], axis=2)
    return image


def _loss_mask(path: Path, image: np.ndarray) -> np.ndarray:
    """nerfstudio's mask_path: zero marks a pixel to leave out of the loss."""
    if not path.is_file():
        raise SceneError(path, "mask_path names no file")
    mask = read_image(path)
    check_size(path, mask, (image.shape[1], image.shape[0]), "its image")
    return mask[..., 0] > 0


def _depth(path: Path, image: np.ndarray, scale: float) -> np.ndarray:
    """nerfstudio's depth_file_path: a 16-bit PNG or .npy of z-depths, times depth_unit_scale_factor
    (default 1e-3: millimetres to metres); zero (or not finite) = unknown."""
    if not path.is_file():
        raise SceneError(path, "depth_file_path names no file")
    if path.suffix == ".npy":
        try:
            depth = np.load(path).astype(np.float64)
        except Exception as e:
            raise SceneError(path, f"unreadable depth ({type(e).__name__}: {e})") from None
    else:
        depth = read_image(path)[..., 0].astype(np.float64)
    depth = np.squeeze(depth)
    if depth.ndim != 2:
        raise SceneError(path, f"depth has shape {depth.shape}, not height x width")
    check_size(path, depth, (image.shape[1], image.shape[0]), "its image")
    depth = depth * scale
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)


def _read_png16(path: Path, alpha: bool) -> np.ndarray:
    channels = 4 if alpha else 3
    frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgba64le" if alpha else "rgb48le", bpp=2 * channels)
    try:
        width, height = next(frames)["size"]
        data = next(frames)
    finally:
        frames.close()
    return np.frombuffer(data, "<u2").reshape(height, width, channels).copy()


def _find_image(folder: Path, file_path: str) -> Path:
    """The image a file_path names: '..' resolved, extension guessed when it has none that exists."""
    path = Path(os.path.normpath(folder / file_path.replace("\\", "/")))
    if path.is_file():
        return path
    for ext in IMAGE_EXTENSIONS:
        candidate = path.with_name(f"{path.name}.{ext}")
        if candidate.is_file():
            return candidate
    return path


def _pose(path: Path, where: str, matrix) -> np.ndarray:
    """[3, 4] camera-to-world with the rotation snapped to the nearest orthonormal one."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.shape not in ((4, 4), (3, 4)):
        raise SceneError(path, f"{where}: transform_matrix is not a 4x4 matrix")
    if not np.isfinite(m).all():
        raise SceneError(path, f"{where}: transform_matrix has non-finite values")
    rot = m[:3, :3]
    error = np.abs(rot.T @ rot - np.eye(3)).max()
    if error > 1e-3:
        raise SceneError(path, f"{where}: rotation is not orthonormal (max |R^T R - I| = {error:.3g} > 1e-3)")
    if np.linalg.det(rot) < 0:
        raise SceneError(path, f"{where}: rotation is a reflection (determinant -1)")
    u, _, vt = np.linalg.svd(rot)
    return np.concatenate([u @ vt, m[:3, 3:]], axis=1)


def _camera(path: Path, image_path: Path, camera: dict, image: np.ndarray):
    """Intrinsics (fx, fy, cx, cy), distortion and fisheye flag of one frame at its image's size."""
    try:
        size, intrinsics, distortion, fisheye = _checked_camera(camera, image.shape[1], image.shape[0])
    except ValueError as error:
        raise SceneError(path, f"{image_path.name}: {error}") from None
    check_size(image_path, image, size)
    return intrinsics, distortion, fisheye


def _checked_camera(camera: dict, width: int, height: int):
    """_camera's reading: the size the camera states, intrinsics, distortion and fisheye flag, every field
    through its range (ValueError naming the field)."""

    def number(key: str, spec: Number = FINITE, default: float | None = None) -> float:
        return checked_field(spec, key, camera[key]) if key in camera else default

    size = (round(number("w", POSITIVE, width)), round(number("h", POSITIVE, height)))
    if "fl_x" in camera or "fl_y" in camera:
        fx = number("fl_x", POSITIVE) or number("fl_y", POSITIVE)
        fy = number("fl_y", POSITIVE, fx)
    elif "camera_angle_x" in camera:
        fx = 0.5 * width / math.tan(0.5 * number("camera_angle_x", FIELD_OF_VIEW))
        fy = (0.5 * height / math.tan(0.5 * number("camera_angle_y", FIELD_OF_VIEW))
              if "camera_angle_y" in camera else fx)
    else:
        raise ValueError("no focal length (fl_x or camera_angle_x)")
    intrinsics = (fx, fy, number("cx", default=width / 2), number("cy", default=height / 2))
    model = camera.get("camera_model", "OPENCV")
    if model not in CAMERA_MODELS:
        raise ValueError(f"unsupported camera_model {model!r} (expected one of {', '.join(CAMERA_MODELS)})")
    distortion = tuple(number(k, default=0.0) for k in DISTORTION_KEYS)
    return size, intrinsics, distortion, model == "OPENCV_FISHEYE" or bool(camera.get("is_fisheye", False))


def _downscale(image: np.ndarray, n: int) -> np.ndarray:
    """Average n x n blocks; the last rows/columns that do not fill a block are cropped, which
    keeps pixel centres exact under x' = x / n."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()
    if x.shape[0] == 4:
        x[:3] *= x[3:]  # average colour weighted by alpha: transparent pixels must not darken edges
    x = torch.nn.functional.avg_pool2d(x, n)
    if x.shape[0] == 4:
        x[:3] /= x[3:].clamp_min(1e-12)
    return x.round().permute(1, 2, 0).numpy().astype(image.dtype)
