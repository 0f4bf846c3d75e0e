"""Schedules, checkpoints, metrics and render paths, against independent arithmetic."""

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from recon.app.checkpoint import latest_checkpoint, load_checkpoint, load_resizing, save_checkpoint
from recon.app.config import PRESETS, FitConfig
from recon.app.metrics import ground_truth_on_white, psnr, ssim
from recon.app.pipeline import Pipeline
from recon.app.schedules import FINAL_LEARNING_RATE_FACTOR, Progress, learning_rate_factor
from recon.data.camera_paths import orbit_cameras
from recon.fields import REGISTRY


def test_learning_rate_schedule_shape():
    assert learning_rate_factor(0.0) == pytest.approx(0.01)
    assert learning_rate_factor(0.01) == pytest.approx(1.0)
    assert learning_rate_factor(0.6) == pytest.approx(0.33)
    assert learning_rate_factor(0.95) == pytest.approx(0.33**3)
    assert learning_rate_factor(1.0) == FINAL_LEARNING_RATE_FACTOR == learning_rate_factor(0.9)


def test_progress_is_the_further_of_steps_and_time():
    progress = Progress(steps=100, max_time=10.0, step=30, seconds=5.0)
    assert progress.value == pytest.approx(0.5)
    progress.step = 100
    assert progress.done
    with pytest.raises(ValueError):
        Progress(steps=None, max_time=None)


def test_checkpoint_atomic_latest_and_roundtrip(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 5, {"step": 5, "x": torch.arange(3)})
    save_checkpoint(folder, 9, {"step": 9, "x": torch.arange(4)})
    latest = latest_checkpoint(folder)
    assert latest.name == "step-0000009.pt"
    assert torch.equal(load_checkpoint(latest)["x"], torch.arange(4))
    assert not list(folder.glob(".*.tmp"))  # no temporary files left behind


def test_load_resizing_takes_the_checkpoint_shapes():
    small, large = torch.nn.Linear(2, 3), torch.nn.Linear(5, 7)
    load_resizing(small, large.state_dict())
    assert small.weight.shape == (7, 5)
    assert torch.equal(small.weight, large.weight)


def test_psnr_matches_closed_form():
    gt = torch.zeros(8, 8, 3)
    pred = torch.full((8, 8, 3), 0.1)
    assert psnr(pred, gt) == pytest.approx(20.0)
    assert psnr(torch.full((8, 8, 3), 2.0), torch.ones(8, 8, 3)) == math.inf  # predictions are clipped


def test_ground_truth_is_composited_on_white_and_quantised():
    rgba = torch.tensor([[[1.0, 0.0, 0.0, 0.5], [0.2, 0.2, 0.2, 0.0]]])
    out = ground_truth_on_white(rgba)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 128 / 255, 128 / 255]))
    assert torch.allclose(out[0, 1], torch.ones(3))


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM with an 11x11 Gaussian (sigma 1.5), valid region, written with scipy."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    scores = []
    for c in range(a.shape[2]):
        f = lambda img: convolve2d(img, w, mode="valid")  # noqa: E731
        x_, y_ = a[..., c], b[..., c]
        mx, my = f(x_), f(y_)
        vx, vy, cxy = f(x_ * x_) - mx**2, f(y_ * y_) - my**2, f(x_ * y_) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        scores.append(s.mean())
    return float(np.mean(scores))


def test_ssim_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.random((32, 40, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(torch.tensor(b), torch.tensor(a)) == pytest.approx(reference_ssim(b, a), abs=1e-9)
    assert ssim(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)


def test_presets_fill_only_what_the_user_left_unset():
    cfg = FitConfig(scene="s", out="o", batch_rays=512, field_options={"levels": 12})
    cpu = cfg.resolved(torch.device("cpu"))
    assert cpu.preset == "cpu" and cpu.batch_rays == 512
    assert cpu.sample_budget == PRESETS["cpu"]["sample_budget"]
    assert cpu.occupancy_resolution == PRESETS["cpu"]["occupancy_resolution"]
    assert cpu.field_options == {"levels": 12, "log2_table": 17}  # the hash grid's CPU preset, under the user's
    assert cpu.resolved(torch.device("cuda")) == cpu  # resolving is idempotent, even on another device
    gpu = FitConfig(scene="s", out="o").resolved(torch.device("cuda"))
    assert gpu.preset == "gpu" and gpu.field_options == {} and gpu.samples_per_diagonal == 1024
    with pytest.raises(ValueError, match="unknown preset"):
        FitConfig(scene="s", out="o", preset="tpu").resolved(torch.device("cpu"))


@pytest.mark.parametrize("backend", sorted(REGISTRY))
def test_every_backend_builds_an_sdf_from_images_at_its_cpu_preset(backend):
    cfg = FitConfig(scene="s", out="o", field=backend, model="sdf").resolved(torch.device("cpu"))
    box = torch.tensor([[-1.0] * 3, [1.0] * 3])
    pipeline = Pipeline.build(backend, cfg.field_options, box, 1.0, 0.0, 0.0, 16, 256, model="sdf")
    assert pipeline.is_surface
    if backend == "hashgrid":  # the radiance field's CPU size, which the SDF's encoding shares
        assert cfg.field_options == {"levels": 8, "log2_table": 17}


def cameras_at(azimuths_deg, distance=4.0, height=1.0):
    from geometry import look_at

    from recon.data.cameras import Cameras

    a = np.radians(azimuths_deg)
    eyes = np.stack([distance * np.cos(a), distance * np.sin(a), np.full_like(a, height)], -1)
    n = len(eyes)
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)
    c2w = torch.tensor(np.stack([look_at(e)[:3] for e in eyes]), dtype=torch.float32)
    return Cameras(c2w, full(50.0), full(50.0), full(32.0), full(32.0), full(64, torch.long), full(64, torch.long),
                   torch.zeros(n, 6), torch.zeros(n, dtype=torch.bool))


def orbit_azimuths(cameras) -> np.ndarray:
    centres = cameras.c2w[:, :, 3].numpy()
    return np.degrees(np.arctan2(centres[:, 1], centres[:, 0]))


@pytest.mark.parametrize("captured, full_circle", [(np.arange(0, 360, 30), True), (np.linspace(-60, 50, 12), False)])
def test_orbit_circles_surrounding_captures_and_sweeps_forward_facing_ones(captured, full_circle):
    orbit = orbit_cameras(cameras_at(captured), 24)
    azimuths = orbit_azimuths(orbit)
    # At the captures' distance and height (the up axis, the mean of the cameras' up vectors, tilts a
    # little towards a partial ring's middle).
    assert torch.allclose(orbit.c2w[:, :, 3].norm(dim=-1), torch.tensor(17.0).sqrt(), rtol=0.02)
    assert torch.allclose(orbit.c2w[:, 2, 3], torch.tensor(1.0), atol=0.1)
    # Every orbit camera looks at the target the captures share (the origin).
    towards = -orbit.c2w[:, :, 2]
    assert torch.allclose(torch.linalg.cross(towards, -orbit.c2w[:, :, 3]), torch.zeros(24, 3), atol=1e-4)
    if full_circle:
        assert np.ptp(np.unwrap(np.radians(azimuths))) > np.radians(330)
    else:  # forward-facing: never behind the scene, and the whole covered arc is swept
        assert azimuths.min() >= -61 and azimuths.max() <= 51
        assert azimuths.min() < -58 and azimuths.max() > 48
