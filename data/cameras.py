"""Batched cameras: pinhole, OpenCV radial-tangential and OpenCV fisheye, OpenGL-convention poses.

Poses are camera-to-world in the OpenGL/Blender convention (camera x right, y up, looking
down -z), as transforms.json stores them. Intrinsics and distortion follow OpenCV, whose
camera looks down +z with y down, so both `rays` and `project` pass through the OpenCV
camera frame (x, -y, -z of the OpenGL one). Pixel (i, j) has its centre at (i + 0.5, j + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .rays import Rays

NEWTON_STEPS = 10


@dataclass
class Cameras:
    c2w: Tensor  # [N, 3, 4] float32, OpenGL convention
    fx: Tensor  # [N] float32, pixels
    fy: Tensor
    cx: Tensor
    cy: Tensor
    width: Tensor  # [N] int64
    height: Tensor  # [N] int64
    distortion: Tensor  # [N, 6] float32: k1, k2, k3, k4, p1, p2 (zeros = pinhole)
    fisheye: Tensor  # [N] bool: OPENCV_FISHEYE (equidistant, k1..k4) instead of radial-tangential

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx) -> Cameras:
        if isinstance(idx, int):
            idx = [idx]  # keep the camera dimension
        return Cameras(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def downscaled(self, n: float) -> Cameras:
        """The same views with images n times smaller (as the loader's --downscale: x' = x / n; n < 1 enlarges)."""
        return replace(self, fx=self.fx / n, fy=self.fy / n, cx=self.cx / n, cy=self.cy / n,
                       width=(self.width / n).long(), height=(self.height / n).long())

    def transformed(self, to_unit: Tensor) -> Cameras:
        """Apply a similarity x' = s R x + t (4x4) to the poses; camera axes stay unit length."""
        return replace(self, c2w=transform_poses(self.c2w, to_unit))

    def rays(self, cam: Tensor, px: Tensor, py: Tensor) -> Rays:
        """Rays through pixel coordinates px, py [R] of cameras cam [R]; distortion undone."""
        return self.rays_along(cam, self.lens_directions(cam, px, py))

    def lens_directions(self, cam: Tensor, px: Tensor, py: Tensor) -> Tensor:
        """Directions [R, 3] in the OpenCV camera frame (not unit length) through pixel coordinates px, py of
        cameras cam: the lens's distortion undone (Newton's method; pinhole scenes skip it)."""
        xd = (px - self.cx[cam]) / self.fx[cam]
        yd = (py - self.cy[cam]) / self.fy[cam]
        k = self.distortion[cam].unbind(-1)
        x, y = _undistort_radial_tangential(xd, yd, k) if self.distortion.any() else (xd, yd)
        d = torch.stack([x, y, torch.ones_like(x)], -1)
        if self.fisheye.any():
            d = torch.where(self.fisheye[cam, None], _undistort_fisheye(xd, yd, k), d)
        return d

    def rays_along(self, cam: Tensor, directions: Tensor) -> Rays:
        """Rays of cameras cam [R] along OpenCV camera-frame directions [R, 3] (`lens_directions`)."""
        d_gl = directions * directions.new_tensor([1.0, -1.0, -1.0])
        c2w = self.c2w[cam]
        dirs = torch.einsum("rij,rj->ri", c2w[:, :, :3], d_gl)
        return Rays(c2w[:, :, 3].contiguous(), torch.nn.functional.normalize(dirs, dim=-1))

    def image_rays(self, i: int) -> Rays:
        """One ray per pixel of camera i, row-major (H * W rays)."""
        w, h = int(self.width[i]), int(self.height[i])
        device = self.c2w.device
        py, px = torch.meshgrid(
            torch.arange(h, device=device) + 0.5, torch.arange(w, device=device) + 0.5, indexing="ij"
        )
        cam = torch.full((h * w,), i, dtype=torch.long, device=device)
        return self.rays(cam, px.reshape(-1), py.reshape(-1))

    def project(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project world points [P, 3] into every camera: px, py, depth, each [N, P].

        depth is the distance along the camera's viewing axis (-z); negative means behind,
        and then px, py are meaningless.
        """
        c2w = self.c2w
        local = (points[None] - c2w[:, None, :, 3]) @ c2w[:, :, :3]  # R^T (p - t), OpenGL camera frame
        x, y, z = local[..., 0], -local[..., 1], -local[..., 2]  # OpenCV camera frame
        k = [c[:, None] for c in self.distortion.unbind(-1)]
        safe_z = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
        xn, yn = x / safe_z, y / safe_z
        if self.distortion.any():
            xn, yn = _distort_radial_tangential(xn, yn, k)[:2]
        if self.fisheye.any():
            xf, yf = _distort_fisheye(x, y, z, k)
            fisheye = self.fisheye[:, None]
            xn, yn = torch.where(fisheye, xf, xn), torch.where(fisheye, yf, yn)
        return self.fx[:, None] * xn + self.cx[:, None], self.fy[:, None] * yn + self.cy[:, None], z


class PoseCorrection(torch.nn.Module):
    """A learnable SE(3) correction per training camera (nerfstudio's and instant-ngp's pose refinement),
    in each camera's own frame: c2w <- c2w [exp(omega^) | t], zero (the given poses) at the start."""

    def __init__(self, n_cameras: int):
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(n_cameras, 6))  # axis-angle omega, then translation t

    def rotations(self) -> Tensor:
        """[N, 3, 3] exp of each camera's skew-symmetric omega (matrix_exp: smooth at zero, unlike Rodrigues)."""
        return torch.linalg.matrix_exp(skew(self.delta[:, :3]))

    def forward(self, rays: Rays, cam: Tensor, c2w: Tensor) -> Rays:
        """The rays of cameras cam [R] (poses c2w [N, 3, 4]) as the corrected cameras shoot them."""
        rot = c2w[cam, :, :3]
        local = torch.einsum("rji,rj->ri", rot, rays.dirs)  # R^T d: the direction in the camera frame
        local = torch.einsum("rij,rj->ri", self.rotations()[cam], local)
        dirs = torch.einsum("rij,rj->ri", rot, local)
        origins = rays.origins + torch.einsum("rij,rj->ri", rot, self.delta[cam, 3:])
        return Rays(origins, dirs)

    def corrected(self, c2w: Tensor) -> Tensor:
        """[N, 3, 4] the corrected poses."""
        rot = c2w[:, :, :3]
        with torch.no_grad():
            return torch.cat([rot @ self.rotations(), c2w[:, :, 3:] + rot @ self.delta[:, 3:, None]], 2)


