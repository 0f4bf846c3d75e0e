"""Scenes: posed images in the unit frame, the box the field covers, and how that box was chosen.

`load_scene` reads a transforms.json scene (Blender / instant-ngp / nerfstudio), picks one
similarity `to_unit` (world -> unit: x_unit = s x + t) and returns cameras, box and near plane
in the unit frame. Exports invert `to_unit` to go back to the user's world frame.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cameras import Cameras, LensTable
from .checks import FINITE, POSITIVE, Number, checked_field
from .colmap import find_colmap, read_colmap
from .llff import NEAR_FRACTION, read_llff
from .llff import POSES as LLFF_POSES
from .loaders import HOLDOUT, IMAGE_EXTENSIONS, LONE, NGP_KEYS, Capture, Frame, SceneError, read_transforms
from .neus import CAMERAS as NEUS_CAMERAS
from .neus import read_neus
from .rays import Rays

__all__ = ["Batch", "Scene", "SceneError", "Split", "load_scene", "visual_hull"]

NGP_SCALE, NGP_OFFSET = 0.33, 0.5  # instant-ngp's defaults
AABB_SCALE = Number(float, 1, 128)  # instant-ngp's range (its largest cascade); beyond it one step took minutes
# Voxels per axis of each carving pass: a coarse one finds the object in a generous region,
# a finer one re-carves the box it found.
CARVE_RESOLUTIONS = (32, 64)
CARVE_CHUNK = 8  # cameras projected at once (bounds memory to chunk x voxels)
ALPHA_THRESHOLD = 0.1
MARGIN = 0.03  # of the box's extent, added on each side
NEAR = 0.2  # unit-frame near plane for unbounded scenes or a camera inside the box
UNBOUNDED_CONE_ANGLE = 1 / 256
POINT_QUANTILES = (0.02, 0.98)  # of the sparse points, per axis: the unit box (outliers left out)
MIN_POINTS = 20
CAMERA_MARGIN = 1.1  # cameras this far inside the grown box
MAX_AABB_SCALE = 128  # instant-ngp's largest


@dataclass
class Batch:
    """Training rays with what they are compared against."""

    rays: Rays
    colours: Tensor  # [R, C] float32 in [0, 1]
    cameras: Tensor  # [R] int64: the image each ray comes from
    depths: Tensor | None  # [R] float32 unit-frame distance along the ray, 0 = unknown; None: no depth maps


@dataclass
class Split:
    """The views of one split, with every image's pixels flattened into one tensor."""

    cameras: Cameras
    names: list[str]  # image paths as resolved
    pixels: Tensor  # [P, C] uint8, or float16 in [0, 1] for 16-bit images; C = 3 or 4
    offsets: Tensor  # [N + 1] int64: image i is pixels[offsets[i]:offsets[i + 1]]
    usable: Tensor | None = None  # [U] int64: the pixels loss masks keep (None: every pixel)
    depth: Tensor | None = None  # [P] float32 z-depth (unit frame once loaded), 0 = unknown

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[1] == 4

    def __len__(self) -> int:
        return len(self.names)

    def image(self, i: int) -> Tensor:
        """[H, W, C] float32 in [0, 1]."""
        h, w = int(self.cameras.height[i]), int(self.cameras.width[i])
        return _unit_float(self.pixels[self.offsets[i] : self.offsets[i + 1]]).view(h, w, -1)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n rays through pixel centres drawn uniformly over the usable pixels of all images. Draws on the
        generator's device, so a CPU generator serves GPU pixels."""
        pool = self.pixels.shape[0] if self.usable is None else len(self.usable)
        index = torch.randint(pool, (n,), generator=generator, device=generator.device).to(self.pixels.device)
        if self.usable is not None:
            index = self.usable[index]
        cam = torch.searchsorted(self.offsets, index, right=True) - 1
        local = index - self.offsets[cam]
        if self.cameras.distortion.any():  # a lens: its table, not Newton's method per batch
            rays = self.cameras.rays_along(cam, self.lens.lookup(cam, local))
        else:
            width = self.cameras.width[cam]
            rays = self.cameras.rays(cam, (local % width).float() + 0.5, (local // width).float() + 0.5)
        depths = None
        if self.depth is not None:  # z-depth along the viewing axis (-z of the OpenGL camera) -> distance
            cosine = -(rays.dirs * self.cameras.c2w[cam, :, 2]).sum(-1)
            depths = self.depth[index] / cosine.clamp_min(1e-6)
        return Batch(rays, _unit_float(self.pixels[index]), cam, depths)

    @cached_property
    def lens(self) -> LensTable:
        """Every pixel centre's undistorted direction (built on first use; a replaced Split builds its own)."""
        return LensTable.of(self.cameras)

    def to(self, device: torch.device | str) -> Split:
        usable, depth = (None if t is None else t.to(device) for t in (self.usable, self.depth))
        return Split(self.cameras.to(device), self.names, self.pixels.to(device), self.offsets.to(device), usable,
                     depth)


@dataclass
class Scene:
    splits: dict[str, Split]  # "train", "test", and "val" when present
    aabb: Tensor  # [2, 3] float32, unit frame: the box the field covers
    to_unit: Tensor  # [4, 4] float32, world -> unit
    aabb_scale: float  # 1 for bounded scenes
    near: float  # near plane (unit-frame distance) for marching
    cone_angle: float  # 0 bounded, 1/256 unbounded
    source: Path
    summary: dict  # JSON-ready: what was found and what was chosen
    forward_facing: bool = False  # LLFF: the proposal sampler spaces samples evenly in disparity from `near`

    @property
    def box(self) -> Tensor:
        """The field's box (the same as `aabb`; every task's input has one)."""
        return self.aabb

    @property
    def unbounded(self) -> bool:
        return self.aabb_scale > 1

    def describe(self) -> str:
        s = self.summary
        views = ", ".join(f"{n} {split}" for split, n in s["views"].items())
        sizes = ", ".join(f"{size} ({n})" for size, n in s["image_sizes"].items())
        models = ", ".join(f"{model} ({n})" for model, n in s["camera_models"].items())
        total = sum(s["views"].values())
        what = "an object on a transparent background" if self.splits["train"].has_alpha else "photos"
        extent = (f"an unbounded scene: beyond the box (aabb_scale {self.aabb_scale:g}) space is contracted"
                  if self.unbounded else "a bounded scene: the field covers the box below")
        headline = (f"{self.source}: {total} posed images ({views}) of {what}, {sizes}; {extent}; "
                    f"training on the {s['views'].get('train', 0)} train views, scoring the "
                    f"{s['views'].get('test', 0)} test views. Details:")
        lines = [
            headline,
            f"{self.source.name}: {s['convention']}",
            f"views: {views}; cameras: {models}",
            f"images: {sizes}, {s['pixels']}, downscale {s['downscale']}"
            + (f" ({s['downscale_note']})" if s.get("downscale_note") else ""),
        ]
        if s.get("loss_masks") or s.get("depth_maps"):
            lines.append(f"loss masks: {s['loss_masks']} frames; depth maps: {s['depth_maps']} frames")
        for skip in s["skipped"]:
            lines.append(
                f"skipped {len(skip['images'])} of {skip['listed']} frames of {Path(skip['file']).name}: "
                f"image file missing (e.g. {skip['images'][0]})"
            )
        if s["parent_paths"]:
            lines.append(f"resolved {len(s['parent_paths'])} file paths with '..' (e.g. {s['parent_paths'][0]})")
        box = s["bounds"]
        lines.append(f"box: {box['rule']}")
        lines.append(f"  world {_fmt(box['world_box'][0])} .. {_fmt(box['world_box'][1])}")
        lines.append(f"  unit  {_fmt(box['unit_box'][0])} .. {_fmt(box['unit_box'][1])}")
        kind = f"unbounded (aabb_scale {self.aabb_scale:g})" if self.unbounded else "bounded"
        sampler = "proposal density fields" if self.unbounded else "the occupancy grid"
        if self.forward_facing and self.unbounded:
            sampler += (f", spaced evenly in disparity from the near plane ({NEAR_FRACTION:g} x the nearest bound, "
                        "as NeRF's NDC rays)")
        scaling = "; gradients scaled near the cameras (--no-gradient-scaling: off)" if self.unbounded else ""
        lines.append(f"{kind}: near {self.near:g}, cone_angle {self.cone_angle:g}; --sampler auto: {sampler}{scaling}")
        return "\n  ".join(lines)

    def to_json(self) -> dict:
        return {
            "source": str(self.source),
            "summary": self.summary,
            "to_unit": self.to_unit.tolist(),
            "aabb": self.aabb.tolist(),
            "aabb_scale": self.aabb_scale,
            "near": self.near,
            "forward_facing": self.forward_facing,
            "cone_angle": self.cone_angle,
            "splits": {name: split.names for name, split in self.splits.items()},
        }


def world_to_unit_box(world_box: Tensor, to_unit: Tensor) -> Tensor:
    """The unit-frame box [2, 3] around a world-frame box's eight corners."""
    corners = torch.cartesian_prod(*world_box.T.double())
    unit = corners @ to_unit[:3, :3].double().T + to_unit[:3, 3].double()
    return torch.stack([unit.min(0).values, unit.max(0).values]).float()


def load_scene(path: str | Path, downscale: int = 1, budget: float | None = None) -> Scene:
    """Load a scene (a folder or its camera file, in any layout `read_capture` knows) into the unit
    frame; raises SceneError. downscale AUTO (0) picks the smallest factor whose pixels fit `budget` bytes."""
    source = Path(path).expanduser().absolute()
    if downscale < 0:
        raise SceneError(source, f"downscale must be a positive integer (or 0: automatic), not {downscale}")
    capture = read_capture(source, downscale, budget)
    for split, found in capture.lists.items():
        needed = 1 if split in ("val", "test") else 2
        if len(found.frames) < needed:
            raise SceneError(
                found.file, f"only {len(found.frames)} of {found.listed} frames have an image; {needed} needed"
            )

    frames = {split: found.frames for split, found in capture.lists.items()}
    if LONE in frames:
        every = frames.pop(LONE)
        frames = {"train": [f for i, f in enumerate(every) if i % HOLDOUT], "test": every[::HOLDOUT]}
    everything = [f for split_frames in frames.values() for f in split_frames]
    alpha = any(f.image.shape[2] == 4 for f in everything)
    deep = any(f.image.dtype == np.uint16 for f in everything)
    world = {split: _split(split_frames, alpha, deep) for split, split_frames in frames.items()}

    if capture.ngp_doc is not None:
        to_unit, aabb, aabb_scale, rule = _ngp_bounds(Path(capture.ngp_doc["file"]), capture.ngp_doc)
    elif capture.to_unit is not None:
        to_unit, aabb_scale = torch.tensor(capture.to_unit, dtype=torch.float32), 1.0
        aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
        rule = "the layout's normalisation: the unit sphere's cube"
    elif capture.points is not None:
        every_camera = torch.cat([split.cameras.c2w for split in world.values()])
        to_unit, aabb, aabb_scale, rule = points_bounds(capture.points, every_camera, capture.points_what)
    else:
        to_unit, aabb, rule = _carved_bounds(world["train"])
        aabb_scale = 1.0
    scale = float(to_unit[0, :3].norm())
    splits = {name: replace(split, cameras=split.cameras.transformed(to_unit),
                            depth=None if split.depth is None else split.depth * scale)
              for name, split in world.items()}

    positions = torch.cat([split.cameras.c2w[:, :, 3] for split in splits.values()])
    camera_inside = bool(((positions > aabb[0]) & (positions < aabb[1])).all(dim=1).any())
    near = NEAR if aabb_scale > 1 or camera_inside else 0.0
    if capture.near is not None:
        near = capture.near * scale
    cone_angle = UNBOUNDED_CONE_ANGLE if aabb_scale > 1 else 0.0

    summary = {
        "convention": capture.convention,
        "files": {split: str(found.file) for split, found in capture.lists.items()},
        "views": {split: len(split_frames) for split, split_frames in frames.items()},
        "skipped": [
            {"file": str(found.file), "listed": found.listed, "images": found.missing}
            for found in capture.lists.values()
            if found.missing
        ],
        "parent_paths": [p for found in capture.lists.values() for p in found.parent_paths],
        "image_sizes": dict(Counter(f"{f.image.shape[1]}x{f.image.shape[0]}" for f in everything)),
        "downscale": capture.downscale,
        "downscale_note": capture.downscale_note,
        "pixels": ("RGBA" if alpha else "RGB") + (" 16-bit (stored float16)" if deep else " 8-bit"),
        "camera_models": dict(Counter(_model_name(f) for f in everything)),
        "loss_masks": sum(f.loss_mask is not None for f in everything),
        "depth_maps": sum(f.depth is not None for f in everything),
        "bounds": {
            "rule": rule,
            "world_box": _world_box(aabb, to_unit).tolist(),
            "unit_box": aabb.tolist(),
            "camera_inside": camera_inside,
        },
    }
    return Scene(splits, aabb, to_unit, aabb_scale, near, cone_angle, source, summary, capture.near is not None)


def read_capture(source: Path, downscale: int, budget: float | None = None) -> Capture:
    """Read whichever layout `source` (a folder, or the camera file in one) holds."""
    if not source.exists():
        raise SceneError(source, "no such file or folder")
    folder = source if source.is_dir() else source.parent
    if source.name == NEUS_CAMERAS or (source.is_dir() and (folder / NEUS_CAMERAS).is_file()):
        return read_neus(folder / NEUS_CAMERAS, downscale, budget)
    if source.name == LLFF_POSES or (source.is_dir() and (folder / LLFF_POSES).is_file()):
        return read_llff(folder / LLFF_POSES, downscale, budget)
    if source.is_file() or any((folder / name).is_file() for name in ("transforms.json", "transforms_train.json")):
        return read_transforms(source, downscale, budget)
    colmap = find_colmap(folder)
    if colmap is not None:
        return read_colmap(*colmap, downscale, budget)
    if any(p.suffix.lstrip(".") in IMAGE_EXTENSIONS for p in folder.iterdir()):
        raise SceneError(folder, "images without camera poses; find them with `recon process images "
                                 f"{folder} SCENE` (structure from motion), or give transforms.json, a COLMAP "
                                 "model (sparse/0 with images/), NeuS cameras_sphere.npz with image/ or LLFF "
                                 "poses_bounds.npy with images/")
    raise SceneError(folder, "no scene found: expected transforms.json, transforms_train.json, a COLMAP model "
                             "(sparse/0 with images/), NeuS cameras_sphere.npz with image/ or LLFF "
                             "poses_bounds.npy with images/ or images_N/")


def _world_box(aabb: Tensor, to_unit: Tensor) -> Tensor:
    """The world-frame box around the unit box (they differ by a rotation when the layout is reoriented)."""
    corners = torch.cartesian_prod(*aabb.T.double())
    world = (corners - to_unit[:3, 3].double()) @ torch.linalg.inv(to_unit[:3, :3].double()).T
    return torch.stack([world.min(0).values, world.max(0).values]).float()


def points_bounds(points: np.ndarray, c2w: Tensor, what: str = "sparse points") -> tuple[Tensor, Tensor, float, str]:
    """COLMAP's frame has no up and no scale: the cameras' mean up becomes +z, the box around the
    central POINT_QUANTILES of the sparse points becomes the unit box (largest half-extent 1), and
    the box grows by powers of two (instant-ngp's aabb_scale) until every camera is inside it."""
    up = c2w[:, :, 1].double().mean(0)
    rotation = _rotation_onto(F.normalize(up, dim=0), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    if len(points) >= MIN_POINTS:
        rotated = torch.from_numpy(points) @ rotation.T
        q = torch.tensor(POINT_QUANTILES, dtype=torch.float64)
        lo, hi = torch.quantile(rotated, q[0], dim=0), torch.quantile(rotated, q[1], dim=0)
        what = f"the central {POINT_QUANTILES[1] - POINT_QUANTILES[0]:.0%} of {len(points)} {what}"
    else:  # too few points to trust: the cameras' look-at region
        lo, hi = (v.double() @ rotation.T for v in _look_at_region(c2w))
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        what = f"the cameras' look-at region (only {len(points)} {what})"
    centre, scale = (lo + hi) / 2, 2 / (hi - lo).max()
    to_unit = torch.eye(4, dtype=torch.float64)
    to_unit[:3, :3] = scale * rotation
    to_unit[:3, 3] = -scale * centre
    aabb = torch.stack([lo - centre, hi - centre]) * scale
    positions = c2w[:, :, 3].double() @ to_unit[:3, :3].T + to_unit[:3, 3]
    reach = float(positions.abs().max()) * CAMERA_MARGIN
    aabb_scale = float(min(2 ** max(math.ceil(math.log2(max(reach, 1e-9))), 0), MAX_AABB_SCALE))
    if aabb_scale > 1:
        aabb = torch.tensor([[-aabb_scale] * 3, [aabb_scale] * 3], dtype=torch.float64)
    rule = (f"up from the cameras' mean up vector, the unit box from {what}, "
            f"aabb_scale {aabb_scale:g} so every camera is inside")
    return to_unit.float(), aabb.float(), aabb_scale, rule


def _rotation_onto(a: Tensor, b: Tensor) -> Tensor:
    """The smallest rotation taking unit vector a onto unit vector b (Rodrigues)."""
    v, c = torch.linalg.cross(a, b), torch.dot(a, b)
    if c < -1 + 1e-9:  # opposite: half a turn about any axis perpendicular to a
        axis = F.normalize(torch.linalg.cross(a, torch.eye(3, dtype=a.dtype)[int(a.abs().argmin())]), dim=0)
        return 2 * torch.outer(axis, axis) - torch.eye(3, dtype=a.dtype)
    k = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=a.dtype)
    return torch.eye(3, dtype=a.dtype) + k + k @ k / (1 + c)


def _split(frames: list[Frame], alpha: bool, deep: bool) -> Split:
    """Cameras (world frame) and packed pixels; every split of a scene gets the same pixel layout."""
    fx, fy, cx, cy = torch.tensor([f.intrinsics for f in frames], dtype=torch.float32).unbind(1)
    cameras = Cameras(
        c2w=torch.tensor(np.stack([f.c2w for f in frames]), dtype=torch.float32),
        fx=fx,
        fy=fy,
        cx=cx,
        cy=cy,
        width=torch.tensor([f.image.shape[1] for f in frames]),
        height=torch.tensor([f.image.shape[0] for f in frames]),
        distortion=torch.tensor([f.distortion for f in frames], dtype=torch.float32),
        fisheye=torch.tensor([f.fisheye for f in frames]),
    )
    pixels = torch.from_numpy(np.concatenate([_flat_pixels(f.image, alpha, deep) for f in frames]))
    sizes = torch.tensor([0] + [f.image.shape[0] * f.image.shape[1] for f in frames])
    usable = depth = None
    if any(f.loss_mask is not None for f in frames):
        keep = np.concatenate([np.ones(f.image.shape[:2], bool) if f.loss_mask is None else f.loss_mask
                               for f in frames])
        usable = torch.from_numpy(np.flatnonzero(keep))
    if any(f.depth is not None for f in frames):
        depth = torch.from_numpy(np.concatenate([
            (np.zeros(f.image.shape[:2], np.float32) if f.depth is None else f.depth).reshape(-1) for f in frames]))
    return Split(cameras, [f.name for f in frames], pixels, sizes.cumsum(0), usable, depth)


def _flat_pixels(image: np.ndarray, alpha: bool, deep: bool) -> np.ndarray:
    top = np.iinfo(image.dtype).max
    if alpha and image.shape[2] == 3:
        image = np.concatenate([image, np.full_like(image[..., :1], top)], axis=2)  # opaque
    flat = image.reshape(-1, image.shape[2])
    return (flat / np.float32(top)).astype(np.float16) if deep else flat


def _unit_float(pixels: Tensor) -> Tensor:
    return pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()


def _model_name(frame: Frame) -> str:
    if frame.fisheye:
        return "OPENCV_FISHEYE"
    return "OPENCV" if any(frame.distortion) else "pinhole"


def _ngp_bounds(file: Path, doc: dict) -> tuple[Tensor, Tensor, float, str]:
    """instant-ngp's mapping p -> p * scale + offset into [0, 1]^3, whose box is
    0.5 +- aabb_scale / 2, stretched to our unit frame [-1, 1]^3 (x_unit = 2 x_ngp - 1).

    ngp adds the offset in the JSON's own axis order and only then cycles the axes
    (nerf_matrix_to_ngp), so offset[i] shifts world axis i and the cycle does not matter here."""
    try:
        scale = checked_field(POSITIVE, "scale", doc.get("scale", NGP_SCALE))
        aabb_scale = checked_field(AABB_SCALE, "aabb_scale", doc.get("aabb_scale", 1))
        offsets = doc.get("offset", NGP_OFFSET)
        offsets = offsets if isinstance(offsets, list) else [offsets] * 3  # one number: the same on every axis
        if len(offsets) != 3:
            raise ValueError(f"offset {offsets!r}: must be three numbers")
        offset = np.array([checked_field(FINITE, "offset", v) for v in offsets], dtype=np.float64)
    except ValueError as error:
        raise SceneError(file, f"instant-ngp bounds: {error}") from None
    to_unit = torch.eye(4)
    to_unit[:3, :3] *= 2 * scale
    to_unit[:3, 3] = torch.from_numpy(2 * offset - 1)
    aabb = torch.tensor([[-aabb_scale] * 3, [aabb_scale] * 3])
    given = "/".join(key for key in NGP_KEYS if key in doc)
    rule = (
        f"instant-ngp convention ({file.name} sets {given}): "
        f"scale {scale:g}, offset {offset.tolist()}, aabb_scale {aabb_scale:g}"
    )
    return to_unit, aabb, aabb_scale, rule


def _carved_bounds(train: Split) -> tuple[Tensor, Tensor, str]:
    """The box where the training views agree something can be: the intersection of their
    frustums, tightened by the alpha visual hull for RGBA images (as DVGO). Centred on the
    unit frame's origin with its largest half-extent 1."""
    lo, hi = _look_at_region(train.cameras.c2w)
    for resolution in CARVE_RESOLUTIONS:
        lo, hi, seen_by, hull = _carve(train, lo, hi, resolution)
    pad = MARGIN * (hi - lo)
    lo, hi = lo - pad, hi + pad
    centre, scale = (lo + hi) / 2, 2 / (hi - lo).max()
    to_unit = torch.eye(4)
    to_unit[:3, :3] *= scale
    to_unit[:3, 3] = -scale * centre
    aabb = torch.stack([lo - centre, hi - centre]) * scale
    what = "alpha visual hull" if hull else "frustum intersection"
    voxels = " then ".join(f"{r}^3" for r in CARVE_RESOLUTIONS)
    rule = (
        f"no instant-ngp scale/offset/aabb_scale, so the {what} of the training views "
        f"(points seen by {seen_by} of {len(train)}; voxels {voxels}), dilated one voxel plus {MARGIN:.0%} margin"
    )
    return to_unit, aabb, rule


def _look_at_region(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """A generous cube: centred on the point nearest (least squares) to every optical axis of the
    cameras [N, 3, 4], half-size the farthest camera's distance from it."""
    centres = c2w[:, :, 3].double()
    axes = -c2w[:, :, 2].double()  # viewing directions (OpenGL cameras look down -z)
    across = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    target = torch.linalg.lstsq(across.sum(0), (across @ centres[..., None]).sum(0)).solution[:, 0]
    half = (centres - target).norm(dim=1).max()
    return (target - half).float(), (target + half).float()


def _carve(train: Split, lo: Tensor, hi: Tensor, resolution: int) -> tuple[Tensor, Tensor, int, bool]:
    """Bounding box of the voxels of [lo, hi] seen by the most training views (all of them,
    when the frustums intersect) and, with alpha, not seen empty in every view: a voxel is carved
    only when its whole footprint (the ball around it) is transparent, so a part thinner than a
    voxel, lying between voxel centres, keeps its voxel."""
    step = (hi - lo) / resolution
    ticks = [lo[d] + step[d] * (torch.arange(resolution) + 0.5) for d in range(3)]
    grid = torch.stack(torch.meshgrid(*ticks, indexing="ij"), -1).reshape(-1, 3)
    seen, opaque = visual_hull(train, grid, radius=float(step.norm()) / 2)
    keep = seen == seen.max()
    hull = keep & opaque  # = keep without alpha
    use_hull = train.has_alpha and bool(hull.any())  # an all-transparent alpha falls back to frustums
    kept = grid[hull if use_hull else keep]
    margin = 1.5 * step  # from a kept voxel's centre: half a voxel to its face, then one voxel of dilation
    return kept.min(0).values - margin, kept.max(0).values + margin, int(seen.max()), use_hull


def visual_hull(split: Split, points: Tensor, radius: Tensor | float = 0.0,
                max_radius_px: int = 24) -> tuple[Tensor, Tensor]:
    """Which views see points [N, 3] (in the split's frame), and whether all of them see alpha there.

    Returns seen [N] (how many views have the point in front and inside the image) and opaque [N]
    (every such view has alpha > ALPHA_THRESHOLD within `radius` of the point, a distance, [N] or
    scalar; always True without alpha). With radius a cell's half-diagonal, opaque is False only
    where the whole cell is seen as transparent, so thin structures survive: each view's alpha
    is max-pooled over the projected radius. A view in which that radius exceeds max_radius_px
    pixels does not constrain the point.
    """
    radius = torch.as_tensor(radius, dtype=torch.float32).expand(len(points))
    seen = torch.zeros(len(points), dtype=torch.long)
    opaque = torch.ones(len(points), dtype=torch.bool)
    for start in range(0, len(split), CARVE_CHUNK):
        chunk = slice(start, start + CARVE_CHUNK)
        cameras = split.cameras[chunk]
        px, py, depth = cameras.project(points)
        w, h = cameras.width[:, None], cameras.height[:, None]
        inside = (depth > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        seen += inside.sum(0)
        if not split.has_alpha:
            continue
        reach = (radius * torch.maximum(cameras.fx, cameras.fy)[:, None] / depth.clamp(min=1e-6)).ceil()
        constrains = inside & (reach <= max_radius_px)
        ix, iy = torch.where(inside, px, 0).long(), torch.where(inside, py, 0).long()  # pixel 0 when unseen
        for view in range(len(cameras)):
            i = start + view
            alpha = _unit_float(split.pixels[split.offsets[i] : split.offsets[i + 1], 3])
            alpha = alpha.view(1, int(h[view]), int(w[view]))
            kernel = int(reach[view][constrains[view]].max()) if bool(constrains[view].any()) else 0
            if kernel > 0:
                alpha = F.max_pool2d(alpha, 2 * kernel + 1, stride=1, padding=kernel)
            visible = alpha[0, iy[view], ix[view]] > ALPHA_THRESHOLD
            opaque &= ~constrains[view] | visible
    return seen, opaque


def _fmt(values: list[float]) -> str:
    return "[" + " ".join(f"{v:.3g}" for v in values) + "]"
