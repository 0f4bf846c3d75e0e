"""Camera paths: an orbit around the training cameras, the viewer's home view, and keyframed paths.

A keyframed path is stored as nerfstudio's `camera_path.json` (its fields: `render_height/width`, `fps`,
`seconds`, `is_cycle`, and `camera_path`, one `camera_to_world` (4x4, row-major, OpenGL axes) with its
vertical `fov` in degrees per frame), so `ns-render camera-path` and `recon render --camera-path` read each
other's files. recon also stores the `keyframes` it interpolated, to edit the path again. Poses are in the
input cameras' frame (the user's world), never the unit frame, so a path outlives a change of normalisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation, RotationSpline
from torch import Tensor

from .cameras import Cameras

ARC_GAP_DEG = 120  # training cameras leaving a wider gap around the target are forward-facing: orbit an arc
RING_UP_MAX_DEG = 30  # the camera ring's normal replaces the mean up vector when this close to it
HOME_PULL_BACK = 1.3  # the home view: this much farther from the target than the cameras' ring...
HOME_LIFT = 0.25  # ...and this fraction of its radius higher


def look_at(position: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """OpenGL camera-to-world [3, 4] at `position` looking at `target`, its image's up towards `up`."""
    back = torch.nn.functional.normalize(position - target, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(up, back), dim=0)
    return torch.stack([right, torch.linalg.cross(back, right), back, position], dim=1)


@dataclass
class Ring:
    """How training cameras stand around what they look at: the `target` (the point closest to every optical
    axis), the `up` axis, their mean `height` above the target and `radius` around the up axis, and the
    `azimuths` (radians, sorted) of the cameras about up, measured from `side` towards `side2`."""

    target: Tensor
    up: Tensor
    height: float
    radius: float
    side: Tensor
    side2: Tensor
    azimuths: Tensor

    @staticmethod
    def of(cameras: Cameras) -> Ring:
        centres = cameras.c2w[:, :, 3].float()
        up = torch.nn.functional.normalize(cameras.c2w[:, :, 1].float().mean(0), dim=0)
        # Cameras on a ring or a part of one: the ring's plane gives the up axis (the mean of the cameras' up
        # vectors tilts towards a partial ring's middle). A planar grid facing the scene does not: keep the mean.
        if len(cameras) > 2:
            normal = torch.linalg.svd(centres - centres.mean(0)).Vh[-1]
            normal = normal * torch.sign(normal @ up)
            if normal @ up > math.cos(math.radians(RING_UP_MAX_DEG)):
                up = normal
        forward = -cameras.c2w[:, :, 2].float()
        projector = torch.eye(3) - forward[:, :, None] * forward[:, None, :]
        target = torch.linalg.lstsq(projector.sum(0), (projector @ centres[:, :, None]).sum(0)).solution[:, 0]
        offsets = centres - target
        heights = offsets @ up
        side = torch.linalg.svd(torch.eye(3) - up[:, None] * up[None]).U[:, 0]
        side2 = torch.linalg.cross(up, side)
        azimuths = torch.atan2(offsets @ side2, offsets @ side)
        return Ring(target, up, float(heights.mean()), float((offsets - heights[:, None] * up).norm(dim=1).mean()),
                    side, side2, azimuths.sort().values)

    def pose(self, azimuth: float, radius: float | None = None, height: float | None = None) -> Tensor:
        """The c2w [3, 4] on the ring (or at the given radius and height) at `azimuth`, looking at the target."""
        radius = self.radius if radius is None else radius
        height = self.height if height is None else height
        position = (self.target + self.up * height
                    + radius * (math.cos(azimuth) * self.side + math.sin(azimuth) * self.side2))
        return look_at(position, self.target, self.up)

    def arc(self) -> tuple[float, float] | None:
        """(start, span) of the arc the cameras cover when they leave a gap wider than ARC_GAP_DEG around the
        target (a forward-facing capture); None when they surround it."""
        gaps = torch.diff(self.azimuths, append=self.azimuths[:1] + 2 * math.pi)
        widest = int(gaps.argmax())
        if gaps[widest] <= math.radians(ARC_GAP_DEG):
            return None
        return float(self.azimuths[(widest + 1) % len(self.azimuths)]), float(2 * math.pi - gaps[widest])


