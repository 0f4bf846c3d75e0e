"""Mesh extraction against analytic fields, mesh metrics, and every export of pipelines over analytic fields."""

import importlib
import math

import numpy as np
import pytest
import torch
import trimesh
from geometry import look_at

from recon.app.export import extract_mesh, point_cloud, signed_distance_volume, simplify
from recon.app.metrics import mesh_distances
from recon.app.pipeline import Pipeline, Tracer
from recon.data.cameras import Cameras
from recon.fields import Field
from recon.renderers.mesh import extract_isosurface, remove_small_components

BOX = torch.tensor([[-1.0, -1.0, -0.8], [1.0, 1.0, 0.8]])  # not a cube: voxels stay cubic
RADIUS = 0.55


def ball_opacity(x):
    """A density ball seen as opacity over a voxel: 1 inside, 0 outside, a linear ramp across the surface."""
    return (0.5 + (RADIUS - x.norm(dim=-1)) / 0.1).clamp(0, 1)


def sphere_sdf(x):
    return x.norm(dim=-1) - RADIUS


@pytest.mark.parametrize("kind", ["opacity", "sdf"])
def test_isosurface_of_analytic_fields(kind):
    inside_fn, level = (ball_opacity, 0.5) if kind == "opacity" else (lambda x: -sphere_sdf(x), 0.0)
    vertices, faces = extract_isosurface(inside_fn, BOX, resolution=64, level=level)
    voxel = 2.0 / 64
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert np.abs(np.linalg.norm(vertices, axis=1) - RADIUS).max() < 0.1 * voxel
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS**3, rel=0.01)  # positive: faces wind outward


@pytest.mark.parametrize("kind", ["opacity", "sdf"])
def test_a_surface_the_box_cuts_is_capped_on_its_faces(kind):
    radius = 0.9  # the box's z faces (at +-0.8) cut caps 0.1 high off the ball
    inside_fn, level = ((lambda x: (0.5 + (radius - x.norm(dim=-1)) / 0.1).clamp(0, 1)), 0.5) if kind == "opacity" \
        else ((lambda x: radius - x.norm(dim=-1)), 0.0)
    vertices, faces = extract_isosurface(inside_fn, BOX, resolution=64, level=level, closed=True)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    cap = math.pi * 0.1**2 * (3 * radius - 0.1) / 3
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3 - 2 * cap, rel=0.01)
    voxel = 2.0 / 64
    assert np.abs(vertices[:, 2]).max() < 0.8 + 1e-3 * voxel  # the caps lie within a voxel inside the faces
    on_cap = np.abs(vertices[:, 2]) > 0.8 - voxel
    assert np.linalg.norm(vertices[on_cap, :2], axis=1).max() < math.sqrt(radius**2 - (0.8 - voxel) ** 2) + voxel
    opened = extract_isosurface(inside_fn, BOX, resolution=64, level=level)
    assert not trimesh.Trimesh(*opened, process=False).is_watertight


def test_coarse_to_fine_equals_dense_evaluation():
    calls = []
    counting = lambda x: (calls.append(len(x)), ball_opacity(x))[1]
    coarse = extract_isosurface(counting, BOX, resolution=64, level=0.5, coarse_step=4)
    evaluated = sum(calls)
    dense = extract_isosurface(ball_opacity, BOX, resolution=64, level=0.5, coarse_step=1)
    assert np.array_equal(coarse[1], dense[1]) and np.allclose(coarse[0], dense[0])
    assert evaluated < 0.5 * 65 * 65 * 53  # the refinement skipped most of the lattice


def test_small_pieces_are_removed():
    big = trimesh.creation.icosphere(3, radius=1.0)
    small = trimesh.creation.icosphere(2, radius=0.1)
    small.apply_translation([3, 0, 0])
    both = trimesh.util.concatenate([big, small])
    vertices, faces = remove_small_components(np.asarray(both.vertices), np.asarray(both.faces), 0.02)
    assert len(faces) == len(big.faces) and np.abs(np.linalg.norm(vertices, axis=1) - 1).max() < 1e-6


