"""Every registered backend: gradients reach every parameter, a short fit lowers the loss, a saved
pipeline reloads to identical outputs. Backend-specific behaviour has its own test file."""

import pytest
import torch
from test_fit import small_config

from recon.app.pipeline import Pipeline
from recon.app.trainer import Trainer
from recon.data.scene import load_scene
from recon.fields import REGISTRY, build_field

BOX = torch.tensor([[-1.0, -1.0, -0.5], [1.0, 1.0, 0.5]])
SMALL = {
    "hashgrid": {"levels": 4, "log2_table": 12, "max_resolution": 64},
    "voxel": {"num_voxels": 32**3},
    "pe": {"depth": 2, "width": 32, "frequencies": 6},
    "triplane": {"resolution": 16, "features": 8},
    # TensoRF's first upscale (and L1) comes after 2k steps; at 7% of 100 it would come before the density
    # leaves softplus(-10) (see recon.fields.vm).
    "vm": {"num_voxels_init": 16**3, "num_voxels": 24**3, "density_components": 4, "appearance_components": 6,
           "upscale_at": [0.6]},
    "neurbf": {"num_voxels_init": 16**3, "num_voxels": 24**3, "density_components": 4, "appearance_components": 6,
               "upscale_at": [0.6], "kernels": 64, "rbf_features": 8, "init_at": 0.2, "init_grid": 24},
}


def test_every_backend_has_a_small_configuration():
    assert set(SMALL) == set(REGISTRY)


def random_queries(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=generator) * (BOX[1] - BOX[0]) + BOX[0]
    return x, torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_every_parameter(name):
    field = build_field(name, BOX, **SMALL[name])
    x, d = random_queries()
    out = field(x, d)
    assert out["density"].shape == (len(x),) and (out["density"] >= 0).all()
    assert out["rgb"].shape == (len(x), 3) and ((out["rgb"] >= 0) & (out["rgb"] <= 1)).all()
    field.update(1.0)  # fields that switch parts on while training (NeuRBF's kernels) have them all on
    out = field(x, d)
    (out["density"].mean() + out["rgb"].mean()).backward()
    for pname, parameter in field.named_parameters():
        if parameter.requires_grad:  # NeuRBF's kernel centres and shapes are frozen by design
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, pname
    grouped = sum(len(group["params"]) for group in field.param_groups(1e-2))
    assert grouped == len([p for p in field.parameters() if p.requires_grad])  # every trainable one, once


@pytest.mark.parametrize("name", sorted(SMALL))
def test_short_fit_lowers_the_loss_and_reloads_identically(name, tiny_scene):
    scene = load_scene(tiny_scene)
    trainer = Trainer(small_config(tiny_scene, field=name, field_options=SMALL[name], steps=100), scene)
    losses = []
    trainer.run([type("Losses", (), {"on_step": lambda self, t, stats: losses.append(stats["loss"])})()])
    assert losses[-1] < 0.85 * losses[0], losses

    reloaded = Pipeline.from_state(trainer.pipeline.state_dict())
    x, d = random_queries()
    trainer.pipeline.field.eval()
    reloaded.field.eval()
    a, b = trainer.pipeline.field(x, d), reloaded.field(x, d)
    assert torch.equal(a["density"], b["density"]) and torch.equal(a["rgb"], b["rgb"])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_quantized_coordinates_snap_for_every_backend(name):
    field = build_field(name, BOX, **SMALL[name])
    field.set_quantization(0.05)  # cells of 0.05 object radii: half the box's longest side is 1
    cell = field.quantize_cell
    assert cell == pytest.approx(0.05)
    x, d = random_queries(256)
    snapped = field.quantize(x)
    assert torch.allclose(snapped, (torch.floor(x / cell) + 0.5) * cell)
    elsewhere_in_cell = snapped + (torch.rand_like(x) - 0.5) * 0.99 * cell
    a, b = field(x, d), field(elsewhere_in_cell, d)
    assert torch.allclose(a["density"], b["density"]) and torch.allclose(a["rgb"], b["rgb"])

    # d/dx is the un-quantized field's analytic gradient at the snapped point (CQ-NIR).
    quantized_gradient = field.gradient(x)
    field.set_quantization(0.0)
    assert torch.allclose(quantized_gradient, field.gradient(snapped), rtol=1e-4, atol=1e-6)
    exact = field(x, d)
    field.set_quantization(1e-9)  # vanishing cells change nothing
    assert torch.allclose(field(x, d)["density"], exact["density"], rtol=1e-4, atol=1e-5)


def test_quantization_is_saved_with_the_pipeline():
    pipeline = Pipeline.build("hashgrid", SMALL["hashgrid"], BOX, 1.0, 0.0, 0.0, 8, 64, quantize=2e-4)
    reloaded = Pipeline.from_state(pipeline.state_dict())
    assert reloaded.field.quantize_relative == 2e-4 and reloaded.field.quantize_cell == pipeline.field.quantize_cell


def test_bounded_backends_contract_unbounded_space_and_keep_it_on_reload():
    scene_box = torch.tensor([[-4.0] * 3, [4.0] * 3])  # aabb_scale 4: the inner box is [-1, 1]^3
    voxel = Pipeline.build("voxel", SMALL["voxel"], scene_box, 4.0, 0.2, 1 / 256, 8, 64)
    hashed = Pipeline.build("hashgrid", SMALL["hashgrid"], scene_box, 4.0, 0.2, 1 / 256, 8, 64)
    assert hashed.field.contraction is None  # instant-ngp's grid spans the whole cascaded box
    field = voxel.field
    assert torch.equal(field.contraction, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    inside = torch.rand(100, 3) * 2 - 1
    assert torch.allclose(field.normalize(inside), (inside + 2) / 4)  # identity inside, in a box twice as large
    far = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1) * 1e6
    u = field.normalize(far)
    assert ((u >= 0) & (u <= 1)).all() and torch.allclose((u - 0.5).abs().amax(-1), torch.tensor(0.5), atol=1e-5)
    edge = torch.tensor([[1.0, 0.3, -0.2]])
    assert torch.allclose(field.normalize(edge * (1 + 1e-4)), field.normalize(edge), atol=1e-4)  # continuous at the box
    y = torch.tensor([[3.0, 1.5, 0.0]])  # |y|_inf = 3 -> (2 - 1/3) y / 3
    assert torch.allclose(field.normalize(y) * 4 - 2, (2 - 1 / 3) * y / 3)
    x, d = random_queries(64)
    reloaded = Pipeline.from_state(voxel.state_dict()).field
    assert torch.equal(reloaded.contraction, field.contraction)
    assert torch.equal(reloaded(x * 4, d)["density"], field(x * 4, d)["density"])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_parameter_budget_sizes_every_backend(name):
    from recon.fields import final_parameters, options_for_budget

    for task, box, budget in (("radiance", BOX, 300_000),
                              ("image", torch.tensor([[0.0, 0.0], [300.0, 200.0]]), 60_000)):
        base = SMALL[name] if task == "radiance" else {}  # small backbones, so every budget can be met
        options = options_for_budget(name, box, task, budget, **base)
        count = final_parameters(name, box, task, **options)
        key = REGISTRY[name].size_option[task]
        neighbours = [final_parameters(name, box, task, **{**options, key: options[key] + step}) for step in (-1, 1)]
        # The closest the size option can come: no neighbouring value is nearer the budget.
        assert all(abs(count - budget) <= abs(n - budget) for n in neighbours), (options, count, neighbours)
