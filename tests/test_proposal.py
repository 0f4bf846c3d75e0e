"""Proposal sampling (renderers.proposal): its histograms, its loss, and renders equal to marching's."""

import json

import numpy as np
import pytest
import torch
import trimesh
from geometry import look_at

from recon.app.config import FitConfig
from recon.app.evaluate import evaluate
from recon.app.export import export_box, extract_mesh
from recon.app.pipeline import Pipeline
from recon.app.trainer import Trainer
from recon.data.cameras import Cameras
from recon.data.rays import Rays
from recon.data.scene import load_scene
from recon.renderers import OccupancyGrid, Samples, march, propose, ray_aabb, render_rays
from recon.renderers.proposal import Histogram, Proposal, distance_of, outer_bound, resample, spacing_of

UNIT = torch.tensor([[-1.0] * 3, [1.0] * 3])


def blob(peak: float, width: float = 0.1):
    """A smooth layer of density peak * exp(-x^2 / (2 width^2)): along +x through the unit box its optical depth is
    peak * width * sqrt(2 pi) (to 1e-20), and the midpoint rule converges on it quickly."""
    return lambda x: peak * torch.exp(-x[:, 0].square() / (2 * width**2))


def rays_along_x(n: int) -> Rays:
    g = torch.Generator().manual_seed(0)
    origins = torch.cat([torch.full((n, 1), -3.0), torch.rand(n, 2, generator=g) * 1.6 - 0.8], 1)
    return Rays(origins, torch.tensor([[1.0, 0.0, 0.0]]).expand(n, -1).contiguous())


@pytest.mark.parametrize("kind", ["linear", "piecewise", "disparity"])
def test_spacing_round_trips(kind):
    t = torch.linspace(0.01, 50.0, 1000)
    assert torch.allclose(distance_of(spacing_of(t, kind), kind), t, rtol=1e-5)
    assert (spacing_of(t, kind).diff() > 0).all()


def test_outer_bound_sums_every_overlapping_bin():
    g = torch.Generator().manual_seed(1)
    coarse = torch.sort(torch.rand(3, 9, generator=g), -1).values
    coarse[:, 0], coarse[:, -1] = 0, 1
    weights = torch.rand(3, 8, generator=g)
    fine = torch.sort(torch.rand(3, 20, generator=g), -1).values
    bound = outer_bound(fine, coarse, weights)
    for r in range(3):
        for i in range(19):
            a, b = fine[r, i], fine[r, i + 1]
            overlap = (coarse[r, :-1] < b) & (coarse[r, 1:] > a)
            assert bound[r, i] == pytest.approx(float(weights[r][overlap].sum()), abs=1e-6)


def test_interlevel_loss_is_zero_when_proposal_and_field_agree_and_positive_when_it_misses():
    edges = torch.tensor([[0.0, 0.2, 0.5, 0.6, 1.0]])
    weights = torch.tensor([[0.1, 0.5, 0.3, 0.05]])
    ray_idx = torch.zeros(4, dtype=torch.long)
    spacing = Samples(ray_idx, edges[0, :-1], edges[0, 1:], 1)
    same = Proposal(spacing, spacing, [Histogram(edges, weights)])
    assert float(same.interlevel(weights.view(-1))) == pytest.approx(0.0, abs=1e-10)  # up to cumsum rounding
    coarser = Proposal(spacing, spacing, [Histogram(torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0.6, 0.35]]))])
    assert float(coarser.interlevel(weights.view(-1))) == pytest.approx(0.0, abs=1e-10)  # coarse bins hold the fine
    missing = Proposal(spacing, spacing, [Histogram(edges, torch.tensor([[0.1, 0.1, 0.3, 0.05]]))])
    assert float(missing.interlevel(weights.view(-1))) == pytest.approx(0.4**2 / 0.5, rel=1e-4)


