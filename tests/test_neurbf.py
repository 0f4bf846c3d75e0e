"""NeuRBF: the nearest-kernel lookup against brute force, weighted k-means, the kernels and the sinusoidal
composition against their formulas, shapes from cluster covariances, and small fits of an image and an SDF."""

import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from recon.app.config import FitConfig
from recon.app.trainer import Trainer
from recon.data.targets import load_image, load_mesh
from recon.fields import build_field
from recon.fields.neurbf import AdaptiveRBF, log_spaced
from recon.fields.rbf import NearestKernels, nearest_brute_force, weighted_kmeans


@pytest.mark.parametrize("method", ["tree", "grid"])
@pytest.mark.parametrize("dims", [2, 3])
def test_nearest_kernels_equal_brute_force(method, dims):
    generator = torch.Generator().manual_seed(dims)
    # Clustered centres, as k-means leaves them: half uniform, half in a tight blob.
    centres = torch.cat([torch.rand(300, dims, generator=generator),
                         0.5 + 0.03 * torch.randn(300, dims, generator=generator)]).clamp(0, 1)
    points = torch.cat([torch.rand(3000, dims, generator=generator), torch.tensor([[0.0] * dims, [1.0] * dims])])
    index, distance = NearestKernels(centres, 5, method).query(points)
    expected_index, expected_distance = nearest_brute_force(points, centres, 5)
    assert torch.allclose(distance, expected_distance, atol=1e-6)
    assert torch.allclose((points[:, None] - centres[index]).square().sum(-1), distance, atol=1e-6)
    assert (index == expected_index).float().mean() > 0.999  # ties may swap


def test_weighted_kmeans_puts_more_centres_where_the_weight_is():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(20000, 2, generator=generator)
    weights = torch.where(points[:, 0] < 0.5, 10.0, 1.0)
    centres, _, _, assignment = weighted_kmeans(points, weights, 200, generator=generator)
    left = (centres[:, 0] < 0.5).sum().item()
    assert left > 2 * (200 - left)  # Lloyd's centres crowd where the mass is
    # Every centre is the weighted mean of its cluster (the last assignment, one more step would not move it much).
    for k in range(0, 200, 37):
        members = assignment == k
        if members.any():
            mean = (weights[members, None] * points[members]).sum(0) / weights[members].sum()
            assert (mean - centres[k]).norm() < 0.05


def test_kernels_and_sinusoidal_composition_match_their_formulas():
    torch.manual_seed(0)
    m = log_spaced(0.5, 64.0, 4)
    assert torch.allclose(m, torch.tensor([0.5, 2.5198, 12.6992, 64.0]), atol=1e-3)
    for kernel, normalize in (("ivq", True), ("tent", False)):
        rbf = AdaptiveRBF([1.0, 0.5], 40, 4, kernel, neighbours=3, normalize=normalize, frequencies=m)
        with torch.no_grad():
            rbf.features.normal_()
        x = torch.rand(50, 2) * torch.tensor([1.0, 0.5])
        out = rbf(x)
        index = nearest_brute_force(x, rbf.centres, 3)[0]
        for n in range(0, 50, 7):
            phis = []
            for j in index[n].tolist():
                o = (x[n] - rbf.centres[j]).double()
                if kernel == "ivq":
                    s = rbf.inverse_covariance(rbf.shapes[j]).double()
                    phis.append(1 / (1 + o @ s @ o))
                else:
                    phis.append(torch.prod((1 - o.abs() * rbf.shapes[j].double()).clamp(min=0)))
            phis = torch.stack(phis)
            if normalize:
                phis = phis / (phis.sum() + 1e-8)
            expected = sum(rbf.features[j].double() * torch.sin(p * m.double())
                           for j, p in zip(index[n].tolist(), phis))
            assert torch.allclose(out[n].double(), expected, atol=1e-5), (kernel, n)


def test_shapes_come_from_the_clusters_weighted_covariance():
    generator = torch.Generator().manual_seed(1)
    covariance = torch.tensor([[4e-4, 1.5e-4], [1.5e-4, 2e-4]])
    blob = torch.distributions.MultivariateNormal(torch.tensor([0.5, 0.5]), covariance)
    points = blob.sample((20000,)).clamp(0, 1)
    rbf = AdaptiveRBF([1.0, 1.0], 1, 2, "ivq", neighbours=1, normalize=True, shape_divisor=0.5, cells=512)
    rbf.adapt(points, torch.ones(len(points)), generator)
    assert torch.allclose(rbf.centres[0], torch.tensor([0.5, 0.5]), atol=2e-3)
    # NeuRBF: the covariance divided by 0.5, inverted.
    assert torch.allclose(rbf.inverse_covariance(rbf.shapes[0]), torch.linalg.inv(covariance / 0.5), rtol=0.05)
    tent = AdaptiveRBF([1.0, 1.0], 1, 2, "tent", neighbours=1, normalize=True, shape_divisor=0.5, cells=512)
    tent.adapt(points, torch.ones(len(points)), generator)
    width2 = 4 * covariance.trace() / 0.5  # 4 x the mean squared distance over axes / the divisor
    assert tent.shapes[0].item() == pytest.approx(1 / math.sqrt(width2), rel=0.05)