def test_mesh_distances(tmp_path):
    sphere = trimesh.creation.icosphere(4, radius=1.0)
    sphere.export(tmp_path / "a.ply")
    shifted = sphere.copy()
    shifted.apply_translation([0.05, 0, 0])
    shifted.export(tmp_path / "b.ply")
    same = mesh_distances(tmp_path / "a.ply", tmp_path / "a.ply", samples=20000)
    assert same["chamfer"] < 0.01 and same["fscore"] > 0.99
    moved = mesh_distances(tmp_path / "b.ply", tmp_path / "a.ply", samples=100000, tau_fraction=0.01)
    # A sphere shifted by s is |s cos(theta)| away on average, s / 2, plus the sampling's own spacing.
    assert 0.025 < moved["chamfer"] < 0.03
    assert moved["tau"] == pytest.approx(0.01 * math.sqrt(12), rel=0.01)


# ---- exports of whole pipelines over analytic fields, in a scaled and shifted world frame ----------------

HALF = 0.5  # the coloured box's half-size (unit frame)
VOXEL = 2.0 / 48  # the export voxel at --resolution 48 over the [-1, 1]^3 box
SCALE, SHIFT = 0.5, torch.tensor([0.1, -0.2, 0.3])  # world -> unit: x_unit = SCALE x_world + SHIFT


def to_unit_matrix() -> torch.Tensor:
    m = torch.eye(4)
    m[:3, :3] *= SCALE
    m[:3, 3] = SHIFT
    return m


def world_to_unit(points: np.ndarray) -> torch.Tensor:
    return SCALE * torch.as_tensor(points, dtype=torch.float32) + SHIFT


def box_sdf(x: torch.Tensor) -> torch.Tensor:
    q = x.abs() - HALF
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def position_color(x: torch.Tensor) -> torch.Tensor:
    return (0.5 + 0.7 * x).clamp(0, 1)


class ColouredBox(Field):
    """A box whose opacity over one export voxel ramps linearly across its surface; colour by position."""

    name, outputs = "test-box", frozenset({"density", "rgb"})

    def density(self, x):
        opacity = (0.5 - box_sdf(x) / (2 * VOXEL)).clamp(0, 0.999)
        return -torch.log1p(-opacity) / VOXEL

    def forward(self, x, d):
        return {"density": self.density(x), "rgb": position_color(x)}


class SphereSDF(Field):
    name, outputs = "test-sphere", frozenset({"sdf", "rgb"})

    def sdf(self, x):
        return sphere_sdf(x)

    def forward(self, x, d):
        return {"sdf": self.sdf(x), "rgb": position_color(x)}


def analytic_pipeline(field_type) -> Pipeline:
    box = [[-1.0] * 3, [1.0] * 3]
    step = float(np.sqrt(12)) / 256
    grid = {"aabb": box, "resolution": 16, "levels": 1, "step_size": step}
    return Pipeline(field_type(torch.tensor(box)), grid, Tracer(torch.tensor(box), step, 0.0, 0.0))


def ring_cameras(n: int = 16, side: int = 48, distance: float = 3.0) -> Cameras:
    """Unit-frame cameras on a sphere around the origin (Fibonacci spiral, both poles' sides)."""
    i = np.arange(n) + 0.5
    z, azimuth = 1 - 2 * i / n, i * np.pi * (3 - np.sqrt(5))
    eyes = distance * np.stack([np.sqrt(1 - z**2) * np.cos(azimuth), np.sqrt(1 - z**2) * np.sin(azimuth), z], -1)
    c2w = torch.tensor(np.stack([look_at(e, up=(0, 0, 1) if abs(e[2]) < 2.9 else (0, 1, 0))[:3] for e in eyes]),
                       dtype=torch.float32)
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)
    return Cameras(c2w, full(60.0), full(60.0), full(side / 2), full(side / 2), full(side, torch.long),
                   full(side, torch.long), torch.zeros(n, 6), torch.zeros(n, dtype=torch.bool))


def test_radiance_mesh_lands_in_the_world_frame_with_the_fields_colours():
    mesh, info = extract_mesh(analytic_pipeline(ColouredBox), ring_cameras(), to_unit_matrix(), resolution=48)
    unit = world_to_unit(mesh.vertices)
    off_surface = box_sdf(unit).abs() / VOXEL
    assert off_surface.median() < 0.1 and off_surface.max() < 1.0  # only the box's edges are cut by a voxel
    solid = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert solid.is_watertight and solid.volume == pytest.approx((2 * HALF / SCALE) ** 3, rel=0.05)
    color_error = np.abs(mesh.colors / 255 - position_color(unit).numpy())
    assert np.median(color_error) < 0.02 and np.percentile(color_error, 95) < 0.06
    assert np.allclose(np.array(info["world_from_unit"]) @ to_unit_matrix().double().numpy(), np.eye(4))


