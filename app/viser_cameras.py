"""viser's cameras in recon's convention and back: viser gives T_world_camera as a quaternion (wxyz) and a
position with OpenCV axes (x right, y down, looking down +z) and a vertical fov in radians; recon's poses are
OpenGL camera-to-world matrices (y up, looking down -z)."""

from __future__ import annotations

import math

import numpy as np
import torch
import viser.transforms as vtf

from recon.data.cameras import Cameras

OPENCV_FROM_OPENGL = np.diag([1.0, -1.0, -1.0])


def viser_camera_to_cameras(wxyz: np.ndarray, position: np.ndarray, fov: float, aspect: float, height: int) -> Cameras:
    """viser's camera (OpenCV axes, T_world_camera as a quaternion and position, vertical fov in radians) as
    one pinhole camera of `height` rows in recon's convention (OpenGL axes), principal point centred."""
    rotation = vtf.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix() @ OPENCV_FROM_OPENGL
    c2w = torch.from_numpy(np.concatenate([rotation, np.asarray(position, dtype=np.float64)[:, None]], 1)).float()
    width = max(1, round(height * aspect))
    focal = height / 2 / math.tan(fov / 2)
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return Cameras(c2w=c2w[None], fx=one(focal), fy=one(focal), cx=one(width / 2), cy=one(height / 2),
                   width=torch.tensor([width]), height=torch.tensor([height]), distortion=torch.zeros(1, 6),
                   fisheye=torch.zeros(1, dtype=torch.bool))


def pose_to_viser(c2w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(wxyz, position) of an OpenGL camera-to-world [3, 4] in viser's convention."""
    c2w = c2w.double().cpu().numpy()
    return vtf.SO3.from_matrix(c2w[:, :3] @ OPENCV_FROM_OPENGL).wxyz, c2w[:, 3]


def cameras_to_viser(cameras: Cameras, i: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(wxyz, position, vertical fov, aspect) of camera i in viser's convention."""
    height, width = int(cameras.height[i]), int(cameras.width[i])
    fov = 2 * math.atan(height / 2 / float(cameras.fy[i]))
    return *pose_to_viser(cameras.c2w[i]), fov, width / height