def test_resample_follows_the_histogram_and_spans_the_ray():
    edges = torch.linspace(0, 1, 11).expand(2, -1)
    weights = torch.zeros(2, 10)
    weights[:, 3] = 1.0  # all weight in [0.3, 0.4]
    drawn = resample(edges, weights, 64)
    assert drawn[:, 0].eq(0).all() and drawn[:, -1].eq(1).all() and (drawn.diff() >= 0).all()
    inside = ((drawn >= 0.3) & (drawn <= 0.4)).float().mean()
    assert inside > 0.85  # padding 0.01 per bin leaves ~8% of the mass to the other nine
    jittered = resample(edges, weights, 64, torch.Generator().manual_seed(0))
    assert (jittered.diff() >= 0).all() and not torch.equal(jittered, drawn)


@pytest.mark.parametrize("spacing", ["linear", "piecewise", "disparity"])
def test_proposal_render_equals_marching_on_an_exact_field(spacing):
    """With the true density as both proposal and field, the proposal sampler's few samples sum to the opacity
    that marching the occupancy grid finds with 800, and both to the exact 1 - exp(-optical depth); the
    proposal's error shrinks as its count grows."""
    peak, width = 8.0, 0.1
    density = blob(peak, width)
    rays = rays_along_x(64)
    field_fn = lambda x, d, dt: {"tau": density(x) * dt, "rgb": torch.ones(len(x), 3)}  # noqa: E731
    t_near, t_far = ray_aabb(rays.origins, rays.dirs, UNIT)
    every_cell = OccupancyGrid(UNIT, 8)  # nothing pruned: marching is the midpoint rule, 800 steps a ray
    by_marching = render_rays(rays, field_fn, march(rays, every_cell, UNIT, 2.5e-3))["opacity"]
    exact = 1 - torch.exp(torch.tensor(-peak * width * (2 * torch.pi) ** 0.5))
    assert torch.allclose(by_marching, exact.expand(64), atol=2e-3)
    errors = []
    for count in (32, 64, 128):
        proposed = propose(rays, t_near, t_far, [density, density], [64, 64], count, spacing)
        assert len(proposed.samples) == 64 * count
        errors.append(float((render_rays(rays, field_fn, proposed.samples)["opacity"] - by_marching).abs().max()))
    assert errors[1] < 5e-3 and errors[2] < 2e-3 and errors[0] > errors[1] > errors[2], errors
    # The field's samples sit where the density is, not spread along the ray.
    x = proposed.samples.positions(rays)[:, 0]
    assert ((x > -3 * width) & (x < 3 * width)).float().mean() > 0.6


def test_proposal_pipeline_checkpoint_rebuilds_the_same_renders():
    pipeline = Pipeline.build("hashgrid", {"levels": 4, "log2_table": 12}, UNIT * 4, 4.0, 0.2, 0.0, 16, 128,
                              proposal_samples=[32, 16], field_samples=8)
    assert pipeline.grid is None and len(pipeline.proposals) == 2
    assert pipeline.proposal_config["spacing"] == "piecewise"
    assert torch.equal(pipeline.inner_box, UNIT)
    # Without cameras export meshes the inner box; a crop may reach out of it (the fox's head), never past the
    # scene box.
    assert torch.equal(export_box(pipeline, torch.eye(4), None)[0], UNIT)
    crop = torch.tensor([[-0.5, -0.5, -0.5], [1.5, 9.0, 0.5]])
    cut = torch.tensor([[-0.5, -0.5, -0.5], [1.5, 4.0, 0.5]])
    assert torch.equal(export_box(pipeline, torch.eye(4), crop)[0], cut)
    with torch.no_grad():
        for p in pipeline.proposals.parameters():
            p.normal_()
    state = json.loads(json.dumps({k: v for k, v in pipeline.state_dict().items() if k.endswith("config")}))
    rebuilt = Pipeline.from_state(pipeline.state_dict() | state)
    rays = rays_along_x(16)
    a = pipeline.render_rays_chunked(rays, torch.ones(3), chunk=5)
    b = rebuilt.render_rays_chunked(rays, torch.ones(3), chunk=5)
    for key in ("rgb", "depth", "opacity"):
        assert torch.equal(a[key], b[key]), key


