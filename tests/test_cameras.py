"""Camera conventions, checked against hand-written numpy arithmetic rather than the code under test.

Poses are OpenGL c2w (x right, y up, looking down -z); intrinsics and distortion are OpenCV
(x right, y down, looking down +z); the pixel (i, j) has its centre at (i + 0.5, j + 0.5).
"""

import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from geometry import look_at

from recon.data.cameras import (
    Cameras,
    camera_spread,
    perturb_poses,
    pose_errors,
    rigid_alignment,
    rotation_about,
    transform_poses,
)
from recon.data.scene import load_scene

RADTAN = (0.06, -0.08, 0.0, 0.0, -0.001, 0.0004)  # k1 k2 k3 k4 p1 p2, fox-like
FISHEYE = (0.05, 0.01, -0.004, 0.001, 0.0, 0.0)  # k1..k4


def project_numpy(c2w, point, fx, fy, cx, cy, dist=(0.0,) * 6, fisheye=False):
    """Pixel (u, v) and depth of a world point: OpenGL pose -> OpenCV camera -> distortion -> pixels."""
    gl = c2w[:3, :3].T @ (np.asarray(point) - c2w[:3, 3])
    X, Y, Z = gl[0], -gl[1], -gl[2]  # OpenGL (x right, y up, z back) -> OpenCV (x right, y down, z ahead)
    k1, k2, k3, k4, p1, p2 = dist
    if fisheye:
        r = math.hypot(X, Y)
        th = math.atan2(r, Z)
        thd = th * (1 + k1 * th**2 + k2 * th**4 + k3 * th**6 + k4 * th**8)
        scale = thd / r if r > 0 else 1 / Z  # on the axis: theta / r -> 1 / Z (a numpy build may give r = 0 exactly)
        x, y = scale * X, scale * Y
    else:
        x, y = X / Z, Y / Z
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3 + k4 * r2**4
        x, y = (
            x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y,
        )
    return fx * x + cx, fy * y + cy, Z


def ray_distance(rays, i, point) -> float:
    """Distance from a point to ray i (origin + t dir, t >= 0)."""
    o, d = rays.origins[i].double().numpy(), rays.dirs[i].double().numpy()
    v = np.asarray(point) - o
    assert v @ d > 0, "point is behind the ray"
    return float(np.linalg.norm(v - (v @ d) * d))


def write_frames(folder, poses, size, doc, ext=".png", with_ext=False):
    """Tiny RGBA images and the frames of a transforms document (extensionless paths unless asked)."""
    w, h = size
    (folder / "img").mkdir(parents=True, exist_ok=True)
    frames = []
    for i, pose in enumerate(poses):
        iio.imwrite(folder / "img" / f"v{i}{ext}", np.full((h, w, 4), 200, np.uint8))
        frames.append({"file_path": f"./img/v{i}" + (ext if with_ext else ""), "transform_matrix": pose.tolist()})
    return {**doc, "frames": frames}