class AppearanceCodes(torch.nn.Module):
    """Per-image appearance as an affine colour transform of the field's colour (exposure and white balance,
    the changes between photos of one capture): foreground <- A_i foreground + b_i opacity, identity at the
    start. Held-out views, which have no code of their own, use the mean transform."""

    def __init__(self, n_images: int):
        super().__init__()
        self.transform = torch.nn.Parameter(torch.eye(3, 4).repeat(n_images, 1, 1))  # [N, 3, 4]: A | b

    def forward(self, rgb: Tensor, opacity: Tensor, background: Tensor, cam: Tensor | None = None) -> Tensor:
        """Composited colours [R, 3] (on `background`) as image cam [R] (None: the mean image) would show them."""
        m = self.transform[cam] if cam is not None else self.transform.mean(0).expand(len(rgb), 3, 4)
        clear = (1 - opacity)[:, None] * background
        return torch.einsum("rij,rj->ri", m[:, :, :3], rgb - clear) + m[:, :, 3] * opacity[:, None] + clear


@dataclass
class LensTable:
    """The undistorted direction through every pixel centre, computed once per distinct lens (intrinsics,
    distortion and image size), so that training reads its rays' directions instead of running Newton's
    method on every batch. Cameras sharing a lens (one phone, one setting) share one table."""

    lens_of: Tensor  # [N] int64: each camera's lens
    starts: Tensor  # [L + 1] int64: lens l's pixels are directions[starts[l]:starts[l + 1]], row-major
    directions: Tensor  # [sum of the lenses' H * W, 3] OpenCV camera frame, as Cameras.lens_directions

    @staticmethod
    def of(cameras: Cameras) -> LensTable:
        lenses = torch.stack([cameras.fx, cameras.fy, cameras.cx, cameras.cy, cameras.width, cameras.height,
                              cameras.fisheye, *cameras.distortion.unbind(1)], 1).double()
        unique, lens_of = torch.unique(lenses, dim=0, return_inverse=True)
        first = torch.stack([(lens_of == lens).nonzero()[0, 0] for lens in range(len(unique))])
        directions = []
        for i in first.tolist():
            w, h = int(cameras.width[i]), int(cameras.height[i])
            py, px = torch.meshgrid(torch.arange(h, device=cameras.c2w.device) + 0.5,
                                    torch.arange(w, device=cameras.c2w.device) + 0.5, indexing="ij")
            cam = torch.full((h * w,), i, dtype=torch.long, device=cameras.c2w.device)
            directions.append(cameras.lens_directions(cam, px.reshape(-1), py.reshape(-1)))
        sizes = torch.tensor([0] + [len(d) for d in directions], device=cameras.c2w.device)
        return LensTable(lens_of, sizes.cumsum(0), torch.cat(directions))

    def lookup(self, cam: Tensor, pixel: Tensor) -> Tensor:
        """Directions [R, 3] of cameras cam [R] at row-major pixel indices [R] (pixel centres)."""
        return self.directions[self.starts[self.lens_of[cam]] + pixel]


