"""Progressive volume distillation (PVD, Fang et al., AAAI 2023): a trained radiance field (the teacher) taught
to a field of another backend (the student), on volume samples rather than photos.

Each step draws rays from the training cameras, places samples with the teacher's sampler (its occupancy grid
or proposal fields, copied into the student's pipeline and frozen, as PVD keeps the teacher's grid), and asks
both fields there. As PVD does: the log density, clamped to [-2, 7] so empty space does not dominate, and the
colour at every sample are compared from the start, the rendered colour (the teacher's render is the target;
the photos are not used) from a sixth of the run on (PVD's stage 3 from step 5000 of 30000); each term is
PVD's default "normL2", the plain norm of the difference, with its weights (1 for the render, 0.002 for the
others). Not taken from PVD: its stage 1 (aligning intermediate features, which only its shared MLP heads
have), its random extra camera poses, AdamW and cosine decay (recon's Adam and schedule instead), and
PVD-AL's active sampling.
"""

from __future__ import annotations

import math

import torch

from recon.app.config import FitConfig
from recon.app.pipeline import Pipeline
from recon.app.run import RunDir, UserError
from recon.app.tasks import RadianceTask, StepLoss
from recon.data.scene import Scene
from recon.renderers.compositing import composite
from recon.renderers.proposal import Proposal

METHOD = ("progressive volume distillation (PVD, AAAI 2023): clamped log density and colour at the teacher's "
          "samples, then its renders; normL2 losses, weights 0.002 / 0.002 / 1")
LOG_DENSITY_RANGE = (-2.0, 7.0)  # PVD's sigma_clip_min / sigma_clip_max on the pre-exponential density
DENSITY_WEIGHT = COLOUR_WEIGHT = 0.002  # PVD's loss_rate_sigma, loss_rate_color
RENDER_WEIGHT = 1.0  # PVD's loss_rate_rgb
RENDER_FROM = 5000 / 30000  # PVD's stage 3 (renders join) as a fraction of its 30k steps


def clamped_log_density(density: torch.Tensor) -> torch.Tensor:
    """log density clamped to LOG_DENSITY_RANGE, with no gradient outside it (a zero density included)."""
    low, high = LOG_DENSITY_RANGE
    return torch.log(density.float().clamp(math.exp(low), math.exp(high)))


def check_teacher(cfg: FitConfig, path: str) -> None:
    """A UserError naming the run when recon cannot distil from it (its config.json `cfg`)."""
    if cfg.task != "radiance" or cfg.model != "radiance":
        raise UserError(f"{path}: distill takes a radiance field from posed images; this run is "
                        f"{'an SDF (--model sdf)' if cfg.model == 'sdf' else 'of task ' + cfg.task}")
    if cfg.refine_poses:
        raise UserError(f"{path}: its training poses were refined; distilling from refined poses is not supported")


def load_teacher(path: str) -> Pipeline:
    """The teacher run's pipeline (on the CPU), checked as `check_teacher` does."""
    run = RunDir(path)
    check_teacher(run.load_config(), path)
    return Pipeline.from_state(run.latest_state()["pipeline"])


class DistillTask(RadianceTask):
    """A student field learning the teacher run's field (`cfg.distilled_from["run"]`) over the same scene."""

    def __init__(self, cfg: FitConfig, scene: Scene, device: torch.device, pipeline: Pipeline | None = None):
        super().__init__(cfg, scene, device, pipeline)
        teacher = load_teacher(cfg.distilled_from["run"])
        self.teacher = teacher.to(device)
        for module in self.teacher.modules():
            module.eval()
            module.requires_grad_(False)
        student = self.pipeline
        # The teacher's sampler and appearance carry over; nothing trains them here.
        if teacher.grid is not None:
            student.grid.load_state_dict(teacher.grid.state_dict())
        if teacher.proposals is not None:
            student.proposals.load_state_dict(teacher.proposals.state_dict())
            student.proposals.requires_grad_(False)
        if teacher.appearance is not None:
            student.appearance = teacher.appearance
        self.progress = 0.0

    def before_step(self, step: int, progress: float, generator: torch.Generator) -> None:
        self.progress = progress  # the sampler stays the teacher's: no grid updates, no proposal training

    def learnable(self) -> dict:
        return {}  # the appearance codes are the teacher's

    def loss(self, generator: torch.Generator) -> StepLoss:
        batch = self.train.sample(self.batch_rays, generator)
        rays = batch.rays.to(self.device)
        background = torch.rand(len(rays), 3, generator=generator).to(self.device)
        with torch.no_grad():
            sampled = self.teacher.sample(rays, generator)
            samples = sampled.samples if isinstance(sampled, Proposal) else sampled
            x, d = samples.positions(rays), samples.dirs(rays)
            teacher = self.teacher.model(x, d)
            teacher_rgb = composite(teacher["rgb"].float(), teacher["density"].float() * samples.dt, samples,
                                    background)["rgb"]
        student = self.pipeline.model(x, d)
        density = (clamped_log_density(student["density"]) - clamped_log_density(teacher["density"])).norm()
        colour = (student["rgb"].float() - teacher["rgb"].float()).norm()
        loss = DENSITY_WEIGHT * density + COLOUR_WEIGHT * colour
        rendered = composite(student["rgb"].float(), student["density"].float() * samples.dt, samples,
                             background)["rgb"]
        if self.progress >= RENDER_FROM:
            loss = loss + RENDER_WEIGHT * (rendered - teacher_rgb).norm()
        agreement = torch.nn.functional.mse_loss(rendered.detach(), teacher_rgb)  # the log's PSNR: to the teacher
        return StepLoss(loss, agreement, len(rays), len(samples))