POSES = [look_at((4 * math.cos(a), 4 * math.sin(a), 1.5)) for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
# Camera-local OpenGL points for view 0 (ahead is -z), spread towards the image corners.
LOCAL_POINTS = [(0.3, 0.2, -2.0), (-0.9, 0.5, -3.0), (0.0, 0.0, -1.5), (1.0, -0.8, -2.5)]


def world_points(c2w):
    return [c2w[:3, :3] @ np.asarray(p) + c2w[:3, 3] for p in LOCAL_POINTS]


def check_conventions(scene, split, index, c2w, intr, dist=(0.0,) * 6, fisheye=False):
    """Every known point projects to the numpy pixel, and the ray of that pixel passes through it."""
    cams = scene.splits[split].cameras[index]
    m = scene.to_unit.double().numpy()
    scale = np.linalg.norm(m[:3, 0])
    for p in world_points(c2w):
        u, v, z = project_numpy(c2w, p, *intr, dist=dist, fisheye=fisheye)
        p_unit = m[:3, :3] @ p + m[:3, 3]
        px, py, depth = cams.project(torch.tensor(p_unit, dtype=torch.float32)[None])
        assert abs(px.item() - u) < 2e-3 and abs(py.item() - v) < 2e-3
        assert depth.item() == pytest.approx(z * scale, rel=1e-5)
        rays = cams.rays(torch.zeros(1, dtype=torch.long), torch.tensor([u]).float(), torch.tensor([v]).float())
        assert ray_distance(rays, 0, p_unit) < 1e-4


def test_blender_frame_camera_angle_x(tmp_path):
    size, angle = (64, 48), 0.7
    for split, poses in {"train": POSES, "test": POSES[:1]}.items():
        doc = write_frames(tmp_path / split, poses, size, {"camera_angle_x": angle})
        for f in doc["frames"]:
            f["file_path"] = f"./{split}/" + f["file_path"][2:]
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps(doc))
    scene = load_scene(tmp_path)
    f = 0.5 * 64 / math.tan(angle / 2)  # Blender: square pixels, principal point at the centre
    intr = (f, f, 32.0, 24.0)
    # Explicit flip: +x (right) -> larger u, +y (up) -> smaller v.
    u, v, z = project_numpy(POSES[0], world_points(POSES[0])[0], *intr)
    assert (u, v, z) == pytest.approx((32 + f * 0.3 / 2, 24 - f * 0.2 / 2, 2.0))
    check_conventions(scene, "train", 0, POSES[0], intr)
    assert scene.splits["train"].names[0].endswith("train/img/v0.png")


@pytest.mark.parametrize("fisheye", [False, True])
def test_ngp_frame_fl_cx_cy_distortion(tmp_path, fisheye):
    size = (80, 60)
    intr = (70.0, 72.0, 41.5, 29.0)
    dist = FISHEYE if fisheye else RADTAN
    doc = {"fl_x": intr[0], "fl_y": intr[1], "cx": intr[2], "cy": intr[3], "w": 80, "h": 60}
    doc |= dict(zip(("k1", "k2", "k3", "k4", "p1", "p2"), dist))
    if fisheye:  # as nerfstudio writes it; no scale/offset, so the bounds are carved
        doc["camera_model"] = "OPENCV_FISHEYE"
    else:  # instant-ngp bounds: a non-trivial to_unit
        doc |= {"scale": 0.2, "offset": [0.3, 0.5, 0.6], "aabb_scale": 2}
    doc = write_frames(tmp_path, POSES, size, doc, with_ext=True)
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    scene = load_scene(tmp_path / "transforms.json")
    # Frame 0 is held out (i % 8 == 0): it is test view 0.
    check_conventions(scene, "test", 0, POSES[0], intr, dist, fisheye)
    assert bool(scene.splits["test"].cameras.fisheye[0]) == fisheye


def make_cameras(n=2, size=(40, 30), dist=(0.0,) * 6, fisheye=False) -> Cameras:
    c2w = torch.tensor(np.stack([look_at((3.0, 0.5 * i, 1.0))[:3] for i in range(n)]), dtype=torch.float32)
    return Cameras(
        c2w=c2w,
        fx=torch.full((n,), 35.0),
        fy=torch.full((n,), 36.0),
        cx=torch.full((n,), 19.0),
        cy=torch.full((n,), 16.0),
        width=torch.full((n,), size[0]),
        height=torch.full((n,), size[1]),
        distortion=torch.tensor([dist] * n, dtype=torch.float32),
        fisheye=torch.full((n,), fisheye),
    )


