"""Progressive volume distillation (PVD, Fang et al., AAAI 2023): a trained field (the teacher) taught to a field
of another backend (the student), on volume samples rather than photos.

Each step draws rays from the training cameras, places samples with the teacher's sampler (its occupancy grid or
proposal fields, copied into the student's pipeline and frozen, as PVD keeps the teacher's grid), and asks both
fields there, and for their density at as many points again, one a ray, uniform in the teacher's occupied cells:
where rays stop at a surface, its inside is learnt from these alone (the solid a mesh export closes), while its
colour is never seen, so only the density is compared there. As PVD does: the log density, clamped to [-2, 7] so
empty space does not dominate, the colour at the samples, and the rendered colour (the teacher's render is the
target; the photos are not used), each as PVD's default "normL2", the plain norm of the difference. Not as PVD
does: the renders are compared from the first step with the sample terms at weight 0.1 beside the render's 1, where
PVD joins the renders at its stage 3 (step 5000 of 30000) with the sample terms at 0.002. A plain norm's gradient
has unit size whatever its scale, so at 0.002 the sample terms all but stop counting once the renders join; on runs
of ~600 CPU steps recon's schedule reached 28.64 dB against PVD's 26.92 (a vm student of a lego hash grid,
BENCHMARKS.md). Not taken from PVD either: its stage 1 (aligning intermediate features, which only its shared MLP
heads have), AdamW and cosine decay (recon's Adam and schedule instead), and its learning rates (a fit's; 1e-3 for
an MLP): a density student's base rate is twice the teacher's (an SDF student's the teacher's) unless `--lr` sets
it. On lego (a hash-grid teacher, 120 s CPU runs of 220-500 steps, BENCHMARKS.md), twice the rate gained over the
teacher's for every backend run both ways on one day (vm +0.5 dB, tri-plane +0.4, NeuRBF +1.1, NeRF's MLP +0.2); 4x
gained a little more for some and diverged a tri-plane student.

PVD-AL's active learning (Fang et al. 2023, its code's defaults), at its three levels:
- rays: each step the tenth of the batch the student renders worst (L1 against the teacher's render) joins a
  pool; once full, each batch replays a tenth more rays drawn from it, whose places the new worst rays take.
  PVD-AL's pool holds 150 batches and fills within 1500 of its 30k steps; recon's holds 15, so it fills
  within the 150 first steps of runs that last ~1000 on a CPU. It is not checkpointed: a resumed run
  refills it;
- points: the sample terms count only each ray's heaviest 30% of samples (by the teacher's weights or the
  student's) on rays at least half opaque; the render term sees every sample;
- views: the tenth of the training views the student renders worst (a running mean of each view's ray
  errors; PVD-AL ranks whole renders each epoch) are seen again turned: each batch adds a tenth more rays
  through random pixels of those views, each ray's camera turned by up to pi/20 about every axis (PVD-AL's
  hard poses; its other poses are random ones about the scene, where recon keeps the training views).

`--finetune-steps N` (PVD has none): the distilled run then goes on N steps as a fit from the photos does,
its occupancy grid now the student's own; metrics.json's eval.distilled keeps the scores before it.

PVD has no SDF fields; for a NeuS teacher (`--model sdf`) recon compares, in place of the density, the
distance and its gradient, at the teacher's samples and at one point a ray uniform in the SDF's box (where no
ray goes the distance must still keep its sign, or the mesh grows stray sheets there), with weights 1 and 0.1
(the gradient term standing in for NeuS's eikonal term, at its weight); the colour and render terms as above.
The teacher's sharpness s carries over and stays, as its sampler does, so both render alike, and a NeuRBF
student places its kernels by 1 / |SDF| of the teacher's distance, NeuRBF's own rule with the exact SDF.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.app.config import FitConfig
from recon.app.pipeline import Pipeline
from recon.app.run import RunDir, UserError
from recon.app.tasks import RadianceTask, StepLoss
from recon.data.cameras import rotation_about
from recon.data.rays import Rays
from recon.data.scene import Scene
from recon.renderers.compositing import composite
from recon.renderers.packing import Samples
from recon.renderers.proposal import Proposal

METHOD = ("progressive volume distillation (PVD, AAAI 2023): clamped log density (an SDF: distance and gradient) "
          "and colour at the teacher's samples, density at points in its occupied cells, and its renders; normL2 "
          "losses, weights 0.1 / 0.1 / 1 (SDF: 1 and 0.1); PVD-AL's active learning: hard rays, hard views, the "
          "heaviest samples")
STUDENT_LR_FACTOR = 2.0  # a density student's default base rate over the teacher's (see above)
LOG_DENSITY_RANGE = (-2.0, 7.0)  # PVD's sigma_clip_min / sigma_clip_max on the pre-exponential density
DENSITY_WEIGHT = COLOUR_WEIGHT = 0.1  # PVD's loss_rate_sigma, loss_rate_color are 0.002 (see above)
RENDER_WEIGHT = 1.0  # PVD's loss_rate_rgb
DISTANCE_WEIGHT, GRADIENT_WEIGHT = 1.0, 0.1  # recon's, for SDF teachers (PVD has none)
HARD_RAYS = 0.1  # PVD-AL's hard_rays_ratio
HARD_POOL_BATCHES = 15  # the pool's size in batches of rays (PVD-AL: 150; see above)
HARD_VIEWS, VIEW_TURN = 0.1, math.pi / 20  # PVD-AL's hard_imgs_ratio and its hard poses' turn about each axis
VIEW_ERROR_MEMORY = 0.9  # the running mean of a view's ray errors keeps this much of its past
HEAVY_SAMPLES, OPAQUE_RAY = 0.3, 0.5  # PVD-AL's point level: the heaviest 30% of a ray's samples, opacity >= 0.5


def clamped_log_density(density: Tensor) -> Tensor:
    """log density clamped to LOG_DENSITY_RANGE, with no gradient outside it (a zero density included)."""
    low, high = LOG_DENSITY_RANGE
    return torch.log(density.float().clamp(math.exp(low), math.exp(high)))


def norm_l2(a: Tensor, b: Tensor) -> Tensor:
    """PVD's "normL2": the plain norm of the difference over the whole batch."""
    return (a.float() - b.float()).norm()