def test_sdf_field_mesh_and_volume(tmp_path):
    pipeline = analytic_pipeline(SphereSDF)
    mesh, info = extract_mesh(pipeline, ring_cameras(), to_unit_matrix(), resolution=48)
    unit = world_to_unit(mesh.vertices)
    assert (sphere_sdf(unit).abs() / VOXEL).max() < 0.1 and info["level"] == 0.0
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).volume > 0
    assert np.abs(mesh.colors / 255 - position_color(unit).numpy()).max() < 0.01  # the colour head, at the surface

    np.savez_compressed(tmp_path / "sdf.npz", **signed_distance_volume(pipeline, ring_cameras(), to_unit_matrix(), 32))
    volume = np.load(tmp_path / "sdf.npz")
    ijk = np.stack(np.meshgrid(*map(np.arange, volume["sdf"].shape), indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[ijk, np.ones(len(ijk))] @ volume["world_from_grid"].T
    expected = sphere_sdf(world_to_unit(world[:, :3])).numpy() / SCALE  # distances in world units
    assert np.allclose(volume["sdf"].reshape(-1), expected, atol=1e-5)
    assert "negative inside" in str(volume["meaning"])


def test_point_cloud_lies_on_the_surface_with_colours_and_normals():
    cloud, info = point_cloud(analytic_pipeline(ColouredBox), ring_cameras(), to_unit_matrix())
    unit = world_to_unit(cloud.vertices)
    assert info["points"] > 1000 and (box_sdf(unit).abs() < VOXEL).float().mean() > 0.98
    assert np.median(np.abs(cloud.colors / 255 - position_color(unit).numpy())) < 0.02
    on_face = (unit.abs() < HALF - 2 * VOXEL).sum(-1) == 2  # away from the edges, the normal is the face's
    face_normal = torch.nn.functional.one_hot(unit.abs().argmax(-1), 3) * unit.sign()
    assert (torch.from_numpy(cloud.normals).float()[on_face] * face_normal[on_face]).sum(-1).min() > 0.95


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except (ImportError, OSError):  # open3d installed without its system library
        return False


@pytest.mark.skipif(not importable("open3d"), reason="open3d is optional (recon[mesh])")
def test_tsdf_mesh_and_radiance_sdf_volume():
    pipeline = analytic_pipeline(ColouredBox)
    mesh, _ = extract_mesh(pipeline, ring_cameras(side=96), to_unit_matrix(), resolution=48, method="tsdf")
    unit = world_to_unit(mesh.vertices)
    assert (box_sdf(unit).abs() / VOXEL).median() < 0.5
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).volume > 0

    volume = signed_distance_volume(pipeline, ring_cameras(), to_unit_matrix(), 48)
    ijk = np.stack(np.meshgrid(*map(np.arange, volume["sdf"].shape), indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[ijk, np.ones(len(ijk))] @ volume["world_from_grid"].T
    expected = box_sdf(world_to_unit(world[:, :3])).numpy() / SCALE
    near = np.abs(expected) < 0.3 / SCALE
    error = np.abs(volume["sdf"].reshape(-1) - expected)[near] / (VOXEL / SCALE)
    assert np.median(error) < 0.1 and error.max() < 1.5  # the mesh cuts the box's edges and corners
    assert np.array_equal(np.sign(volume["sdf"].reshape(-1))[np.abs(expected) > VOXEL / SCALE],
                          np.sign(expected)[np.abs(expected) > VOXEL / SCALE])


@pytest.mark.skipif(not (importable("open3d") or importable("fast_simplification")), reason="no decimation library")
def test_simplify_keeps_the_shape():
    sphere = trimesh.creation.icosphere(5)
    vertices, faces = simplify(np.asarray(sphere.vertices), np.asarray(sphere.faces), 1000)
    assert 900 <= len(faces) <= 1000
    assert np.abs(np.linalg.norm(vertices, axis=1) - 1).max() < 0.02
