"""The coordinate tasks (fit an image, fit a mesh's SDF) on every backend, with and without quantized
coordinates: the loss falls, gradients reach every parameter, a saved run reloads to identical outputs;
and the task fields' own contracts (the SDF starts as a sphere, the image field covers its pixels)."""

import json
import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from recon.app.cli import main
from recon.app.config import FitConfig
from recon.app.pipeline import Pipeline
from recon.app.trainer import Trainer
from recon.data.loaders import SceneError
from recon.data.targets import (
    load_image,
    load_mesh,
    open3d_available,
    sdf_samples,
    signed_distance,
    signed_distance_reference,
)
from recon.fields import REGISTRY, build_field
from recon.fields.encodings import GaussianFourierEncoding

# Small encodings per backend for the coordinate tasks (their options, not the radiance fields').
SMALL = {
    "hashgrid": {"levels": 4, "log2_table": 12},
    "voxel": {"num_voxels": 24**2, "upscale_at": [0.3]},
    "pe": {"frequencies": 6, "hidden": 64, "layers": 2},
    "triplane": {"resolution": 8, "features": 8},
    "vm": {"components": 8, "num_voxels_init": 16**2, "num_voxels": 24**2, "upscale_at": [0.3]},
    "neurbf": {"kernels": 64, "features": 8, "grid_resolution": 24},
}
SMALL_3D = SMALL | {"voxel": {"num_voxels": 24**3, "upscale_at": [0.3]},
                    "vm": {"components": 8, "num_voxels_init": 16**3, "num_voxels": 24**3, "upscale_at": [0.3]},
                    "neurbf": {"kernels": 64, "features": 8, "grid_resolution": 32}}