def test_a_baked_proposal_field_answers_at_its_vertices_as_the_field_does():
    pipeline = Pipeline.build("hashgrid", {"levels": 4, "log2_table": 12}, UNIT, 1.0, 0.2, 0.0, 16, 128,
                              proposal_samples=[32], field_samples=8)
    field = pipeline.proposals[0]
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(std=0.5)
    baked = field.bake(piece=100_000)  # pieces that do not divide its 129^3 vertices
    vertex = torch.randint(0, field.max_resolution + 1, (2000, 3), generator=torch.Generator().manual_seed(0))
    x = UNIT[0] + vertex / field.max_resolution * (UNIT[1] - UNIT[0])
    torch.testing.assert_close(baked.density(x), field.density(x), rtol=1e-4, atol=1e-6)
    # Between vertices the log density is blended; outside the box there is none.
    between = x[:-1] + (x[1:] - x[:-1]) * 0.5 / field.max_resolution
    assert (baked.density(between) > 0).all()
    assert (baked.density(torch.tensor([[1.01, 0.0, 0.0], [0.0, -1.2, 0.0]])) == 0).all()


def cameras_looking_at(eyes: np.ndarray, target: np.ndarray) -> Cameras:
    """Pinhole cameras at `eyes` [N, 3] looking at `target` ([3] or one each), 40x30 pixels, focal 35: half views
    of 0.57 and 0.43."""
    n = len(eyes)
    targets = np.broadcast_to(target, eyes.shape)
    c2w = torch.tensor(np.stack([look_at(eye, aim)[:3] for eye, aim in zip(eyes, targets)]), dtype=torch.float32)
    return Cameras(c2w, torch.full((n,), 35.0), torch.full((n,), 35.0), torch.full((n,), 20.0), torch.full((n,), 15.0),
                   torch.full((n,), 40), torch.full((n,), 30), torch.zeros(n, 6), torch.zeros(n, dtype=torch.bool))


def test_an_unbounded_export_meshes_the_cube_the_cameras_look_at():
    """The default export box of an unbounded scene: a cube about the point the cameras look at, as wide as their
    median view there (distance x the narrower half field of view), reaching out of the inner box (the fox's head)
    but inside the scene box; forward-facing cameras have no such point and keep the inner box."""
    pipeline = Pipeline.build("hashgrid", {"levels": 4, "log2_table": 12}, UNIT * 4, 4.0, 0.2, 0.0, 16, 128,
                              proposal_samples=[32, 16], field_samples=8)
    target = np.array([0.3, -0.2, 0.1])
    angles = np.linspace(0, np.pi, 9)  # an arc around the object, 3 units away
    eyes = target + 3 * np.stack([np.cos(angles), np.sin(angles), np.full(9, 0.3)], 1) / np.hypot(1, 0.3)
    box, rule = export_box(pipeline, torch.eye(4), None, cameras_looking_at(eyes, target))
    half = 3 * 15 / 35
    expected = torch.tensor(np.stack([target - half, target + half]), dtype=torch.float32)
    assert torch.allclose(box, expected, atol=1e-4) and "cameras look at" in rule
    far = export_box(pipeline, torch.eye(4), None, cameras_looking_at(target + 4 * (eyes - target), target))[0]
    assert torch.allclose(far[0], torch.tensor([-4.0, -4.0, -4.0])) and far[1, 0] == 4.0  # the scene box's bound
    forward = np.stack([(x, 3.0, z) for x in (-0.5, 0, 0.5) for z in (-0.3, 0.3)])
    box, rule = export_box(pipeline, torch.eye(4), None, cameras_looking_at(forward, forward + [0, -5.0, 0]))
    assert torch.equal(box, UNIT) and "no point" in rule