def _like(reference: Cameras, c2w: Tensor) -> Cameras:
    """Pinhole cameras at poses c2w [N, 3, 4] with the intrinsics of the reference's first camera."""
    first = reference[[0] * len(c2w)]
    return Cameras(c2w=c2w, fx=first.fx, fy=first.fy, cx=first.cx, cy=first.cy, width=first.width,
                   height=first.height, distortion=torch.zeros_like(first.distortion),
                   fisheye=torch.zeros_like(first.fisheye))


def orbit_cameras(reference: Cameras, frames: int) -> Cameras:
    """Cameras circling the training cameras' target on their ring (`Ring`), or, when the cameras leave a gap
    wider than ARC_GAP_DEG (a forward-facing capture), sweeping back and forth over the arc they cover
    instead of going behind the scene."""
    ring = Ring.of(reference)
    steps = torch.arange(frames) / frames
    arc = ring.arc()
    if arc is None:
        angles = 2 * math.pi * steps
    else:
        start, span = arc
        angles = start + span * (1 - torch.cos(2 * math.pi * steps)) / 2  # there and back, easing at the ends
    return _like(reference, torch.stack([ring.pose(angle) for angle in angles.tolist()]))


def home_pose(cameras: Cameras) -> Tensor:
    """Where a viewer starts: a little behind and above the training cameras, looking at what they look at.
    Behind their centre's side of the target for a forward-facing capture; behind the first camera when they
    surround the target (their centre is then the target itself)."""
    ring = Ring.of(cameras)
    arc = ring.arc()
    if arc is None:
        offset = cameras.c2w[0, :, 3].float() - ring.target
        azimuth = math.atan2(float(offset @ ring.side2), float(offset @ ring.side))
    else:
        azimuth = arc[0] + arc[1] / 2
    return ring.pose(azimuth, ring.radius * HOME_PULL_BACK, ring.height + HOME_LIFT * ring.radius)


def pinhole_cameras(c2w: Tensor, fov: Tensor, height: int, width: int) -> Cameras:
    """Cameras at poses c2w [N, 3, 4] with vertical fields of view fov [N] (degrees), principal point centred."""
    n = len(c2w)
    focal = height / 2 / torch.tan(torch.deg2rad(fov.float()) / 2)
    full = lambda value, dtype=torch.float32: torch.full((n,), value, dtype=dtype)  # noqa: E731
    return Cameras(c2w=c2w, fx=focal, fy=focal.clone(), cx=full(width / 2), cy=full(height / 2),
                   width=full(width, torch.long), height=full(height, torch.long), distortion=torch.zeros(n, 6),
                   fisheye=torch.zeros(n, dtype=torch.bool))


@dataclass
class Keyframe:
    c2w: Tensor  # [3, 4] OpenGL, world frame
    fov: float  # vertical, degrees
    aspect: float = 1.0  # width / height


