"""Tasks: how a training batch is drawn, what its loss is, and how the result is scored.

- `RadianceTask`: posed images -> a radiance field, rendered through the occupancy grid or proposal sampling
  (the core task);
- `ImageTask`: an image -> pixel coordinates to colour, L2;
- `MeshSDFTask`: a mesh -> its signed distance, from torch-ngp's surface / near-surface / uniform points,
  with instant-ngp's MAPE loss.

The trainer owns the loop, the optimiser and the schedules; a task owns its data and its pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from recon.app.config import FitConfig
from recon.app.evaluate import evaluate, to_uint8
from recon.app.metrics import psnr, ssim
from recon.app.pipeline import Pipeline
from recon.app.run import UserError
from recon.data.cameras import AppearanceCodes, PoseCorrection, camera_spread
from recon.data.scene import Scene, visual_hull, world_to_unit_box
from recon.data.targets import ImageTarget, MeshTarget, inside_mesh, sample_surface, sdf_samples
from recon.fields import build_field
from recon.renderers import distortion

EIKONAL_WEIGHT = MASK_WEIGHT = 0.1  # NeuS's igr_weight and mask_weight
INTERLEVEL_WEIGHT = 1.0  # mip-NeRF 360's and nerfacto's weight of the proposal (interlevel) loss
# nerfacto anneals the proposal weights over its first 1000 of 30k steps with slope 10; recon's schedules run on
# progress, so over its first 5%; it trains the proposal fields every step at first, then every 5th step, the
# period rising over the first 5000 steps (a sixth of its run).
PROPOSAL_ANNEAL, ANNEAL_SLOPE = 0.05, 10.0
PROPOSAL_EVERY, PROPOSAL_WARMUP = (1, 5), 1 / 6
POSE_LEVELS_FIRST, POSE_LEVELS_OPEN = 0.25, 0.5  # BARF-style level opening while poses are refined
MAPE_EPSILON = 1e-2  # instant-ngp's relative L1 for SDFs: |pred - gt| / (|gt| + eps)
IOU_POINTS = 2**20  # held-out uniform points of the SDF IoU
NORMAL_POINTS = 2**16  # held-out surface points of the normal angular error
MIN_BATCH = 256  # rays or points: the batch never halves below this after running out of memory
EVAL_SEED = 2**31 - 1  # held-out points never share the training points' stream


def pose_coarse_to_fine(levels: int, progress: float) -> float:
    """BARF's coarse-to-fine while poses are refined, on a hash grid's levels: POSE_LEVELS_FIRST of them open at
    the start, the others opening one after another (a smooth window each) until all are at POSE_LEVELS_OPEN of
    the progress. Fine levels fitted to misaligned rays would absorb the misalignment the poses are to learn."""
    first = POSE_LEVELS_FIRST * levels
    return first + (levels - first) * min(1.0, progress / POSE_LEVELS_OPEN)


@dataclass
class Learnable:
    """What a task learns beside the field, with its base learning rate and schedule (app.schedules.SCHEDULES)."""

    module: torch.nn.Module
    lr: float
    schedule: str = "step"


@dataclass
class StepLoss:
    loss: Tensor  # what the step minimises (the field's regulariser is added by the trainer)
    data_loss: Tensor  # the photometric / distance term, for the log
    items: int  # rays, pixels or points in the batch
    samples: int  # field evaluations


class Task:
    kind: str  # metrics.json's "task"
    field_task: str  # which field a backend builds for it (fields.build_field's task)
    cam_coordinate: str  # what `--cam auto` modulates by (fields.cam): the paper's choice for the task
    cam_resolution: int | None = None  # its grids' default side (None: the paper's)
    unit: str  # what a batch item is, for rates ("rays" -> rays_per_second)
    reports_psnr: bool = True  # the data loss is an MSE of colours in [0, 1]
    pipeline: Pipeline

    def prepare(self) -> None:
        """Before the first step of a fresh run (a resumed run loads its state instead)."""

    def before_step(self, step: int, progress: float, generator: torch.Generator) -> None:
        """Upkeep outside the gradient: the occupancy grid."""

    def loss(self, generator: torch.Generator) -> StepLoss:
        raise NotImplementedError

    def after_step(self, result: StepLoss) -> None:
        """Adapt to what the step cost (the ray batch)."""

    def learnable(self) -> dict[str, Learnable]:
        """What the task learns beside the field (camera corrections, appearance)."""
        return {}

    def halve_batch(self) -> str | None:
        """After running out of memory: halve the batch and say what it is now; None at the smallest."""
        if self.cfg.batch_points <= MIN_BATCH:
            return None
        self.cfg.batch_points //= 2
        return f"{self.cfg.batch_points} points"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def evaluate(self, out_dir: Path | None) -> dict[str, Any]:
        """Scores for metrics.json: at least "mean"."""
        raise NotImplementedError


def task_class(target: Scene | ImageTarget | MeshTarget) -> type[Task]:
    """The task a loaded input calls for."""
    return {Scene: RadianceTask, ImageTarget: ImageTask, MeshTarget: MeshSDFTask}[type(target)]


def cam_options(cfg: FitConfig, task: type[Task]) -> dict[str, Any] | None:
    """Field.enable_cam's options from --cam (auto: the task's coordinate), or None."""
    if not cfg.cam:
        return None
    kind = task.cam_coordinate if cfg.cam == "auto" else cfg.cam
    resolution = cfg.cam_resolution or (task.cam_resolution if kind == task.cam_coordinate else None)
    return {"kind": kind, "resolution": resolution, "bits": cfg.cam_bits, "normalize": cfg.cam_norm}


def surface_box(cfg: FitConfig, scene: Scene) -> Tensor | None:
    """--surface-box in the unit frame (None when not given); it must lie inside the scene box."""
    if cfg.surface_box is None:
        return None
    box = world_to_unit_box(torch.tensor(cfg.surface_box, dtype=torch.float64).view(2, 3), scene.to_unit)
    if (box[0] < scene.aabb[0] - 1e-4).any() or (box[1] > scene.aabb[1] + 1e-4).any():
        world = world_to_unit_box(scene.aabb, torch.linalg.inv(scene.to_unit.double())).flatten()
        raise UserError(f"--surface-box {cfg.surface_box}: not inside the scene box "
                        f"{[round(float(v), 3) for v in world]} (world frame)")
    return box


def coordinate_pipeline(cfg: FitConfig, box: Tensor, task: type[Task], device: torch.device) -> Pipeline:
    field = build_field(cfg.field, box, task=task.field_task, **cfg.field_options)
    field.set_quantization(cfg.quantize)
    if cam := cam_options(cfg, task):
        field.enable_cam(**cam)
    return Pipeline(field).to(device)


class RadianceTask(Task):
    kind, field_task, unit, cam_coordinate = "radiance", "radiance", "rays", "direction"

    def __init__(self, cfg: FitConfig, scene: Scene, device: torch.device, pipeline: Pipeline | None = None):
        self.cfg, self.scene = cfg, scene
        options = dict(cfg.field_options, **({"tcnn": True} if cfg.tcnn else {}))
        self.pipeline = pipeline or Pipeline.build(cfg.field, options, scene.aabb, scene.aabb_scale, scene.near,
                                                   scene.cone_angle, cfg.occupancy_resolution, cfg.samples_per_diagonal,
                                                   cfg.quantize, cam_options(cfg, type(self)), cfg.model,
                                                   surface_box(cfg, scene),
                                                   cfg.proposal_samples if cfg.sampler == "proposal" else None,
                                                   cfg.field_samples, scene.forward_facing).to(device)
        self.train = scene.splits["train"].to(device)  # pixels live where the step runs
        self.poses = PoseCorrection(len(self.train)).to(device) if cfg.refine_poses else None
        # Near-camera gradient scaling's unit distance (render_rays); a lone camera has no spread, so none.
        spread = camera_spread(self.train.cameras.c2w) if cfg.gradient_scaling else 0.0
        self.near_scale = spread if spread > 0 else None
        if cfg.appearance and self.pipeline.appearance is None:
            self.pipeline.appearance = AppearanceCodes(len(self.train)).to(device)
        self.device = device
        self.batch_rays = cfg.batch_rays  # resized every step to spend about cfg.sample_budget samples
        self.train_proposals = True  # whether this step's loss trains the proposal fields (before_step)

    def prepare(self) -> None:
        """An RGBA scene: mark empty, for good, every grid cell some training view sees as wholly transparent,
        so marching skips the space around the object from the first step instead of learning it is empty.
        Not for an SDF field: its distance must be learnt positive out there too (space no sample visits keeps
        whatever sign it has, and the zero level set, the mesh, would wander there); its grid prunes itself
        from NeuS's opacity instead."""
        if not self.scene.splits["train"].has_alpha or self.pipeline.is_surface or self.pipeline.grid is None:
            return
        grid = self.pipeline.grid
        centres, half_diagonals = grid.cell_centres()
        _, opaque = visual_hull(self.scene.splits["train"], centres.cpu(), half_diagonals.cpu())
        grid.seed(opaque.view(grid.levels, -1).to(grid.values.device))

    def before_step(self, step: int, progress: float, generator: torch.Generator) -> None:
        encoding = getattr(self.pipeline.field, "encoding", None)  # an SDF field opens its levels by its own clock
        if self.poses is not None and not self.pipeline.is_surface and getattr(encoding, "coarse_to_fine", False):
            encoding.active_levels = pose_coarse_to_fine(encoding.levels, progress)
        if self.pipeline.proposals is not None:
            # nerfacto's schedules: proposal weights^a, a from 0 to 1 early on; the proposal fields learn every
            # step at first, then every PROPOSAL_EVERY[1] steps.
            done = min(progress / PROPOSAL_ANNEAL, 1.0)
            self.pipeline.anneal = ANNEAL_SLOPE * done / ((ANNEAL_SLOPE - 1) * done + 1)
            every = round(float(np.interp(progress, [0, PROPOSAL_WARMUP], PROPOSAL_EVERY)))
            self.train_proposals = step % every == 0
        elif step % self.cfg.occupancy_every == 0:
            with record_function("occupancy_update"):
                self.pipeline.grid.update(self.pipeline.density_fn, warmup=progress < self.cfg.occupancy_warmup,
                                          generator=generator)

    def loss(self, generator: torch.Generator) -> StepLoss:
        with record_function("sample_rays"):
            batch = self.train.sample(self.batch_rays, generator)
            rays, pixels, cam = batch.rays, batch.colours, batch.cameras
            # A random background per ray makes transparency learnable (instant-ngp).
            background = torch.rand(len(rays), 3, generator=generator)
            target = pixels[:, :3]
            if pixels.shape[1] == 4:
                target = target * pixels[:, 3:] + background * (1 - pixels[:, 3:])
            rays, target, background = rays.to(self.device), target.to(self.device), background.to(self.device)
            cam = cam.to(self.device)
            if self.poses is not None:
                rays = self.poses(rays, cam, self.train.cameras.c2w)
        out = self.pipeline.render(rays, background, generator=generator, train_proposals=self.train_proposals,
                                   near_scale=self.near_scale)
        if self.pipeline.appearance is not None:
            out["rgb"] = self.pipeline.appearance(out["rgb"], out["opacity"], background, cam)
        photometric = F.mse_loss(out["rgb"], target)
        loss = photometric
        if self.cfg.distortion:  # measured in the proposal sampler's spacing, as mip-NeRF 360 does
            loss = loss + self.cfg.distortion * distortion(out["weights"], out.get("spacing", out["samples"])).mean()
        if "interlevel" in out:
            loss = loss + INTERLEVEL_WEIGHT * out["interlevel"]
        if batch.depths is not None and self.cfg.depth_weight:  # L1 on the expected depth where a depth map has one
            depths = batch.depths.to(self.device)
            known = depths > 0
            if bool(known.any()):
                loss = loss + self.cfg.depth_weight * (out["depth"][known] - depths[known]).abs().mean()
        if "eikonal" in out:  # an SDF field (NeuS): |grad| = 1, and the opacity follows the alpha mask
            loss = loss + EIKONAL_WEIGHT * out["eikonal"]
            if pixels.shape[1] == 4:
                mask = pixels[:, 3].to(self.device)
                loss = loss + MASK_WEIGHT * F.binary_cross_entropy(out["opacity"].clamp(1e-3, 1 - 1e-3), mask)
        return StepLoss(loss, photometric.detach(), len(rays), out["n_samples"])  # n_samples: a host int

    def after_step(self, result: StepLoss) -> None:
        budget = self.cfg.sample_budget
        if budget and result.samples:
            # nerfacc's rule: scale the next batch by budget / samples spent, in multiples of 256
            # (fewer distinct sizes) and never more rays than the budget has samples.
            rays_wanted = self.batch_rays * budget / result.samples
            self.batch_rays = int(min(max(256, round(rays_wanted / 256) * 256), budget))

    def learnable(self) -> dict[str, Learnable]:
        own = {} if self.poses is None else {"poses": Learnable(self.poses, self.cfg.pose_lr, "exponential")}
        if self.pipeline.appearance is not None:
            own["appearance"] = Learnable(self.pipeline.appearance, self.cfg.lr)
        return own

    def halve_batch(self) -> str | None:
        if self.batch_rays <= MIN_BATCH:
            return None
        self.batch_rays //= 2
        if self.cfg.sample_budget:  # the budget drives the batch size, so it halves too
            self.cfg.sample_budget //= 2
        return f"{self.batch_rays} rays" + (f", {self.cfg.sample_budget} samples" if self.cfg.sample_budget else "")

    def state_dict(self) -> dict[str, Any]:
        return {"batch_rays": self.batch_rays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_rays = state["batch_rays"]

    def evaluate(self, out_dir: Path | None, split: str = "test", stride: int = 1,
                 align_poses: bool | None = None) -> dict[str, Any]:
        """Scores of `split`; its poses aligned to the photos (`align_poses`, by default when poses were refined)."""
        align = self.cfg.refine_poses if align_poses is None else align_poses
        return evaluate(self.pipeline, self.scene.splits[split], stride, self.cfg.eval_chunk, out_dir, align)


class ImageTask(Task):
    """Fit an image: random pixels per step, scored on the whole image (PSNR, SSIM)."""

    kind, field_task, unit, cam_coordinate = "image", "image", "pixels", "plane"

    def __init__(self, cfg: FitConfig, image: ImageTarget, device: torch.device, pipeline: Pipeline | None = None):
        self.cfg, self.image = cfg, image
        self.pipeline = pipeline or coordinate_pipeline(cfg, image.box, type(self), device)
        self.coords = image.pixel_centres().to(device)
        self.colours = image.pixels.view(-1, 3).to(device)
        self.attached = self.pipeline.field.attach(self.coords)  # an encoding may index the pixels once

    def prepare(self) -> None:
        """A data-adaptive encoding (NeuRBF) places itself where the image's Sobel gradient is large."""
        self.pipeline.field.adapt(self.coords, sobel_magnitude(self.image.pixels).view(-1).to(self.coords.device))

    def loss(self, generator: torch.Generator) -> StepLoss:
        pick = torch.randint(len(self.coords), (self.cfg.batch_points,), generator=generator).to(self.coords.device)
        rgb = self.colour(self.pipeline.field.rgb(self.coords[pick], point_ids=pick if self.attached else None))
        mse = F.mse_loss(rgb, self.colours[pick])
        return StepLoss(mse, mse.detach(), len(pick), len(pick))

    def colour(self, rgb: Tensor) -> Tensor:
        """The field's colour as the image has it: a greyscale image's one channel is the mean of the three,
        so nothing tints it."""
        return rgb.mean(-1, keepdim=True).expand_as(rgb) if self.image.grey else rgb

    @torch.no_grad()
    def reconstruction(self) -> Tensor:
        """The field over every pixel centre: [H, W, 3] in [0, 1]."""
        field = self.pipeline.field
        was_training = field.training
        field.eval()
        rgb = torch.cat([self.colour(field.rgb(c)) for c in self.coords.split(self.cfg.eval_chunk)])
        field.train(was_training)
        return rgb.clamp(0, 1).view(self.image.height, self.image.width, 3).cpu()

    def evaluate(self, out_dir: Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        pred, gt = self.reconstruction(), self.image.pixels
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            imageio.imwrite(out_dir / "reconstruction.png", to_uint8(pred))
        return {"seconds": round(time.perf_counter() - started, 3),
                "protocol": "the field at every pixel centre, clipped to [0, 1], against the image in [0, 1] "
                            "(16-bit images unquantised); PSNR and SSIM (11x11 Gaussian, sigma 1.5) over the image",
                "mean": {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}}


class MeshSDFTask(Task):
    """Fit a mesh's signed distance: a fixed pool of torch-ngp's training points with exact distances,
    batches drawn from it, instant-ngp's MAPE loss; scored by IoU and normal angle on held-out points."""

    kind, field_task, unit, cam_coordinate, reports_psnr = "mesh-sdf", "sdf", "points", "triplane", False
    # Fine tri-planes (NerfAcc's 512^2) put their cell-to-cell steps into the SDF's gradient: on a sphere
    # after 200 steps, normals 42 degrees off at 512, 7.5 at 64 and 4.0 at 16 (3.9 without CAM).
    cam_resolution = 16

    def __init__(self, cfg: FitConfig, mesh: MeshTarget, device: torch.device, pipeline: Pipeline | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.pipeline = pipeline or coordinate_pipeline(cfg, mesh.box, type(self), device)
        self._pool: tuple[Tensor, Tensor] | None = None

    @property
    def pool(self) -> tuple[Tensor, Tensor]:
        """Training points and their distances, made on first use (evaluation never needs them). A function
        of the mesh and the seed, so a resumed run draws the same points."""
        if self._pool is None:
            points, distance = sdf_samples(self.mesh, self.cfg.sdf_pool, torch.Generator().manual_seed(self.cfg.seed))
            self._pool = points.to(self.pipeline.device), distance.to(self.pipeline.device)
            self.attached = self.pipeline.field.attach(self._pool[0])  # an encoding may index the pool once
        return self._pool

    def prepare(self) -> None:
        """A data-adaptive encoding (NeuRBF) places itself by 1 / |SDF| over the training points."""
        points, distance = self.pool
        self.pipeline.field.adapt(points, 1 / (distance.abs() + 1e-9))

    def loss(self, generator: torch.Generator) -> StepLoss:
        points, distance = self.pool
        pick = torch.randint(len(points), (self.cfg.batch_points,), generator=generator).to(points.device)
        gt = distance[pick]
        sdf = self.pipeline.field.sdf(points[pick], point_ids=pick if self.attached else None)
        mape = ((sdf - gt).abs() / (gt.abs() + MAPE_EPSILON)).mean()
        return StepLoss(mape, mape.detach(), len(pick), len(pick))

    def evaluate(self, out_dir: Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        scores = sdf_scores(self.pipeline.field, self.mesh, self.cfg.eval_chunk)
        return {"seconds": round(time.perf_counter() - started, 3), "protocol": SDF_PROTOCOL, "mean": scores}


def sobel_magnitude(image: Tensor) -> Tensor:
    """[H, W] norm of the normalised Sobel gradient (kernels / 8, replicated borders) over every channel of
    an [H, W, C] image: NeuRBF's k-means weights for images."""
    kernel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    channels = F.pad(image.permute(2, 0, 1)[:, None], (1, 1, 1, 1), mode="replicate")  # [C, 1, H + 2, W + 2]
    gx, gy = (F.conv2d(channels, k[None, None]) for k in (kernel, kernel.T))
    return (gx.square() + gy.square()).sum((0, 1)).sqrt()


SDF_PROTOCOL = (f"IoU of the insides (sdf < 0) over {IOU_POINTS:,} points uniform in the unit box [-1, 1]^3; normal "
                f"angular error: mean angle in degrees between the field's gradient and the face normal at "
                f"{NORMAL_POINTS:,} area-weighted surface points; both sets drawn with seed {EVAL_SEED}, apart from "
                "the training points")


@torch.no_grad()
def sdf_scores(field, mesh: MeshTarget, chunk: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(EVAL_SEED)
    uniform = torch.rand(IOU_POINTS, 3, generator=generator) * 2 - 1
    gt_inside = inside_mesh(mesh.vertices, mesh.faces, uniform)
    surface, normals = sample_surface(mesh.vertices, mesh.faces, NORMAL_POINTS, generator)
    device = field.aabb.device
    was_training = field.training
    field.eval()
    inside = torch.cat([field.sdf(p.to(device)) < 0 for p in uniform.split(chunk)]).cpu()
    gradient = torch.cat([field.gradient(p.to(device), "sdf") for p in surface.split(chunk)]).cpu()
    field.train(was_training)
    cosine = F.cosine_similarity(gradient, normals, dim=-1).clamp(-1, 1)
    union = (inside | gt_inside).sum().item()
    return {"iou": (inside & gt_inside).sum().item() / max(union, 1),
            "normal_angle_deg": math.degrees(torch.acos(cosine).mean().item())}