def transform_poses(c2w: Tensor, similarity: Tensor) -> Tensor:
    """Camera-to-world poses [N, 3, 4] moved by a similarity x' = s R x + t (4x4); camera axes stay unit length."""
    m = similarity.to(c2w.device, torch.float64)
    a, t = m[:3, :3], m[:3, 3]
    poses = c2w.double()
    moved = torch.cat([a / a[:, 0].norm() @ poses[:, :, :3], (poses[:, :, 3] @ a.T + t)[:, :, None]], dim=2)
    return moved.to(c2w.dtype)


def optical_focus(c2w: Tensor) -> Tensor:
    """[3] the point nearest every camera's optical axis (least squares): what a capture looks at."""
    poses = c2w.double()
    axes = -poses[:, :, 2]  # OpenGL cameras look down -z
    off_axis = torch.eye(3, dtype=torch.float64, device=c2w.device) - axes[:, :, None] * axes[:, None, :]
    return torch.linalg.solve(off_axis.sum(0), (off_axis @ poses[:, :, 3:]).sum(0))[:, 0]


def camera_spread(c2w: Tensor) -> float:
    """How far (L-infinity) the farthest camera centre lies from their mean: the length nerfstudio scales a
    capture by so its cameras fill [-1, 1]^3 (auto_scale_poses), the frame in which near-camera gradient scaling
    was tuned."""
    centres = c2w[:, :, 3].double()
    return float((centres - centres.mean(0)).abs().max())


def rotation_about(axes: Tensor, angles: Tensor) -> Tensor:
    """[N, 3, 3] rotations by `angles` [N] (radians) about unit `axes` [N, 3]."""
    return torch.linalg.matrix_exp(skew(axes * angles[:, None]))


