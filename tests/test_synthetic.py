"""The example scene generator, checked against hand-written camera maths and analytic geometry."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from recon.data.synthetic import camera_positions, make_scene, render_view, scene_albedo, scene_sdf

RES = 64
N_TRAIN, N_TEST = 8, 3


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scene(tmp_path_factory.mktemp("scene"), resolution=RES, n_train=N_TRAIN, n_test=N_TEST, seed=3)


def load_split(scene: Path, split: str) -> tuple[dict, list[np.ndarray]]:
    meta = json.loads((scene / f"transforms_{split}.json").read_text())
    images = [iio.imread(scene / f"{frame['file_path']}.png") for frame in meta["frames"]]
    return meta, images


def info(scene: Path) -> dict:
    return json.loads((scene / "scene_info.json").read_text())


def shape(scene: Path, kind: str) -> dict:
    return next(s for s in info(scene)["shapes"] if s["type"] == kind)


def pixel_ray(c2w: np.ndarray, u: int, v: int, focal: float) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole ray through the centre of pixel (u, v): OpenGL camera, image centre at RES / 2."""
    d_cam = np.array([(u + 0.5 - RES / 2) / focal, -(v + 0.5 - RES / 2) / focal, -1.0])
    d = c2w[:3, :3] @ d_cam
    return c2w[:3, 3], d / np.linalg.norm(d)


def project(c2w: np.ndarray, point: np.ndarray, focal: float) -> tuple[int, int]:
    """Pixel (u, v) containing the image of a world point."""
    x, y, z = c2w[:3, :3].T @ (point - c2w[:3, 3])
    return int(np.floor(focal * x / -z + RES / 2)), int(np.floor(-focal * y / -z + RES / 2))


def baked(scene: Path, point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    light = info(scene)["light"]
    diffuse = max(float(normal @ np.asarray(light["direction"])), 0.0)
    return scene_albedo(point[None])[0] * (light["ambient"] + (1 - light["ambient"]) * diffuse)


def test_layout(scene: Path) -> None:
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        meta, images = load_split(scene, split)
        assert meta["camera_angle_x"] == pytest.approx(0.6911, abs=1e-3)
        assert [f["file_path"] for f in meta["frames"]] == [f"./{split}/r_{i}" for i in range(count)]
        for frame, image in zip(meta["frames"], images):
            c2w = np.asarray(frame["transform_matrix"])
            assert c2w.shape == (4, 4) and np.allclose(c2w[3], [0, 0, 0, 1])
            assert np.allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3)) and np.linalg.det(c2w[:3, :3]) > 0
            eye = c2w[:3, 3]
            assert np.linalg.norm(eye) == pytest.approx(3.0)
            assert np.allclose(c2w[:3, 2], eye / 3.0)  # +z (back) points away from the origin
            assert c2w[2, 1] > 0  # image up leans towards world +z
            assert -10.01 <= np.degrees(np.arcsin(eye[2] / 3.0)) <= 80.01
            assert image.shape == (RES, RES, 4) and image.dtype == np.uint8
            alpha = image[..., 3]
            assert alpha.min() == 0 and alpha.max() == 255
            assert ((alpha > 0) & (alpha < 255)).any()  # anti-aliased silhouette
            border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
            assert not border.any()  # the object stays in frame
    assert {p.name for p in scene.iterdir()} >= {"mesh.ply", "scene_info.json"}


def test_colours_are_varied_and_not_blown_out(scene: Path) -> None:
    _, images = load_split(scene, "train")
    rgb = np.concatenate([image[image[..., 3] == 255, :3] for image in images]) / 255
    assert rgb.max() < 0.97 and rgb.min() < 0.1
    assert (rgb.std(axis=0) > 0.15).all()
    assert np.abs(rgb[:, 0] - rgb[:, 2]).mean() > 0.2  # colourful, not grey


def test_cameras_seeded() -> None:
    train, test = camera_positions(20, 5, 3.0, seed=1)
    again, _ = camera_positions(20, 5, 3.0, seed=1)
    other, _ = camera_positions(20, 5, 3.0, seed=2)
    assert np.array_equal(train, again) and not np.allclose(train, other)
    assert np.linalg.norm(train[:, None] - test[None], axis=-1).min() > 1e-3


def checker_centres(sphere: dict) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 3] and normals at the centres of the ball's checker cells in an upper band."""
    n_lon, n_lat = sphere["cells"]
    lat = np.radians(-90 + (n_lat * 3 // 4 + 0.5) * 180 / n_lat)
    lon = np.radians(-180 + (np.arange(n_lon) + 0.5) * 360 / n_lon)
    normals = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.full_like(lon, np.sin(lat))], 1)
    return np.asarray(sphere["center"]) + sphere["radius"] * normals, normals