def test_image_rays_row_major_pixel_centres():
    cams = make_cameras()
    rays = cams.image_rays(1)
    assert len(rays) == 40 * 30
    j, i = 7, 11  # row 7, column 11
    one = cams.rays(torch.tensor([1]), torch.tensor([i + 0.5]), torch.tensor([j + 0.5]))
    assert torch.allclose(rays.dirs[j * 40 + i], one.dirs[0])
    assert torch.allclose(rays.origins[j * 40 + i], one.origins[0])
    assert torch.allclose(rays.dirs.norm(dim=1), torch.ones(len(rays)))
    # The principal point looks straight down the camera's -z axis.
    centre = cams.rays(torch.tensor([1]), torch.tensor([19.0]), torch.tensor([16.0]))
    assert torch.allclose(centre.dirs[0], -cams.c2w[1, :, 2], atol=1e-6)


@pytest.mark.parametrize("dist, fisheye", [((0.0,) * 6, False), (RADTAN, False), (FISHEYE, True)])
def test_rays_and_project_are_inverse(dist, fisheye):
    cams = make_cameras(dist=dist, fisheye=fisheye)
    g = torch.Generator().manual_seed(0)
    px, py = torch.rand(200, generator=g) * 40, torch.rand(200, generator=g) * 30
    cam = torch.randint(2, (200,), generator=g)
    rays = cams.rays(cam, px, py)
    points = rays.origins + rays.dirs * (1 + 3 * torch.rand(200, 1, generator=g))
    u, v, depth = cams.project(points)
    r = torch.arange(200)
    assert torch.allclose(u[cam, r], px, atol=1e-3) and torch.allclose(v[cam, r], py, atol=1e-3)
    assert (depth[cam, r] > 0).all()


def test_transformed_is_a_similarity():
    cams = make_cameras(dist=RADTAN)
    angle, s, t = 0.4, 0.7, torch.tensor([0.1, -0.2, 0.3])
    rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    m = torch.eye(4)
    m[:3, :3], m[:3, 3] = s * rot, t
    moved = cams.transformed(m)
    points = torch.tensor([[0.2, 0.1, 0.5], [-0.3, 0.4, 0.0]])
    before, after = cams.project(points), moved.project(points @ (s * rot).T + t)
    assert torch.allclose(before[0], after[0], atol=1e-3) and torch.allclose(before[1], after[1], atol=1e-3)
    assert torch.allclose(before[2] * s, after[2], atol=1e-5)
    rot = moved.c2w[:, :, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(2, 3, 3), atol=1e-6)


def test_indexing_and_device():
    cams = make_cameras(n=3)
    assert len(cams) == 3 and len(cams[1]) == 1 and len(cams[-1]) == 1 and len(cams[1:]) == 2
    assert torch.equal(cams[torch.tensor([2, 0])].c2w, cams.c2w[[2, 0]])
    assert cams.to("cpu").fx.device.type == "cpu"