def test_every_backend_has_small_coordinate_configurations():
    assert set(SMALL) == set(SMALL_3D) == set(REGISTRY)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 48x40 image with smooth shading, a sharp disc and fine stripes: something to fit, not a constant."""
    y, x = np.mgrid[0:40, 0:48] / 40.0
    image = np.stack([0.5 + 0.4 * np.sin(3 * x), 0.3 + 0.5 * y,
                      0.2 + 0.6 * ((x - 0.6) ** 2 + (y - 0.5) ** 2 < 0.1)], -1)
    image[:, ::6, 1] = 0.9
    path = tmp_path_factory.mktemp("image") / "photo.png"
    imageio.imwrite(path, (image.clip(0, 1) * 255).astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def bunny(tmp_path_factory):
    """A closed, non-convex mesh with a known inside: a torus."""
    path = tmp_path_factory.mktemp("mesh") / "torus.obj"
    trimesh.creation.torus(major_radius=0.6, minor_radius=0.25, major_sections=24, minor_sections=12).export(path)
    return path


def coordinate_config(target, name: str, steps: int, quantize: float = 0.0, **overrides) -> FitConfig:
    options = SMALL_3D[name] if str(target).endswith(".obj") else SMALL[name]
    base = dict(scene=str(target), out="", field=name, field_options=dict(options), steps=steps, batch_points=2048,
                sdf_pool=2**13, log_every=5, eval_chunk=4096, device="cpu", quantize=quantize)
    return FitConfig(**(base | overrides))


def record_losses(trainer: Trainer) -> list[float]:
    losses: list[float] = []
    trainer.run([type("Losses", (), {"on_step": lambda self, t, stats: losses.append(stats["loss"])})()])
    return losses


@pytest.mark.parametrize("quantize", [0.0, 1e-3], ids=["exact", "quantized"])
@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("kind", ["image", "mesh"])
def test_coordinate_task_trains_and_reloads(kind, name, quantize, photo, bunny):
    target_path = photo if kind == "image" else bunny
    target = load_image(target_path) if kind == "image" else load_mesh(target_path)
    trainer = Trainer(coordinate_config(target_path, name, steps=40, quantize=quantize), target)
    field = trainer.pipeline.field
    assert field.outputs == ({"rgb"} if kind == "image" else {"sdf"})

    # Gradients reach every parameter (after a first step: the SDF decoder starts blind to the encoding).
    trainer.train_step()
    result = trainer.task.loss(torch.Generator().manual_seed(1))
    result.loss.backward()
    for pname, parameter in field.named_parameters():
        if parameter.requires_grad:  # NeuRBF's kernel centres and shapes are frozen by design
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, pname
    field.zero_grad()

    losses = record_losses(trainer)
    assert losses[-1] < 0.7 * losses[0], losses

    reloaded = Pipeline.from_state(trainer.pipeline.state_dict()).field
    assert reloaded.quantize_relative == quantize and reloaded.options == field.options
    x = target.box[0] + torch.rand(512, target.box.shape[1]) * (target.box[1] - target.box[0])
    field.eval(), reloaded.eval()
    key = next(iter(field.outputs))
    assert torch.equal(field(x)[key], reloaded(x)[key])


def test_image_fit_reaches_a_psnr_floor(photo):
    trainer = Trainer(coordinate_config(photo, "hashgrid", steps=300, field_options={"levels": 8, "log2_table": 14}),
                      load_image(photo))
    trainer.run()
    result = trainer.task.evaluate(None)
    assert result["mean"]["psnr"] > 35, result["mean"]


def test_mesh_sdf_fit_reaches_an_iou_floor(bunny):
    trainer = Trainer(coordinate_config(bunny, "hashgrid", steps=300, sdf_pool=2**15,
                                        field_options={"levels": 8, "log2_table": 14, "max_resolution": 128}),
                      load_mesh(bunny))
    trainer.run()
    scores = trainer.task.evaluate(None)["mean"]
    assert scores["iou"] > 0.97 and scores["normal_angle_deg"] < 10, scores


def test_fourier_features_are_gaussian_frequencies_and_fit_an_image(photo):
    encoding = GaussianFourierEncoding(2, features=256, scale=10.0)
    frequencies = encoding.projection / (2 * math.pi)  # cycles per unit of [0, 1]
    assert encoding.out_dim == 512 and abs(frequencies.std().item() - 10) < 1 and abs(frequencies.mean().item()) < 1
    u = torch.rand(100, 2)
    phase = 2 * math.pi * u @ frequencies.T
    assert torch.allclose(encoding(u), torch.cat([phase.sin(), phase.cos()], -1), atol=1e-4)
    assert torch.equal(GaussianFourierEncoding(2, 256, 10.0).projection, encoding.projection)  # a fixed draw

    def fit(**encoding) -> Trainer:
        options = {"hidden": 64, "layers": 3, **encoding}
        trainer = Trainer(coordinate_config(photo, "pe", steps=300, field_options=options), load_image(photo))
        trainer.run()
        return trainer

    # The stripes every 6 pixels are beyond 6 octaves in 300 steps; random frequencies reach them.
    trainer = fit(fourier_features=128, fourier_scale=10.0)
    random_features = trainer.task.evaluate(None)["mean"]["psnr"]
    octaves = fit(frequencies=6).task.evaluate(None)["mean"]["psnr"]
    assert random_features > 24 and random_features > octaves + 2, (random_features, octaves)
    reloaded = Pipeline.from_state(trainer.pipeline.state_dict()).field
    x = torch.rand(256, 2) * 40
    assert torch.equal(trainer.pipeline.field.rgb(x), reloaded.rgb(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_untrained_sdf_is_a_sphere(name):
    field = build_field(name, torch.tensor([[-1.0] * 3, [1.0] * 3]), task="sdf", **SMALL_3D[name])
    x = torch.rand(4000, 3) * 2 - 1
    with torch.no_grad():
        sdf = field.sdf(x)
    true = x.norm(dim=-1) - 0.5
    away = true.abs() > 0.25  # the geometric initialisation is a sphere up to a width-dependent wobble
    assert ((sdf < 0) == (true < 0))[away].float().mean() > 0.97
    assert (sdf - true).abs().mean() < 0.25


def test_image_field_box_is_in_pixels_and_images_load_as_rgb(photo, tmp_path):
    image = load_image(photo)
    assert (image.width, image.height) == (48, 40) and image.pixels.shape == (40, 48, 3)
    centres = image.pixel_centres()
    assert (centres[0].tolist() == [0.5, 0.5] and centres[47].tolist() == [47.5, 0.5]
            and centres[48].tolist() == [0.5, 1.5])
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # transparent: composited on white
    imageio.imwrite(tmp_path / "clear.png", rgba)
    assert torch.equal(load_image(tmp_path / "clear.png").pixels, torch.ones(4, 4, 3))
    assert load_image(photo, downscale=2).pixels.shape == (20, 24, 3)


def test_signed_distance_reference_and_its_open3d_twin():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    vertices, faces = torch.tensor(sphere.vertices).float(), torch.tensor(sphere.faces)
    points = torch.rand(3000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = signed_distance_reference(vertices, faces, points)
    # The polyhedron sits within 0.3% of the sphere it approximates.
    assert (reference - (points.norm(dim=-1) - 0.7)).abs().max() < 0.004
    holed = signed_distance_reference(vertices, faces[12:], points)  # 12 faces missing: the winding number votes
    assert ((holed < 0) == (points.norm(dim=-1) < 0.7)).float().mean() > 0.995
    if not open3d_available():
        pytest.skip("open3d (recon[mesh]) not installed: the twin is not compared")
    assert torch.allclose(signed_distance(vertices, faces, points), reference, atol=1e-5)


def test_inside_mesh_is_the_sign_of_the_distance_with_or_without_open3d(monkeypatch):
    from recon.data import targets

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    vertices, faces = torch.tensor(sphere.vertices).float(), torch.tensor(sphere.faces)
    points = torch.rand(2000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = signed_distance_reference(vertices, faces, points) < 0
    with_open3d = targets.inside_mesh(vertices, faces, points)
    monkeypatch.setattr(targets, "open3d_available", lambda: False)
    assert torch.equal(targets.inside_mesh(vertices, faces, points), expected)
    assert (with_open3d == expected).float().mean() > 0.999  # open3d's parity vote may differ on a graze


def test_mesh_is_normalised_and_samples_follow_torch_ngp(bunny, tmp_path):
    mesh = load_mesh(bunny)
    extent = mesh.vertices.max(0).values - mesh.vertices.min(0).values
    assert extent.max().item() == pytest.approx(2 * 0.9, rel=1e-5)
    assert torch.allclose(mesh.vertices.max(0).values + mesh.vertices.min(0).values, torch.zeros(3), atol=1e-5)
    original = torch.tensor(trimesh.load(bunny, force="mesh").vertices).float()
    assert torch.allclose(original @ mesh.to_unit[:3, :3].T + mesh.to_unit[:3, 3], mesh.vertices, atol=1e-5)

    points, distance = sdf_samples(mesh, 800, torch.Generator().manual_seed(0))
    assert points.shape == (800, 3) and (distance[:400] == 0).all()  # half on the surface
    assert distance[400:700].abs().max() < 0.06  # three eighths within a few sigma of it
    assert torch.allclose(distance[400:], signed_distance_reference(mesh.vertices, mesh.faces, points[400:]), atol=1e-5)

    (tmp_path / "cloud.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                                       "property float z\nend_header\n0 0 0\n")
    (tmp_path / "broken.obj").write_text("v 0 0 0\nf 1 2 3\n")
    for bad, message in ((tmp_path / "cloud.ply", "no triangles"), (tmp_path / "missing.obj", "no such mesh")):
        with pytest.raises(SceneError, match=message):
            load_mesh(bad)


def test_cli_fits_evaluates_and_exports_the_coordinate_tasks(photo, bunny, tmp_path):
    image_run, mesh_run = tmp_path / "image", tmp_path / "mesh"
    main(["fit", str(photo), "--steps", "150", "--out", str(image_run), "--batch-points", "2048", "-o", "levels=6",
          "-o", "log2_table=14"])
    metrics = json.loads((image_run / "metrics.json").read_text())
    assert metrics["task"] == "image" and metrics["mean"]["psnr"] > 20 and metrics["views"] is None
    assert imageio.imread(image_run / "renders" / "reconstruction.png").shape == (40, 48, 3)
    main(["eval", str(image_run)])

    main(["fit", str(bunny), "--steps", "150", "--out", str(mesh_run), "--batch-points", "4096", "--sdf-pool", "16384",
          "-o", "levels=8", "-o", "log2_table=14", "-o", "max_resolution=128"])
    metrics = json.loads((mesh_run / "metrics.json").read_text())
    assert metrics["task"] == "mesh-sdf" and metrics["mean"]["iou"] > 0.9
    main(["export", "mesh", str(mesh_run), "--resolution", "48"])
    exported = trimesh.load(mesh_run / "export" / "mesh-48.ply", force="mesh")
    truth = trimesh.load(bunny, force="mesh")  # the export is back in the mesh file's coordinates
    distance = signed_distance_reference(torch.tensor(truth.vertices).float(), torch.tensor(truth.faces),
                                         torch.tensor(exported.vertices[::10]).float()).abs()
    assert exported.is_watertight and exported.volume > 0 and distance.median() < 0.03, distance.median()

    for bad in (["render", str(image_run)], ["export", "mesh", str(image_run)], ["export", "pointcloud", str(mesh_run)],
                ["fit", str(photo), "-o", "colour=blue", "--out", str(tmp_path / "never")]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2, bad
    assert not (tmp_path / "never").exists()