def skew(v: Tensor) -> Tensor:
    """[N, 3, 3] the cross-product matrices of v [N, 3] (v^ x = v cross x)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(-1, 3, 3)


def perturb_poses(c2w: Tensor, degrees: float, distance: float, generator: torch.Generator) -> Tensor:
    """[N, 3, 4] poses each turned by exactly `degrees` about a random axis through its centre and moved by
    `distance` in a random direction: the errors of an imperfect structure from motion, for tests and benchmarks."""
    n = len(c2w)
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator, dtype=torch.float64), dim=1)
    shifts = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator, dtype=torch.float64), dim=1)
    turns = rotation_about(axes, torch.full((n,), degrees * torch.pi / 180, dtype=torch.float64))
    poses = c2w.double()
    moved = torch.cat([turns @ poses[:, :, :3], poses[:, :, 3:] + distance * shifts[:, :, None]], 2)
    return moved.to(c2w.dtype)


def rigid_alignment(source: Tensor, target: Tensor, scale: bool = False) -> Tensor:
    """The 4x4 rigid transform (a similarity with `scale`, Umeyama's) that best maps poses `source` [N, 3, 4] onto
    `target` (least squares, Kabsch), fitted to each camera's centre and a point one rig radius ahead of it, so
    that cameras on a line or an arc still fix every rotation. Refined poses are only defined up to such a
    transform (the scene may drift as a whole), so pose errors are measured after it."""
    def points(c2w: Tensor) -> Tensor:
        centres = c2w[:, :, 3].double()
        radius = (centres - centres.mean(0)).norm(dim=1).mean().clamp_min(1e-6)
        return torch.cat([centres, centres - radius * c2w[:, :, 2].double()])  # -z: the OpenGL view direction

    p, q = points(source), points(target)
    p_mean, q_mean = p.mean(0), q.mean(0)
    u, _, vh = torch.linalg.svd((q - q_mean).T @ (p - p_mean))
    flip = torch.diag(torch.tensor([1.0, 1.0, float(torch.linalg.det(u @ vh).sign())], dtype=torch.float64))
    rotation = u @ flip @ vh
    if scale:
        rotation = rotation * (q - q_mean).square().sum() ** 0.5 / (p - p_mean).square().sum() ** 0.5
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3], transform[:3, 3] = rotation, q_mean - rotation @ p_mean
    return transform


def pose_errors(estimated: Tensor, truth: Tensor, rigid: bool = True) -> tuple[Tensor, Tensor]:
    """Per camera: rotation error (degrees) and centre error (scene units) of poses `estimated` [N, 3, 4]
    against `truth`, after the rigid alignment of the one onto the other (`rigid`) or as they are."""
    aligned = transform_poses(estimated.double(), rigid_alignment(estimated, truth)) if rigid else estimated.double()
    relative = aligned[:, :, :3].transpose(1, 2) @ truth[:, :, :3].double()
    return rotation_angle(relative), (aligned[:, :, 3] - truth[:, :, 3].double()).norm(dim=1)


def rotation_angle(rotations: Tensor) -> Tensor:
    """[N] the angles (degrees) of rotations [N, 3, 3], from sine and cosine (arccos alone is coarse near 0)."""
    r = rotations.double()
    sine = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], 1).norm(dim=1) / 2
    return torch.rad2deg(torch.atan2(sine, (r.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2))


def _distort_radial_tangential(x: Tensor, y: Tensor, k) -> tuple[Tensor, ...]:
    """OpenCV radial-tangential model (radial polynomial to r^8, as nerfstudio's k1..k4).

    Returns the distorted coordinates and their Jacobian (dxd/dx, dxd/dy, dyd/dx, dyd/dy).
    """
    k1, k2, k3, k4, p1, p2 = k
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    dradial = k1 + r2 * (2 * k2 + r2 * (3 * k3 + r2 * 4 * k4))  # d radial / d r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    dxdx = radial + 2 * x * x * dradial + 2 * p1 * y + 6 * p2 * x
    dxdy = 2 * x * y * dradial + 2 * p1 * x + 2 * p2 * y  # = dyd/dx: the Jacobian is symmetric
    dydy = radial + 2 * y * y * dradial + 6 * p1 * y + 2 * p2 * x
    return xd, yd, dxdx, dxdy, dxdy, dydy


def _undistort_radial_tangential(xd: Tensor, yd: Tensor, k) -> tuple[Tensor, Tensor]:
    """Invert the radial-tangential model by Newton's method (no closed form exists)."""
    x, y = xd, yd
    for _ in range(NEWTON_STEPS):
        fx, fy, a, b, c, d = _distort_radial_tangential(x, y, k)
        ex, ey = fx - xd, fy - yd
        det = a * d - b * c
        det = torch.where(det.abs() > 1e-12, det, torch.full_like(det, 1e-12))
        x = x - (d * ex - b * ey) / det
        y = y - (a * ey - c * ex) / det
    return x, y


def _distort_fisheye(x: Tensor, y: Tensor, z: Tensor, k) -> tuple[Tensor, Tensor]:
    """OpenCV fisheye: theta_d = theta (1 + k1 theta^2 + ... + k4 theta^8) along the image radius."""
    k1, k2, k3, k4 = k[:4]
    r = torch.hypot(x, y)
    theta = torch.atan2(r, z)  # angle off the optical axis, valid beyond 90 degrees
    t2 = theta * theta
    theta_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    # On the axis theta_d / r -> 1 / z.
    scale = torch.where(r > 1e-12, theta_d / r.clamp_min(1e-12), 1 / z.clamp_min(1e-12))
    return x * scale, y * scale


def _undistort_fisheye(xd: Tensor, yd: Tensor, k) -> Tensor:
    """Unit OpenCV-frame directions for fisheye image coordinates (Newton on theta)."""
    k1, k2, k3, k4 = k[:4]
    theta_d = torch.hypot(xd, yd)
    theta = theta_d
    for _ in range(NEWTON_STEPS):
        t2 = theta * theta
        f = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - theta_d
        df = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
        theta = (theta - f / df).clamp_min(0)
    # sin(theta) / theta_d -> 1 on the axis.
    s = torch.where(theta_d > 1e-12, torch.sin(theta) / theta_d.clamp_min(1e-12), torch.ones_like(theta))
    return torch.stack([xd * s, yd * s, torch.cos(theta)], -1)