def fit_config(scene, **overrides) -> FitConfig:
    options = dict(scene=str(scene), out="", field_options={"levels": 8, "log2_table": 15, "max_resolution": 256},
                   batch_rays=512, sample_budget=2**14, steps=400, log_every=10, device="cpu", sampler="proposal",
                   proposal_samples=[64, 32], field_samples=24)
    return FitConfig(**(options | overrides))


def test_proposal_sampler_fits_a_scene(tiny_scene):
    """Trained with the interlevel and distortion losses, the proposal fields learn where the object is: a fit
    of the generated scene reaches the occupancy sampler's floor (tests/test_fit.py) with 24 field samples per
    ray, and the proposal weights come to bound the field's."""
    scene = load_scene(tiny_scene)
    trainer = Trainer(fit_config(tiny_scene), scene)
    assert trainer.cfg.distortion == 0.002 and trainer.pipeline.grid is None
    trainer.run()
    result = evaluate(trainer.pipeline, scene.splits["test"], stride=1, chunk=8192)
    assert result["mean"]["psnr"] > 24.0, result["mean"]
    assert trainer.samples_seen / trainer.items_seen == pytest.approx(24)
    rays = scene.splits["train"].sample(1024, torch.Generator().manual_seed(3)).rays
    out = trainer.pipeline.render(rays, torch.ones(3))
    assert float(out["interlevel"].detach()) < 0.05
    # Baked into grids, the proposal fields place the field's samples as they do themselves: the renders agree to
    # 35 dB. Small renders (this evaluation's) are not worth a bake; nothing stays baked after the block.
    test = scene.splits["test"].cameras
    pipeline = trainer.pipeline
    with pipeline.baked_proposals(test):
        assert pipeline.baked is None
    unbaked = pipeline.render_view(test, 0)["rgb"]
    with pipeline.baked_proposals():
        assert [b.grid.shape[0] for b in pipeline.baked] == [129, 257]
        baked = pipeline.render_view(test, 0)["rgb"]
    assert pipeline.baked is None
    assert -10 * torch.log10((baked - unbaked).square().mean()) > 35
    # The exporters query the same field: its mesh spans the generated object's.
    mesh, _ = extract_mesh(trainer.pipeline, scene.splits["train"].cameras, scene.to_unit, resolution=48)
    truth = trimesh.load(tiny_scene / "mesh.ply")
    assert np.abs(mesh.vertices.min(0) - truth.bounds[0]).max() < 0.15
    assert np.abs(mesh.vertices.max(0) - truth.bounds[1]).max() < 0.15


def test_sampler_auto_picks_proposal_for_unbounded_scenes(tiny_scene):
    cfg = FitConfig(scene=str(tiny_scene), out="")
    assert cfg.resolved(torch.device("cpu"), unbounded=True).sampler == "proposal"
    bounded = cfg.resolved(torch.device("cpu"))
    assert bounded.sampler == "occupancy" and bounded.distortion == 0.0
    with pytest.raises(ValueError, match="--proposal-samples"):
        FitConfig.from_json(cfg.to_json() | {"proposal_samples": [0]})
    older = {k: v for k, v in cfg.to_json().items() if k != "sampler"}  # a run made before the proposal sampler
    assert FitConfig.from_json(older).resolved(torch.device("cpu"), unbounded=True).sampler == "occupancy"


def test_gradient_scaling_is_on_for_unbounded_scenes_unless_set(tiny_scene):
    cpu = torch.device("cpu")
    cfg = FitConfig(scene=str(tiny_scene), out="")
    assert cfg.resolved(cpu, unbounded=True).gradient_scaling is True
    assert cfg.resolved(cpu).gradient_scaling is False
    assert FitConfig(scene=str(tiny_scene), out="", gradient_scaling=False).resolved(cpu, unbounded=True) \
        .gradient_scaling is False
    older = {k: v for k, v in cfg.to_json().items() if k != "gradient_scaling"}  # a run made before it: off
    assert FitConfig.from_json(older).resolved(cpu, unbounded=True).gradient_scaling is False