def test_known_sphere_points_in_written_views(scene: Path) -> None:
    """Project checker-cell centres on the ball with a hand pinhole; the PNGs show their baked colour."""
    sphere = shape(scene, "Sphere")
    center, radius = np.asarray(sphere["center"]), sphere["radius"]
    points, normals = checker_centres(sphere)
    meta, images = load_split(scene, "train")
    focal = 0.5 * RES / np.tan(0.5 * meta["camera_angle_x"])
    checked = 0
    for frame, image in zip(meta["frames"], images):
        c2w = np.asarray(frame["transform_matrix"])
        eye = c2w[:3, 3]
        for point, normal in zip(points, normals):
            # Seen well inside the ball's outline, from above it: nothing else can occlude it.
            to_eye = (eye - point) / np.linalg.norm(eye - point)
            if to_eye @ normal < 0.5 or eye[2] <= point[2]:
                continue
            u, v = project(c2w, point, focal)
            origin, d = pixel_ray(c2w, u, v, focal)
            oc = origin - center
            t = -oc @ d - np.sqrt((oc @ d) ** 2 - (oc @ oc - radius**2))  # near ray-sphere intersection
            hit = origin + t * d
            assert np.linalg.norm(hit - point) < 0.05
            pixel = image[v, u] / 255
            assert pixel[3] == 1.0
            np.testing.assert_allclose(pixel[:3], baked(scene, hit, (hit - center) / radius), atol=0.01)
            checked += 1
    assert checked >= 10


def test_missing_ray_is_transparent(scene: Path) -> None:
    lo, hi = (np.asarray(b) for b in info(scene)["bounds"])
    bounding_radius = np.linalg.norm(np.maximum(np.abs(lo), np.abs(hi)))
    meta, images = load_split(scene, "test")
    focal = 0.5 * RES / np.tan(0.5 * meta["camera_angle_x"])
    for frame, image in zip(meta["frames"], images):
        origin, d = pixel_ray(np.asarray(frame["transform_matrix"]), 0, 0, focal)
        assert np.linalg.norm(origin - (origin @ d) * d) > bounding_radius  # passes wide of the object
        assert image[0, 0, 3] == 0


def test_render_view_from_straight_above(scene: Path) -> None:
    """An identity-rotation camera looks straight down -z: its centre pixel sees the point below it."""
    points, normals = checker_centres(shape(scene, "Sphere"))
    c2w = np.eye(4)
    c2w[:3, 3] = [points[0, 0], points[0, 1], 3.0]
    image = render_view(c2w, 33, 33, focal=40.0, supersample=1)
    np.testing.assert_allclose(image[16, 16], [*baked(scene, points[0], normals[0]), 1.0], atol=2e-3)
    assert image[0, 0, 3] == 0.0


def test_supersampling_averages_subpixels() -> None:
    c2w = np.eye(4)
    c2w[:3, 3] = [0.0, 0.0, 3.0]
    coarse = render_view(c2w, 24, 24, focal=30.0, supersample=2)
    fine = render_view(c2w, 48, 48, focal=60.0, supersample=1)
    blocks = lambda x: x.reshape(24, 2, 24, 2, -1).mean(axis=(1, 3))  # noqa: E731
    np.testing.assert_allclose(coarse[..., 3:], blocks(fine[..., 3:]), atol=1e-12)
    np.testing.assert_allclose(coarse[..., :3] * coarse[..., 3:], blocks(fine[..., :3] * fine[..., 3:]), atol=1e-9)
    alpha = coarse[..., 3]
    assert ((alpha > 0) & (alpha < 1)).any()


def test_sdf_and_albedo(scene: Path) -> None:
    sphere = shape(scene, "Sphere")
    center, radius = np.asarray(sphere["center"]), sphere["radius"]
    above = center + [0.0, 0.0, 10.0]
    np.testing.assert_allclose(scene_sdf(np.stack([center, above])), [-radius, 10.0 - radius])
    albedo = scene_albedo(np.random.default_rng(0).uniform(-1, 1, (2000, 3)))
    assert albedo.shape == (2000, 3) and albedo.min() >= 0 and albedo.max() <= 1
    assert (albedo.std(axis=0) > 0.2).all()


def test_mesh(scene: Path) -> None:
    mesh = trimesh.load(scene / "mesh.ply")
    cell = info(scene)["mesh"]["cell_size"]
    error = np.abs(scene_sdf(mesh.vertices))
    assert error.max() < cell  # worst at the ball-block crease, which marching cubes cuts
    assert np.percentile(error, 99) < 0.05 * cell
    assert mesh.volume > 0 and mesh.is_winding_consistent
    # Outward: face normals follow the SDF gradient.
    centers = mesh.triangles_center
    grad = np.stack([scene_sdf(centers + e) - scene_sdf(centers - e) for e in 1e-4 * np.eye(3)], axis=1)
    grad /= np.linalg.norm(grad, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", grad, mesh.face_normals).mean() > 0.95

    lo, hi = (np.asarray(b) for b in info(scene)["bounds"])
    assert np.abs(mesh.bounds - [lo, hi]).max() < cell

    # Two solids: ball fused with block (sphere-like), and the ring (genus 1), each closed.
    parts = sorted(mesh.split(only_watertight=False), key=lambda m: m.volume)
    assert [part.is_watertight for part in parts] == [True, True]
    assert [part.euler_number for part in parts] == [0, 2]
    torus = shape(scene, "Torus")
    torus_volume = 2 * np.pi**2 * torus["major_radius"] * torus["minor_radius"] ** 2
    assert parts[0].volume == pytest.approx(torus_volume, rel=0.02)

    colors = mesh.visual.vertex_colors[:, :3] / 255
    np.testing.assert_allclose(colors, scene_albedo(mesh.vertices), atol=1 / 255)