def test_downscaled_pixels_cover_the_same_rays():
    cams = make_cameras()
    half = cams.downscaled(2)
    assert (half.width == cams.width // 2).all() and (half.height == cams.height // 2).all()
    # A pixel of the halved image looks where the centre of its 2x2 block did: x' = x / 2.
    point = torch.tensor([[0.3, -0.2, 0.1]])
    px, py, _ = cams.project(point)
    hx, hy, _ = half.project(point)
    assert torch.allclose(hx, px / 2, atol=1e-5) and torch.allclose(hy, py / 2, atol=1e-5)


def test_the_lens_table_is_the_newton_solve_at_every_pixel_and_training_reads_it():
    """Three cameras, two lenses (two share a radial-tangential lens; a fisheye of another size): one table
    per lens, equal at every pixel centre to the Newton solve it replaces, and a training batch's rays are the
    rays Cameras.rays casts through the same pixels."""
    from dataclasses import replace

    from recon.data.cameras import LensTable
    from recon.data.scene import Split

    shared, fish = make_cameras(2, dist=RADTAN), make_cameras(1, size=(24, 20), dist=FISHEYE, fisheye=True)
    cams = Cameras(**{name: torch.cat([getattr(shared, name), getattr(fish, name)]) for name in (
        "c2w", "fx", "fy", "cx", "cy", "width", "height", "distortion", "fisheye")})
    table = LensTable.of(cams)
    assert table.lens_of[0] == table.lens_of[1] != table.lens_of[2] and len(table.starts) == 3
    assert len(table.directions) == 40 * 30 + 24 * 20
    for i in range(3):
        pixels = torch.arange(int(cams.width[i] * cams.height[i]))
        cam = torch.full_like(pixels, i)
        px, py = (pixels % cams.width[i]).float() + 0.5, (pixels // cams.width[i]).float() + 0.5
        assert torch.equal(table.lookup(cam, pixels), cams.lens_directions(cam, px, py))

    sizes = torch.tensor([0, 1200, 1200, 480])
    split = Split(cams, ["a", "b", "c"], torch.zeros(int(sizes.sum()), 3, dtype=torch.uint8), sizes.cumsum(0))
    batch = split.sample(500, torch.Generator().manual_seed(0))
    index = torch.randint(int(sizes.sum()), (500,), generator=torch.Generator().manual_seed(0))
    cam = torch.searchsorted(split.offsets, index, right=True) - 1
    local = index - split.offsets[cam]
    rays = cams.rays(cam, (local % cams.width[cam]).float() + 0.5, (local // cams.width[cam]).float() + 0.5)
    assert torch.equal(batch.cameras, cam)
    assert torch.allclose(batch.rays.dirs, rays.dirs, atol=1e-6) and torch.equal(batch.rays.origins, rays.origins)
    moved = replace(split, cameras=cams.downscaled(2))  # new intrinsics: a new table
    assert len(moved.lens.directions) == 20 * 15 + 12 * 10


def test_pose_errors_ignore_a_rigid_move_of_the_whole_rig_and_measure_each_cameras_own():
    """Refined poses are defined up to a rigid move of the whole scene: pose_errors aligns first (Kabsch on the
    centres and a point ahead of each camera, so an arc of cameras still fixes the rotation about its line)."""
    g = torch.Generator().manual_seed(0)
    angles = torch.linspace(0, 1.2, 12, dtype=torch.float64)  # an arc, as a walk around an object
    centres = torch.stack([3 * angles.cos(), 3 * angles.sin(), torch.zeros_like(angles)], 1)
    truth = torch.stack([torch.from_numpy(look_at(c.numpy(), np.zeros(3)))[:3] for c in centres])
    noisy = perturb_poses(truth, 2.0, 0.05, g)
    turn, moved = pose_errors(noisy, truth, rigid=False)
    assert torch.allclose(turn, torch.full_like(turn, 2.0), atol=1e-9)
    assert torch.allclose(moved, torch.full_like(moved, 0.05), atol=1e-9)
    move = torch.eye(4, dtype=torch.float64)
    axis, angle = torch.tensor([[0.0, 0.6, 0.8]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    move[:3, :3] = rotation_about(axis, angle)[0]
    move[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    turn, moved = pose_errors(transform_poses(truth, move), truth)
    assert turn.max() < 1e-6 and moved.max() < 1e-9
    assert torch.allclose(rigid_alignment(transform_poses(noisy, move), noisy), torch.linalg.inv(move), atol=1e-9)
    # Independent errors survive the alignment (it cannot explain them away): about their size remains.
    turn, _ = pose_errors(transform_poses(noisy, move), truth)
    assert 1.5 < float(turn.mean()) < 2.5


def test_camera_spread_is_the_farthest_centre_from_the_mean_in_any_axis():
    c2w = torch.eye(4)[:3].repeat(3, 1, 1)
    c2w[:, :, 3] = torch.tensor([[-1.0, 0.0, 5.0], [3.0, 0.5, 5.0], [1.0, -0.5, 5.0]])  # mean (1, 0, 5)
    assert camera_spread(c2w) == pytest.approx(2.0)
    c2w[:, :, 3] += torch.tensor([10.0, -4.0, 2.0])
    assert camera_spread(c2w) == pytest.approx(2.0)
    assert camera_spread(c2w[:1]) == 0.0
