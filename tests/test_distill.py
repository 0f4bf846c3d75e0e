"""`recon distill`: a student of another backend learns a trained teacher's field (progressive volume
distillation): analytic teachers (a density and colour ball, an SDF sphere) learnt at the samples, a trained
teacher's renders, and the run it writes is an ordinary run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_fit import small_config

from recon.app import distill
from recon.app.cli import main
from recon.app.cli_shared import load_run
from recon.app.distill import (
    LOG_DENSITY_RANGE,
    VIEW_TURN,
    DistillTask,
    HardRays,
    clamped_log_density,
    heavy_samples,
    turned,
)
from recon.app.metrics import psnr
from recon.app.tasks import RadianceTask
from recon.app.trainer import Trainer
from recon.data.rays import Rays
from recon.data.scene import load_scene
from recon.renderers.packing import Samples

SMALL_HASHGRID = ["-o", "levels=8", "-o", "log2_table=15", "-o", "max_resolution=256"]
TEACHER = [*SMALL_HASHGRID, "--grid-resolution", "32", "--device", "cpu", "--no-viewer"]


@pytest.fixture(scope="module")
def teacher(tiny_scene, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    main(["fit", str(tiny_scene), "--steps", "400", "--out", str(run), *TEACHER])
    return run


def test_clamped_log_density_has_no_gradient_outside_its_range():
    density = torch.tensor([0.0, 1e-3, 1.0, 1e4], requires_grad=True)
    value = clamped_log_density(density)
    value.sum().backward()
    assert torch.allclose(value, torch.tensor([LOG_DENSITY_RANGE[0], LOG_DENSITY_RANGE[0], 0.0, LOG_DENSITY_RANGE[1]]))
    assert torch.equal(density.grad, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # empty space and zeros: no pull, no NaN


def test_pvd_al_points_are_each_opaque_rays_heaviest_samples():
    # Ray 0: ten samples, opaque; ray 1: four, mostly transparent; ray 2: none.
    ray_idx = torch.tensor([0] * 10 + [1] * 4)
    samples = Samples(ray_idx, torch.zeros(14), torch.ones(14), n_rays=3)
    weights = torch.tensor([0.01, 0.3, 0.02, 0.2, 0.1, 0.05, 0.15, 0.03, 0.04, 0.06, 0.1, 0.05, 0.02, 0.01])
    heavy = heavy_samples(weights, torch.tensor([0.96, 0.18, 0.0]), samples)
    assert heavy.nonzero().flatten().tolist() == [1, 3, 4, 6]  # rank <= 0.3 x 10: the four heaviest of ray 0


def test_pvd_al_hard_rays_fill_a_pool_then_take_the_places_of_those_replayed():
    pool = HardRays(size=4)
    generator = torch.Generator().manual_seed(0)

    def batch(first):
        origins = torch.arange(first, first + 10, dtype=torch.float32)[:, None].expand(10, 3)
        return Rays(origins.contiguous(), torch.ones(10, 3))

    for first in (0, 10):  # the two worst of each batch (the largest origins here) fill it
        assert pool.draw(2, generator) is None
        rays = batch(first)
        pool.add(rays, rays.origins[:, 0], 2)
    assert sorted(pool.pool.origins[:, 0].tolist()) == [8, 9, 18, 19]
    replayed = pool.draw(2, generator)
    assert len(replayed) == 2 and set(replayed.origins[:, 0].tolist()) <= {8, 9, 18, 19}
    rays = batch(100)
    pool.add(rays, rays.origins[:, 0], 2)  # the new worst take the replayed rays' places
    kept = {8, 9, 18, 19} - set(replayed.origins[:, 0].tolist())
    assert sorted(pool.pool.origins[:, 0].tolist()) == sorted(kept | {108, 109})


CENTRE, RADIUS = torch.tensor([0.15, -0.1, 0.05]), 0.35  # off the box's centre, where an untrained SDF sits


def analytic_teacher(scene, cfg):
    """A teacher pipeline of `cfg`'s kind whose field is closed-form: a radiance ball (density 30 inside, a
    colour ramp) or the exact SDF of a sphere with that ramp for colour; its grid updated from it."""
    cpu = torch.device("cpu")
    teacher = RadianceTask(cfg.resolved(cpu, "radiance", False), scene, cpu).pipeline
    field = teacher.field

    def colour(x):
        return torch.sigmoid(3 * x)

    if teacher.is_surface:
        def sdf_gradient(x, create_graph=False):
            offset = x - CENTRE
            return offset.norm(dim=-1) - RADIUS, x.new_zeros(len(x), 15), F.normalize(offset, dim=-1)

        field.sdf_gradient, field.sdf = sdf_gradient, lambda x: sdf_gradient(x)[0]
        field.color = lambda x, d, normal, features: colour(x)
        with torch.no_grad():
            field.variance.fill_(math.log(300.0) / 10)
            field.progress.fill_(1.0)  # a trained field: NeuS's cosine annealed
    else:
        def ball(x, d=None):
            density = 30 * torch.sigmoid((RADIUS - (x - CENTRE).norm(dim=-1)) / 0.02)
            return density if d is None else {"density": density, "rgb": colour(x)}

        field.forward, field.density = ball, ball
    for _ in range(4):
        teacher.grid.update(teacher.density_fn, warmup=True)
    return teacher


def near_the_surface(count=4000):
    """Points within 0.05 of the sphere, and their exact distances and normals."""
    g = torch.Generator().manual_seed(1)
    normals = F.normalize(torch.randn(count, 3, generator=g), dim=-1)
    distances = (torch.rand(count, generator=g) - 0.5) * 0.1
    return CENTRE + normals * (RADIUS + distances[:, None]), distances, normals


@pytest.mark.parametrize("model", ["radiance", "sdf"])
def test_a_student_converges_to_an_analytic_teacher(tiny_scene, monkeypatch, model):
    scene = load_scene(tiny_scene)
    cfg = small_config(tiny_scene, model=model, steps=150, sample_budget=2**13)
    teacher = analytic_teacher(scene, cfg)
    monkeypatch.setattr(distill, "load_teacher", lambda path: teacher)
    student_cfg = dataclasses.replace(cfg, field="voxel", field_options={"num_voxels": 48**3},
                                      distilled_from={"run": "analytic", "method": distill.METHOD})
    trainer = Trainer(student_cfg, scene)
    trainer.run()
    field = trainer.pipeline.field.eval()
    x, distances, normals = near_the_surface()
    with torch.no_grad():
        if model == "sdf":  # the distance and its gradient: the sphere's
            sdf, _, gradient = field.sdf_gradient(x, create_graph=False)
            assert (sdf - distances).abs().mean() < 0.005, (sdf - distances).abs().mean()  # 0.0012 measured
            assert F.cosine_similarity(gradient, normals).mean() > 0.99
            assert torch.equal(field.variance, teacher.field.variance)  # its sharpness carried over
        else:  # the density in PVD's range, inside and out
            error = (clamped_log_density(field.density(x)) - clamped_log_density(teacher.field.density(x))).abs()
            assert error.mean() < 0.3, error.mean()  # 0.17 measured
            # and deep inside, where no ray's weights reach: learnt at the points in the occupied cells
            inside = CENTRE + F.normalize(torch.randn(4000, 3), dim=-1) * 0.7 * RADIUS * torch.rand(4000, 1)
            error = (clamped_log_density(field.density(inside)) - math.log(30)).abs()
            assert error.mean() < 0.3, error.mean()  # 0.60 without those points
    # Where it renders, it renders as the teacher does.
    test = scene.splits["test"]
    for index in range(len(test)):
        assert psnr(trainer.pipeline.render_view(test.cameras, index)["rgb"],
                    teacher.render_view(test.cameras, index)["rgb"]) > 40.0  # 52-56 dB measured


def test_a_neurbf_sdf_student_places_its_kernels_by_the_teachers_distance(tiny_scene, monkeypatch):
    scene = load_scene(tiny_scene)
    cfg = small_config(tiny_scene, model="sdf")
    teacher = analytic_teacher(scene, cfg)
    monkeypatch.setattr(distill, "load_teacher", lambda path: teacher)
    cpu = torch.device("cpu")
    student_cfg = dataclasses.replace(cfg, field="neurbf", field_options={"kernels": 300},
                                      distilled_from={"run": "analytic"})
    task = DistillTask(student_cfg.resolved(cpu, "radiance", False), scene, cpu)
    task.prepare()
    field = task.pipeline.field
    assert bool(field.kernels_placed) and not field.update(0.2)  # placed before the first step, not again
    centres = field.aabb[0] + field.encoding.rbf.centres / field.encoding.aspect * (field.aabb[1] - field.aabb[0])
    assert ((centres - CENTRE).norm(dim=-1) - RADIUS).abs().lt(0.05).float().mean() > 0.4


def test_a_proposal_teachers_student_learns_its_density_through_its_inner_box(tiny_scene, monkeypatch):
    scene, cpu = load_scene(tiny_scene), torch.device("cpu")
    cfg = small_config(tiny_scene, sampler="proposal").resolved(cpu, "radiance", False)
    teacher = RadianceTask(cfg, scene, cpu).pipeline
    assert teacher.grid is None
    monkeypatch.setattr(distill, "load_teacher", lambda path: teacher)
    student_cfg = dataclasses.replace(cfg, field="voxel", field_options={"num_voxels": 16**3},
                                      distilled_from={"run": "untrained"})
    task = DistillTask(student_cfg, scene, cpu)
    generator = torch.Generator().manual_seed(0)
    # no grid says where the density is: the points off the rays fill the inner box uniformly
    lo, hi = teacher.inner_box
    points = (task.occupied_points(4000, generator) - lo) / (hi - lo)
    assert points.min() >= 0 and points.max() <= 1
    assert torch.allclose(points.mean(0), torch.full((3,), 0.5), atol=0.02)
    loss = task.loss(generator).loss
    loss.backward()
    assert loss.isfinite() and task.pipeline.field.density_grid.grid.grad.abs().sum() > 0


def test_pvd_al_hard_views_are_the_worst_rendered_seen_again_turned(tiny_scene, monkeypatch):
    scene = load_scene(tiny_scene)
    cfg = small_config(tiny_scene)
    teacher = analytic_teacher(scene, cfg)
    monkeypatch.setattr(distill, "load_teacher", lambda path: teacher)
    cpu = torch.device("cpu")
    student_cfg = dataclasses.replace(cfg, field="voxel", field_options={"num_voxels": 16**3},
                                      distilled_from={"run": "analytic"})
    task = DistillTask(student_cfg.resolved(cpu, "radiance", False), scene, cpu)
    generator = torch.Generator().manual_seed(0)
    assert task.hard_view_rays(100, generator) is None  # no errors yet
    views = torch.arange(len(task.train)).repeat(3)  # every view seen; 3, 5, 7 and 9 rendered worst
    task.note_view_errors(views, torch.isin(views, torch.tensor([3, 5, 7, 9])).float() + 0.1)
    rays = task.hard_view_rays(500, generator)
    centres = task.train.cameras.c2w[[3, 5, 7, 9], :, 3]
    # the 4 worst of 40: a tenth (distances subtracted directly: cdist's matrix-product form rounds to ~1e-3)
    assert (rays.origins[:, None] - centres[None]).norm(dim=-1).min(1).values.max() < 1e-5
    assert torch.allclose(rays.dirs.norm(dim=-1), torch.ones(500), atol=1e-5)

    dirs = F.normalize(torch.randn(2000, 3, generator=generator), dim=-1)
    angle = torch.acos((turned(dirs, generator) * dirs).sum(-1).clamp(-1, 1))
    assert angle.max() <= 3**0.5 * VIEW_TURN + 1e-4 and angle.mean() > VIEW_TURN / 2  # turned, within bounds


def test_a_voxel_student_learns_the_hash_grid_teacher_and_its_run_is_a_run(teacher, tiny_scene, tmp_path):
    student = tmp_path / "student"
    main(["distill", str(teacher), "--field", "voxel", "--steps", "300", "--out", str(student), "--no-viewer"])
    config = json.loads((student / "config.json").read_text())
    assert config["field"] == "voxel" and config["distilled_from"]["run"] == str(teacher.absolute())
    assert "PVD" in config["distilled_from"]["method"]
    assert config["lr"] == 2 * json.loads((teacher / "config.json").read_text())["lr"]  # twice the teacher's rate
    sdf = small_config(tiny_scene, model="sdf")
    assert distill.student_lr(sdf) == sdf.lr  # an SDF student's: the teacher's

    # The student renders what the teacher renders (its target), and the photos nearly as well as the teacher.
    test = load_scene(tiny_scene).splits["test"]
    _, _, teacher_pipeline, _ = load_run(str(teacher))
    _, _, student_pipeline, _ = load_run(str(student))
    for index in range(len(test)):
        taught = teacher_pipeline.render_view(test.cameras, index)["rgb"]
        learnt = student_pipeline.render_view(test.cameras, index)["rgb"]
        assert psnr(learnt, taught) > 30.0
    scores = {name: json.loads((run / "metrics.json").read_text())["mean"]["psnr"] for name, run in
              (("teacher", teacher), ("student", student))}
    assert scores["student"] > scores["teacher"] - 1.5, scores

    # Every command reads it: eval, render, export; a resume continues it as a distillation.
    main(["eval", str(student), "--stride", "2"])
    main(["render", str(student), "--path", "orbit", "--frames", "2", "--downscale", "2"])
    main(["export", "mesh", str(student), "--resolution", "32"])
    main(["fit", "--resume", str(student), "--steps", "320"])
    assert json.loads((student / "metrics.json").read_text())["train"]["steps"] == 320


def test_a_fine_tuning_on_the_photos_follows_the_distillation_and_both_are_reported(teacher, tmp_path):
    student = tmp_path / "student"
    main(["distill", str(teacher), "--field", "hashgrid", *SMALL_HASHGRID, "--steps", "30", "--finetune-steps", "90",
          "--lr", "0.02", "--out", str(student), "--no-viewer"])
    config = json.loads((student / "config.json").read_text())
    assert config["distilled_from"]["finetune"]["from_step"] == 30 and config["steps"] == 120
    assert config["lr"] == 0.02  # as given
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 120
    # 30 steps from the teacher leave the student short of it; 90 more on the photos bring it closer to them.
    assert metrics["mean"]["psnr"] > metrics["eval"]["distilled"]["psnr"], metrics


def test_what_cannot_be_distilled_is_one_line_and_nothing_is_lost(teacher, tmp_path, capsys):
    before = sorted(p.name for p in teacher.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(teacher), "--field", "vm", "--out", str(teacher), "--overwrite", "--no-viewer"])
    assert exit_info.value.code == 2 and "holds the teacher run" in capsys.readouterr().err
    assert sorted(p.name for p in teacher.iterdir()) == before

    image = tmp_path / "image"
    (image / "checkpoints").mkdir(parents=True)
    config = json.loads((teacher / "config.json").read_text()) | {"task": "image"}
    (image / "config.json").write_text(json.dumps(config))
    for checkpoint in (teacher / "checkpoints").iterdir():
        (image / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(image), "--field", "vm", "--out", str(tmp_path / "out"), "--no-viewer"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "of task image" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