def test_attached_points_give_the_same_features_as_a_fresh_lookup():
    field = build_field("neurbf", torch.tensor([[0.0, 0.0], [60.0, 40.0]]), task="image", kernels=80)
    pixels = torch.rand(500, 2) * torch.tensor([60.0, 40.0])
    field.adapt(pixels, torch.rand(500))
    assert field.attach(pixels)
    ids = torch.randperm(500)[:100]
    assert torch.equal(field.rgb(pixels[ids], point_ids=ids), field.rgb(pixels[ids]))


def fit(target, options: dict, steps: int, **overrides):
    cfg = FitConfig(scene=str(target.path), out="", field="neurbf", field_options=options, steps=steps,
                    batch_points=4096, sdf_pool=2**15, log_every=50, eval_chunk=4096, device="cpu", **overrides)
    trainer = Trainer(cfg, target)
    trainer.run()
    return trainer


def test_neurbf_fits_an_image_and_places_kernels_on_its_edges(tmp_path):
    y, x = np.mgrid[0:48, 0:64] / 48.0
    image = np.stack([0.2 + 0.6 * ((x - 0.7) ** 2 + (y - 0.5) ** 2 < 0.08), 0.5 + 0.3 * np.sin(4 * x),
                      0.3 + 0.4 * y], -1)
    path = tmp_path / "disc.png"
    imageio.imwrite(path, (image * 255).astype(np.uint8))
    trainer = fit(load_image(path), {"kernels": 300}, steps=300)
    assert trainer.task.evaluate(None)["mean"]["psnr"] > 35
    rbf = trainer.pipeline.field.encoding.rbf
    # Kernels sit where the Sobel weight is: near the disc's rim far more than in the flat background.
    drawn = rbf.centres * 64 / 48  # isotropic coordinates (the 64-pixel width is 1) -> the drawing's (pixels / 48)
    rim = ((drawn[:, 0] - 0.7) ** 2 + (drawn[:, 1] - 0.5) ** 2).sqrt()
    assert ((rim - math.sqrt(0.08)).abs() < 0.05).float().mean() > 0.3


def test_neurbf_fits_a_sphere_sdf(tmp_path):
    path = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=3, radius=0.8).export(path)
    trainer = fit(load_mesh(path), {"kernels": 400, "grid_resolution": 64}, steps=300)
    scores = trainer.task.evaluate(None)["mean"]
    assert scores["iou"] > 0.97, scores
    rbf = trainer.pipeline.field.encoding.rbf
    radius = ((rbf.centres - 0.5) * 2).norm(dim=-1)  # unit frame: the sphere is scaled to radius 0.9
    assert ((radius - 0.9).abs() < 0.1).float().mean() > 0.9  # kernels on the surface (1 / |SDF| weights)


def test_radiance_kernels_are_placed_after_pre_training():
    box = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    field = build_field("neurbf", box, num_voxels_init=16**3, num_voxels=24**3, density_components=4,
                        appearance_components=6, upscale_at=[], kernels=50, rbf_features=8, init_at=0.1, init_grid=20)
    with torch.no_grad():  # a dense blob near one corner: that is where alpha * |grad feature| is high
        for plane in list(field.density_factors.planes) + list(field.density_factors.lines):
            plane.fill_(0.0)
        for factors in (field.density_factors, field.appearance_factors):
            for plane, line in zip(factors.planes, factors.lines):
                h, w = plane.shape[2:]
                plane[..., : h // 3, : w // 3] = 3.0
                line[..., : line.shape[2] // 3, :] = 3.0
    x, d = torch.rand(200, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(200, 3), dim=-1)
    before = field(x, d)["rgb"]
    assert not bool(field.rbf_ready) and not field.update(0.05)
    assert field.update(0.1) and bool(field.rbf_ready)  # placed; the trainer rebuilds its optimiser
    assert (field.rbf.centres < 0.5).all(-1).float().mean() > 0.8  # in the blob's corner of [0, 1]^3
    assert torch.allclose(field(x, d)["rgb"], before, atol=1e-3)  # features start near zero


def test_a_radiance_budget_keeps_the_split_of_backbone_and_kernels():
    """--params sizes the resolution and the kernels fill TensoRF's 16/48 budget at it, so a budget below
    the CPU preset's backbone still leaves NeuRBF its kernels (sizing by the kernel count left one)."""
    from recon.fields import final_parameters, options_for_budget

    box = torch.tensor([[-1.0] * 3, [1.0] * 3])
    preset = {"num_voxels_init": 64**3, "num_voxels": 128**3, "init_grid": 128}
    options = options_for_budget("neurbf", box, "radiance", 2_000_000, **preset)
    total = final_parameters("neurbf", box, "radiance", **options)
    field = build_field("neurbf", box, **options)
    rbf = sum(p.numel() for p in field.rbf.parameters())  # centres, shapes, features
    assert abs(total - 2_000_000) < 0.02 * 2_000_000 and options["num_voxels"] < 128**3
    reference = final_parameters("vm", box, "radiance", num_voxels=options["num_voxels"])
    assert total == pytest.approx(reference, rel=0.02)  # NeuRBF's size: TensoRF 16/48 at the same resolution
    kernels = len(field.rbf.centres)
    assert kernels > 1000 and 0.15 < rbf / total < 0.5, (kernels, rbf, total)
