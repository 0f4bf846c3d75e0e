"""Mesh extraction against analytic fields, mesh metrics, and the export CLI on a tiny fit."""

import math

import numpy as np
import pytest
import torch
import trimesh

from recon.app.metrics import mesh_distances
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