@dataclass
class CameraPath:
    """Keyframes spaced evenly in time, interpolated smoothly (a cubic spline through the positions and
    fields of view, a rotation spline through the orientations); `is_cycle` closes the loop."""

    keyframes: list[Keyframe] = field(default_factory=list)
    seconds: float = 4.0
    fps: int = 30
    height: int = 480
    width: int = 640
    is_cycle: bool = False

    @property
    def frame_count(self) -> int:
        return max(1, round(self.seconds * self.fps))

    def poses(self) -> tuple[Tensor, Tensor]:
        """Every frame's c2w [F, 3, 4] and vertical fov [F] (degrees)."""
        if not self.keyframes:
            raise ValueError("a camera path needs at least one keyframe")
        keys = self.keyframes + self.keyframes[:1] if self.is_cycle and len(self.keyframes) > 1 else self.keyframes
        frames = self.frame_count
        if len(keys) == 1:
            c2w = keys[0].c2w[None].expand(frames, 3, 4).clone()
            return c2w, torch.full((frames,), keys[0].fov)
        stops = np.arange(len(keys), dtype=np.float64)
        ends = len(keys) - 1
        times = np.arange(frames) * (ends / frames if self.is_cycle else ends / max(frames - 1, 1))
        matrices = np.stack([k.c2w.double().numpy() for k in keys])
        boundary = "periodic" if self.is_cycle and len(keys) > 2 else "not-a-knot" if len(keys) > 2 else "clamped"
        positions = CubicSpline(stops, matrices[:, :, 3], bc_type=boundary)(times)
        fov = CubicSpline(stops, [k.fov for k in keys], bc_type=boundary)(times)
        rotations = RotationSpline(stops, Rotation.from_matrix(matrices[:, :, :3]))(times).as_matrix()
        c2w = np.concatenate([rotations, positions[:, :, None]], axis=2)
        return torch.from_numpy(c2w).float(), torch.from_numpy(fov).float()

    def cameras(self) -> Cameras:
        """The path's frames as pinhole cameras of `height` x `width` pixels (world frame)."""
        return pinhole_cameras(*self.poses(), self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        c2w, fov = self.poses()
        rows = lambda m: torch.cat([m, torch.tensor([[0.0, 0.0, 0.0, 1.0]])]).flatten().tolist()  # noqa: E731
        return {
            "camera_type": "perspective", "render_height": self.height, "render_width": self.width,
            "fps": self.fps, "seconds": self.seconds, "is_cycle": self.is_cycle, "smoothness_value": 0.5,
            "crop": None, "frame": "input cameras (world), OpenGL axes",
            "camera_path": [{"camera_to_world": rows(m), "fov": float(f), "aspect": self.width / self.height}
                            for m, f in zip(c2w, fov)],
            "keyframes": [{"camera_to_world": rows(k.c2w), "fov": k.fov, "aspect": k.aspect} for k in self.keyframes],
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))


def _pose(entry: Any, where: str) -> Tensor:
    matrix = entry.get("camera_to_world") if isinstance(entry, dict) else None
    try:
        c2w = torch.tensor(matrix, dtype=torch.float32).view(4, 4)[:3]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where}: camera_to_world is not 16 numbers") from None
    if not torch.isfinite(c2w).all():
        raise ValueError(f"{where}: camera_to_world is not finite")
    return c2w


def load_camera_path(path: Path) -> tuple[CameraPath, Cameras]:
    """A camera_path.json (recon's or nerfstudio's): the path (its keyframes, empty when the file has none)
    and the cameras of its frames, as the file lists them. Raises ValueError naming what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("camera_path"), list) or not doc["camera_path"]:
        raise ValueError(f"{path}: no 'camera_path' list of frames (nerfstudio's camera_path.json)")
    if doc.get("camera_type", "perspective") != "perspective":
        raise ValueError(f"{path}: camera_type {doc['camera_type']!r}: only perspective paths render")
    try:
        height, width = int(doc["render_height"]), int(doc["render_width"])
        fps, seconds = int(doc.get("fps", 30)), float(doc.get("seconds", len(doc["camera_path"]) / 30))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: render_height and render_width must be whole numbers") from None
    if height < 1 or width < 1 or fps < 1:
        raise ValueError(f"{path}: render_height, render_width and fps must be positive")

    def fov(entry: Any, where: str) -> float:
        value = entry.get("fov")
        if not isinstance(value, (int, float)) or not 0 < value < 180:
            raise ValueError(f"{where}: fov must be a vertical angle in degrees, in (0, 180)")
        return float(value)

    frames = doc["camera_path"]
    c2w = torch.stack([_pose(f, f"{path}: camera_path[{i}]") for i, f in enumerate(frames)])
    fovs = torch.tensor([fov(f, f"{path}: camera_path[{i}]") for i, f in enumerate(frames)])
    keyframes = [Keyframe(_pose(k, f"{path}: keyframes[{i}]"), fov(k, f"{path}: keyframes[{i}]"),
                          float(k.get("aspect", width / height)))
                 for i, k in enumerate(doc.get("keyframes") or []) if isinstance(k, dict) and "camera_to_world" in k]
    camera_path = CameraPath(keyframes, seconds, fps, height, width, bool(doc.get("is_cycle", False)))
    return camera_path, pinhole_cameras(c2w, fovs, height, width)
