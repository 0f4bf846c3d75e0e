"""Independent camera arithmetic shared by the tests (numpy only, nothing from recon)."""

import numpy as np


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """4x4 OpenGL camera-to-world: the camera's +z points back, away from the target."""
    eye = np.asarray(eye, dtype=np.float64)
    back = eye - np.asarray(target)
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, np.cross(back, right), back, eye
    return m