def uniform_in(box: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` points [count, 3] uniform in `box` [2, 3] (on its device; drawn by the CPU `generator`)."""
    lo, hi = box
    return lo + torch.rand(count, 3, generator=generator).to(box.device) * (hi - lo)


def heavy_samples(weights: Tensor, opacity: Tensor, samples: Samples) -> Tensor:
    """[S] bool: PVD-AL's points, each ray's HEAVY_SAMPLES heaviest samples (by `weights` [S]) on rays whose
    `opacity` [R] is at least OPAQUE_RAY."""
    by_weight = torch.argsort(-weights, stable=True)
    order = by_weight[torch.argsort(samples.ray_idx[by_weight], stable=True)]  # by ray, then heaviest first
    ray = samples.ray_idx[order]
    starts = samples.starts
    rank = torch.arange(len(order), device=ray.device) - starts[ray]
    count = (starts[1:] - starts[:-1])[ray]
    heavy = torch.zeros_like(weights, dtype=torch.bool)
    heavy[order] = (rank <= HEAVY_SAMPLES * count) & (opacity[ray] >= OPAQUE_RAY)
    return heavy


class HardRays:
    """PVD-AL's ray level: a pool of the rays the student rendered worst, replayed in later batches."""

    def __init__(self, size: int):
        self.size = size
        self.pool: Rays | None = None
        self.drawn: Tensor | None = None  # the pool's places the last batch replayed

    def draw(self, count: int, generator: torch.Generator) -> Rays | None:
        """`count` rays of the full pool (None until it is full)."""
        if self.pool is None or len(self.pool) < self.size:
            return None
        self.drawn = torch.randperm(len(self.pool), generator=generator)[:count].to(self.pool.origins.device)
        return self.pool[self.drawn]

    def add(self, rays: Rays, error: Tensor, count: int) -> None:
        """The `count` rays of the batch with the largest `error` [R]: into the pool, or in the places of the
        rays just replayed."""
        worst = rays[torch.topk(error, min(count, len(error))).indices].detach()
        if self.drawn is not None:
            self.pool.origins[self.drawn[:len(worst)]] = worst.origins
            self.pool.dirs[self.drawn[:len(worst)]] = worst.dirs
            self.drawn = None
        elif self.pool is None:
            self.pool = worst
        else:
            self.pool = Rays(torch.cat([self.pool.origins, worst.origins])[:self.size],
                             torch.cat([self.pool.dirs, worst.dirs])[:self.size])


def turned(dirs: Tensor, generator: torch.Generator) -> Tensor:
    """`dirs` [R, 3], each turned about x, then y, then z by its own angles uniform in +-VIEW_TURN."""
    angles = ((torch.rand(len(dirs), 3, generator=generator) * 2 - 1) * VIEW_TURN).to(dirs)
    axes = torch.eye(3, device=dirs.device).expand(len(dirs), 3, 3)
    x, y, z = (rotation_about(axes[:, k], angles[:, k]) for k in range(3))
    return (z @ y @ x @ dirs[:, :, None])[:, :, 0]


def check_teacher(cfg: FitConfig, path: str) -> None:
    """A UserError naming the run when recon cannot distil from it (its config.json `cfg`)."""
    if cfg.task != "radiance":
        raise UserError(f"{path}: distill takes a field fitted to posed images; this run is of task {cfg.task}")
    if cfg.refine_poses:
        raise UserError(f"{path}: its training poses were refined; distilling from refined poses is not supported")


def student_lr(teacher: FitConfig) -> float:
    """The student's default base rate: STUDENT_LR_FACTOR times the teacher's for a density field, the teacher's
    for an SDF (not measured at larger rates)."""
    return teacher.lr * (STUDENT_LR_FACTOR if teacher.model == "radiance" else 1.0)


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
        # What renders the scene beside the field carries over and nothing trains it here: the sampler (grid or
        # proposal fields), the appearance codes, an SDF's background field and sharpness.
        carried = [(student.grid, teacher.grid), (student.proposals, teacher.proposals),
                   (student.background, teacher.background)]
        for own, taught in carried:
            if taught is not None:
                own.load_state_dict(taught.state_dict())
                own.requires_grad_(False)
        if teacher.appearance is not None:
            student.appearance = teacher.appearance
        if student.is_surface:
            student.field.variance.data.copy_(teacher.field.variance)
            student.field.variance.requires_grad_(False)
        self.hard_rays = HardRays(HARD_POOL_BATCHES * cfg.batch_rays)
        self.view_error = torch.zeros(len(self.train), device=device)  # each training view's running ray error
        self.finetune = cfg.distilled_from.get("finetune")  # {"from_step", "steps", "distilled"} once asked for
        self.finetuning = False

    def prepare(self) -> None:
        """A NeuRBF SDF student places its kernels by the teacher's distance (NeuRBF's 1 / |SDF|) at once."""
        field = self.pipeline.field
        if self.pipeline.is_surface and field.encoding.adaptive:
            field.place_kernels(self.teacher.field.sdf)  # marks them placed: not again at 10% of the run

    def before_step(self, step: int, progress: float, generator: torch.Generator) -> None:
        self.finetuning = self.finetune is not None and step >= self.finetune["from_step"]
        if self.finetuning:  # a fit's upkeep: the occupancy grid follows the student now
            super().before_step(step, progress, generator)
        # While distilling the sampler stays the teacher's: no grid updates, no proposal training.

    def learnable(self) -> dict:
        return {}  # the appearance codes are the teacher's

    def evaluate(self, out_dir, split: str = "test", stride: int = 1, align_poses: bool | None = None) -> dict:
        scores = super().evaluate(out_dir, split, stride, align_poses)
        if self.finetune is not None:
            scores["distilled"] = self.finetune["distilled"]  # the scores before the fine-tuning on the photos
        return scores

    def loss(self, generator: torch.Generator) -> StepLoss:
        if self.finetuning:
            return super().loss(generator)
        batch = self.train.sample(self.batch_rays, generator)
        rays, views = batch.rays.to(self.device), batch.cameras.to(self.device)
        hard_count = int(HARD_RAYS * len(rays))
        extra = [self.hard_rays.draw(hard_count, generator), self.hard_view_rays(int(HARD_VIEWS * len(rays)),
                                                                                 generator)]
        parts = [rays] + [part for part in extra if part is not None]
        rays = Rays(torch.cat([part.origins for part in parts]), torch.cat([part.dirs for part in parts]))
        background = torch.rand(len(rays), 3, generator=generator).to(self.device)
        with torch.no_grad():
            sampled = self.teacher.sample(rays, generator)
            samples = sampled.samples if isinstance(sampled, Proposal) else sampled
            x, d = samples.positions(rays), samples.dirs(rays)
            teacher = self.teacher.field_fn(x, d, samples.dt)
            taught = composite(teacher["rgb"], teacher["tau"], samples, background)
        student = self.pipeline.field_fn(x, d, samples.dt)
        rendered = composite(student["rgb"], student["tau"], samples, background)
        heavy = heavy_samples(taught["weights"], taught["opacity"], samples) | heavy_samples(
            rendered["weights"].detach(), rendered["opacity"].detach(), samples)
        if self.pipeline.is_surface:
            # The distances are the surface's samples' only, where a background field answers around it.
            surface = heavy if self.pipeline.background is None else heavy[self.pipeline.model.owned_by_surface(x)]
            loss = self.surface_loss(student, teacher, surface, len(rays), generator)
        else:  # tau = density * dt; the densities at points off the rays join those at the samples
            points = self.occupied_points(len(rays), generator)
            with torch.no_grad():
                taught_density = self.teacher.density_fn(points)
            density = torch.cat([student["tau"][heavy] / samples.dt[heavy], self.pipeline.density_fn(points)])
            loss = DENSITY_WEIGHT * norm_l2(clamped_log_density(density), clamped_log_density(
                torch.cat([teacher["tau"][heavy] / samples.dt[heavy], taught_density])))
        loss = loss + COLOUR_WEIGHT * norm_l2(student["rgb"][heavy], teacher["rgb"][heavy])
        loss = loss + RENDER_WEIGHT * norm_l2(rendered["rgb"], taught["rgb"])
        error = (rendered["rgb"].detach() - taught["rgb"]).abs().sum(-1)
        self.hard_rays.add(rays, error, hard_count)
        self.note_view_errors(views, error[:len(views)])
        agreement = torch.nn.functional.mse_loss(rendered["rgb"].detach(), taught["rgb"])  # the log's PSNR
        return StepLoss(loss, agreement, len(rays), len(samples))

    def occupied_points(self, count: int, generator: torch.Generator) -> Tensor:
        """`count` points [count, 3] uniform in the teacher's occupied cells, or in its inner box where proposal
        fields sample (no grid says where its density is)."""
        if self.teacher.grid is not None:
            return self.teacher.grid.occupied_points(count, generator)
        return uniform_in(self.teacher.inner_box.to(self.device), count, generator)

    def hard_view_rays(self, count: int, generator: torch.Generator) -> Rays | None:
        """PVD-AL's view level: `count` rays through random pixels of the views with the largest running error,
        each turned about its camera (`turned`); None before any view has an error."""
        if not bool(self.view_error.any()):
            return None
        hardest = torch.topk(self.view_error, max(1, round(HARD_VIEWS * len(self.view_error)))).indices.cpu()
        cameras = self.train.cameras
        view = hardest[torch.randint(len(hardest), (count,), generator=generator)].to(self.device)
        px = torch.rand(count, generator=generator).to(self.device) * cameras.width[view]
        py = torch.rand(count, generator=generator).to(self.device) * cameras.height[view]
        rays = cameras.rays(view, px, py)
        return Rays(rays.origins, turned(rays.dirs, generator))

    def note_view_errors(self, views: Tensor, error: Tensor) -> None:
        """Each view's running mean of its rays' errors (`error` [R] of rays from training views `views` [R])."""
        sums = torch.zeros_like(self.view_error).index_add_(0, views, error)
        counts = torch.bincount(views, minlength=len(self.view_error))
        seen = counts > 0
        self.view_error[seen] = (VIEW_ERROR_MEMORY * self.view_error[seen]
                                 + (1 - VIEW_ERROR_MEMORY) * sums[seen] / counts[seen])

    def surface_loss(self, student: dict[str, Tensor], teacher: dict[str, Tensor], chosen: Tensor,
                     uniform_points: int, generator: torch.Generator) -> Tensor:
        """Distance and gradient at the `chosen` samples of the SDF's and at `uniform_points` uniform in its box."""
        field = self.pipeline.field
        uniform = uniform_in(field.aabb, uniform_points, generator)
        with torch.no_grad():
            taught_sdf, _, taught_gradient = self.teacher.field.sdf_gradient(uniform, create_graph=False)
        sdf, _, gradient = field.sdf_gradient(uniform, create_graph=True)
        distance = norm_l2(torch.cat([student["sdf"][chosen], sdf]), torch.cat([teacher["sdf"][chosen], taught_sdf]))
        slope = norm_l2(torch.cat([student["sdf_gradient"][chosen], gradient]),
                        torch.cat([teacher["sdf_gradient"][chosen], taught_gradient]))
        return DISTANCE_WEIGHT * distance + GRADIENT_WEIGHT * slope
