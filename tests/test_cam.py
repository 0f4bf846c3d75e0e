"""CAM: the identity at gamma = 1, beta = 0, outputs independent of batching, gradients into every grid,
the 8-bit quantiser, reloads, and small fits of an image and a sphere SDF."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from recon.app.config import FitConfig
from recon.app.pipeline import Pipeline
from recon.app.tasks import ImageTask, cam_options
from recon.app.trainer import Trainer
from recon.data.targets import load_image, load_mesh
from recon.fields import build_field
from recon.fields.cam import LR_FACTOR, Modulation, direction_coordinates, quantize_straight_through

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
IMAGE_BOX = torch.tensor([[0.0, 0.0], [40.0, 30.0]])
RADIANCE = {"hashgrid": {"levels": 4, "log2_table": 12, "max_resolution": 64},
            "pe": {"depth": 5, "width": 32, "frequencies": 4},
            "voxel": {"num_voxels": 16**3, "upscale_at": []}}


def queries(n: int, dims: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dims, generator=g) * 2 - 1,
            torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1))


def perturb(field) -> None:
    with torch.no_grad():
        for m in field.modules():
            if isinstance(m, Modulation):
                m.grid.add_(0.3 * torch.randn_like(m.grid))


@pytest.mark.parametrize("kind", ["direction", "triplane"])
@pytest.mark.parametrize("name", sorted(RADIANCE))
def test_untouched_grids_without_normalisation_are_the_base_mlp(name, kind):
    torch.manual_seed(0)
    base = build_field(name, BOX, **RADIANCE[name])
    cam = build_field(name, BOX, **RADIANCE[name])
    cam.load_state_dict(base.state_dict())
    cam.enable_cam(kind, resolution=8, normalize=False)
    x, d = queries(300)
    a, b = base(x, d), cam(x, d)
    # Equal up to the rounding of the grids' bilinear weights, whose sum is 1 within an ulp or two.
    tolerance = {"atol": 1e-6, "rtol": 1e-6}
    assert torch.allclose(a["density"], b["density"], **tolerance) and torch.allclose(a["rgb"], b["rgb"], **tolerance)
    assert torch.allclose(base.density(x), cam.density(x), **tolerance)


def test_which_mlps_are_modulated():
    pe = build_field("pe", BOX, **RADIANCE["pe"])
    pe.enable_cam("direction")
    assert pe.trunk.modulation is not None and pe.color_net.modulation is None  # NeRF's colour branch is not
    grid = build_field("hashgrid", BOX, **RADIANCE["hashgrid"])
    grid.enable_cam("triplane", resolution=16)
    assert grid.head.density_net.modulation is not None and grid.head.color_net.modulation is not None
    assert grid.head.density_net.modulation.grid.shape == (1, 3, 2, 16, 16)  # one layer, 3 planes, gamma and beta


@pytest.mark.parametrize("task, kind", [("image", "plane"), ("sdf", "triplane"), ("radiance", "direction")])
def test_a_points_output_does_not_depend_on_its_batch(task, kind):
    box = IMAGE_BOX if task == "image" else BOX
    field = build_field("pe", box, task=task, **({"hidden": 32, "layers": 3, "frequencies": 4} if task != "radiance"
                                                 else RADIANCE["pe"]))
    field.enable_cam(kind, resolution=8)
    perturb(field)
    field.eval()
    x, d = queries(4096, box.shape[1], seed=1)
    x = box[0] + (x + 1) / 2 * (box[1] - box[0])
    key = "rgb" if task == "image" else "sdf" if task == "sdf" else "density"
    with torch.no_grad():
        whole = field(x, d)[key]
        alone = torch.stack([field(x[i : i + 1], d[i : i + 1])[key][0] for i in (0, 17, 4095)])
        tiles = torch.cat([field(p, q)[key] for p, q in zip(x.split(1000), d.split(1000))])
    assert torch.allclose(alone, whole[[0, 17, 4095]], atol=1e-6) and torch.allclose(tiles, whole, atol=1e-6)


@pytest.mark.parametrize("kind", ["plane", "direction", "triplane"])
def test_gradients_reach_every_grid_and_both_gamma_and_beta(kind):
    box = IMAGE_BOX if kind == "plane" else BOX
    field = build_field("pe", box, task="image" if kind == "plane" else "radiance",
                        **({"hidden": 16, "layers": 2, "frequencies": 3} if kind == "plane" else RADIANCE["pe"]))
    field.enable_cam(kind, resolution=6)
    x, d = queries(2000, box.shape[1])
    x = box[0] + (x + 1) / 2 * (box[1] - box[0])
    out = field(x, d)
    (out["rgb"].square().mean() + (out["density"].mean() if "density" in out else 0)).backward()
    grids = [m.grid for m in field.modules() if isinstance(m, Modulation)]
    assert grids
    for grid in grids:
        gamma, beta = (grid[:, :, i] if kind == "triplane" else grid[:, i] for i in (0, 1))
        g = grid.grad
        g_gamma, g_beta = (g[:, :, i] if kind == "triplane" else g[:, i] for i in (0, 1))
        assert g_gamma.abs().sum() > 0 and g_beta.abs().sum() > 0
    groups = {g["name"]: g for g in field.optimizer_groups(1e-2)}
    cam_group = next(g for name, g in groups.items() if name.endswith("-cam"))
    mlp_group = groups[next(name for name in groups if not name.endswith("-cam"))]
    # images: 10x the MLP's rate (1e-3 here, the official FFN's), never above the base rate
    assert cam_group["lr"] == pytest.approx(min(LR_FACTOR[kind] * mlp_group["lr"], 1e-2))
    assert {id(p) for p in cam_group["params"]} == {id(p) for p in grids}


def test_cam_grids_never_outpace_the_grid_encodings():
    """Beside a hash grid's decoder (which trains at the base rate) the image grids' 10x is capped."""
    field = build_field("hashgrid", torch.tensor([[0.0, 0.0], [1.0, 1.0]]), task="image", levels=2, log2_table=8)
    field.enable_cam("plane", resolution=4)
    rates = {g["name"]: g["lr"] for g in field.optimizer_groups(1e-2)}
    assert rates["mlp"] == pytest.approx(1e-2) and rates["mlp-cam"] == pytest.approx(1e-2)


def test_cam_norm_is_the_papers_unless_chosen():
    for chosen, expected in ((None, None), (False, False), (True, True)):
        cfg = FitConfig(scene="photo.png", out="", cam="auto", cam_norm=chosen)
        assert cam_options(cfg, ImageTask)["normalize"] is expected
    assert Modulation("plane", 2).normalize and not Modulation("plane", 2, normalize=False).normalize
    assert not Modulation("triplane", 2, resolution=4).normalize


def test_eight_bit_quantiser_is_min_max_straight_through():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0], requires_grad=True)
    q = quantize_straight_through(w, 8)
    steps = q.detach() / 2.0 * 127  # s = max |w| = 2: every value on the 127-step lattice
    assert (torch.allclose(steps, steps.round(), atol=1e-4)
            and (q.detach() - w.detach()).abs().max() <= 2.0 / 127 / 2 + 1e-6)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones(5))


def test_direction_coordinates():
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    coords = direction_coordinates(d)
    assert torch.allclose(coords[:, 0], torch.tensor([0.0, 0.5, 0.0, 1.0]))  # azimuth / pi
    assert torch.allclose(coords[:, 1], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # elevation / (pi / 2)


def test_cam_reloads_with_its_grids():
    pipeline = Pipeline.build("hashgrid", RADIANCE["hashgrid"], BOX, 1.0, 0.0, 0.0, 8, 64,
                              cam={"kind": "triplane", "resolution": 8, "bits": 8, "normalize": True})
    perturb(pipeline.field)
    reloaded = Pipeline.from_state(pipeline.state_dict()).field
    assert reloaded.cam == pipeline.field.cam
    assert all(m.normalize for m in reloaded.modules() if isinstance(m, Modulation))  # not the variant's default
    x, d = queries(200)
    assert torch.equal(reloaded(x, d)["rgb"], pipeline.field(x, d)["rgb"])


def fit(target, field: str, options: dict, steps: int, cam: str | None) -> Trainer:
    cfg = FitConfig(scene=str(target.path), out="", field=field, field_options=options, steps=steps, cam=cam,
                    batch_points=4096, sdf_pool=2**15, log_every=50, eval_chunk=4096, device="cpu")
    trainer = Trainer(cfg, target)
    trainer.run()
    return trainer


def test_cam_fits_an_image_and_a_sphere_sdf(tmp_path):
    y, x = np.mgrid[0:32, 0:40] / 32.0
    image = np.stack([0.5 + 0.4 * np.sin(6 * x) * np.cos(5 * y), 0.2 + 0.6 * (x > 0.6), 0.3 + 0.5 * y], -1)
    imageio.imwrite(tmp_path / "photo.png", (image * 255).astype(np.uint8))
    pe = {"hidden": 64, "layers": 3, "frequencies": 6}
    plain = fit(load_image(tmp_path / "photo.png"), "pe", pe, 300, None).task.evaluate(None)["mean"]["psnr"]
    modulated = fit(load_image(tmp_path / "photo.png"), "pe", pe, 300, "auto").task.evaluate(None)["mean"]["psnr"]
    assert modulated > 28 and modulated > plain, (plain, modulated)

    trimesh.creation.icosphere(subdivisions=3, radius=0.8).export(tmp_path / "sphere.obj")
    scores = fit(load_mesh(tmp_path / "sphere.obj"), "hashgrid", {"levels": 6, "log2_table": 12, "max_resolution": 64},
                 200, "auto").task.evaluate(None)["mean"]
    assert scores["iou"] > 0.97 and scores["normal_angle_deg"] < 10, scores
