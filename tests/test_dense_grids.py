"""The dense-grid backends: DVGO's voxel grid (post-activation density, progressive scaling, reload, a
short fit) and TensoRF's vector-matrix factors (upscaling, L1)."""

import pytest
import torch
from test_fit import small_config

from recon.app.evaluate import evaluate
from recon.app.pipeline import Pipeline
from recon.app.trainer import Trainer
from recon.data.scene import load_scene
from recon.fields import build_field

BOX = torch.tensor([[-1.0, -1.0, -0.5], [1.0, 1.0, 0.5]])


def test_a_fresh_grid_starts_at_its_initial_alpha():
    field = build_field("voxel", BOX, num_voxels=32**3, alpha_init=1e-2)
    x = torch.rand(100, 3) * (BOX[1] - BOX[0]) + BOX[0]
    alpha_per_voxel = 1 - torch.exp(-field.density(x) * field.voxel_base)
    assert torch.allclose(alpha_per_voxel, torch.tensor(1e-2), rtol=1e-4)
    assert (field.density(torch.tensor([[0.0, 0.0, 0.8]])) == 0).all()  # outside the box


def test_density_is_interpolated_before_its_activation():
    field = build_field("voxel", BOX, num_voxels=16**3, upscale_at=[])
    with torch.no_grad():
        field.density_grid.grid.zero_()
        field.density_grid.grid[0, 0, 8] = 20.0  # one slab of high raw density
    nx = field.resolution[0]
    between = BOX[0, 0] + (8.5 / (nx - 1)) * (BOX[1, 0] - BOX[0, 0])  # halfway to the next slab
    sigma = field.density(torch.tensor([[between, 0.0, 0.0]]))
    expected = torch.nn.functional.softplus(torch.tensor(10.0 + field.shift)) / field.voxel_base
    assert sigma.item() == pytest.approx(expected.item(), rel=1e-4)  # softplus(mean), not mean(softplus)


def test_upscaling_keeps_the_function_and_reloads():
    field = build_field("voxel", BOX, num_voxels=48**3, upscale_at=[0.1, 0.2])
    start = field.resolution
    with torch.no_grad():  # a linear function of position is kept exactly by trilinear upscaling
        for grid in (field.density_grid.grid, field.feature_grid.grid):
            ijk = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in grid.shape[2:]], indexing="ij"))
            grid.copy_((ijk * torch.tensor([1.0, -2.0, 0.5])[:, None, None, None]).sum(0).expand_as(grid[0])[None])
    x = torch.rand(500, 3) * (BOX[1] - BOX[0]) + BOX[0]
    d = torch.nn.functional.normalize(torch.randn(500, 3), dim=-1)
    before = field(x, d)
    assert not field.update(0.05) and field.update(0.15) and not field.update(0.15)
    grown = field.resolution
    assert all(b / a == pytest.approx(2 ** (1 / 3), rel=0.1) for a, b in zip(start, grown))
    after = field(x, d)
    assert (torch.allclose(before["density"], after["density"], rtol=1e-4)
            and torch.allclose(before["rgb"], after["rgb"], atol=1e-5))

    pipeline = Pipeline(field, {"aabb": BOX.tolist(), "resolution": 8, "levels": 1, "step_size": 0.01},
                        Pipeline.build("voxel", {}, BOX, 1.0, 0.0, 0.0, 8, 64).tracer)
    reloaded = Pipeline.from_state(pipeline.state_dict()).field
    assert reloaded.resolution == grown and int(reloaded.density_grid.upscaling.done) == 1
    assert torch.equal(reloaded(x, d)["rgb"], after["rgb"])
    assert reloaded.update(0.25) and reloaded.resolution != grown  # the second milestone still comes


def test_total_variation_is_added_and_reaches_the_grids():
    field = build_field("voxel", BOX, num_voxels=16**3, tv_density=1.0, tv_features=0.5)
    with torch.no_grad():
        field.density_grid.grid.normal_()
    field.regularization().backward()
    assert field.density_grid.grid.grad.abs().sum() > 0
    assert build_field("voxel", BOX, num_voxels=16**3).regularization() is None


def test_voxel_field_fits_the_tiny_scene(tiny_scene):
    scene = load_scene(tiny_scene)
    cfg = small_config(tiny_scene, field="voxel", field_options={"num_voxels": 48**3}, steps=300)
    trainer = Trainer(cfg, scene)
    trainer.run()
    # every milestone passed, the optimiser rebuilt each time
    assert int(trainer.pipeline.field.density_grid.upscaling.done) == 4
    result = evaluate(trainer.pipeline, scene.splits["test"], stride=1, chunk=8192)
    assert result["mean"]["psnr"] > 22.0, result["mean"]


def test_vector_matrix_upscaling_keeps_the_function_and_switches_l1():
    field = build_field("vm", BOX, num_voxels_init=24**3, num_voxels=48**3, upscale_at=[0.1, 0.2],
                        density_components=2, appearance_components=3)
    with torch.no_grad():  # planes linear in their two axes, lines linear along theirs: kept exactly
        for factors in (field.density_factors, field.appearance_factors):
            for p in list(factors.planes) + list(factors.lines):
                h, w = p.shape[2:]
                ramp = torch.linspace(-1, 1, h)[:, None] + 0.5 * torch.linspace(-1, 1, w)[None]
                p.copy_((0.3 + 0.2 * ramp).expand_as(p))
    x, d = torch.rand(400, 3) * (BOX[1] - BOX[0]) + BOX[0], torch.nn.functional.normalize(torch.randn(400, 3), dim=-1)
    before, l1_before = field(x, d), field.regularization()
    start = list(field.density_factors.planes[0].shape)
    assert field.update(0.15) and list(field.density_factors.planes[0].shape) != start
    after = field(x, d)
    assert (torch.allclose(before["density"], after["density"], rtol=1e-4)
            and torch.allclose(before["rgb"], after["rgb"], atol=1e-5))
    assert (field.regularization() / field.density_factors.l1()).item() == pytest.approx(4e-5)
    assert l1_before is None  # none before the first upscale (see recon.fields.vm)
