"""The training loop for radiance fields from posed images.

The loop owns the step; observers (progress bar, log file, later the viewer) are told
what happened and never drive it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from recon.app.config import FitConfig
from recon.app.pipeline import Pipeline
from recon.app.schedules import Progress, learning_rate_factor
from recon.app.checkpoint import load_resizing
from recon.data.scene import Scene, visual_hull


class Observer(Protocol):
    def on_step(self, trainer: "Trainer", stats: dict[str, Any]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: FitConfig, scene: Scene, device: torch.device | None = None):
        self.device = device or resolve_device(cfg.device)
        self.cfg, self.scene = cfg.resolved(self.device), scene
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # weight initialisation
        options = dict(cfg.field_options, **({"tcnn": True} if cfg.tcnn else {}))
        self.pipeline = Pipeline.build(cfg.field, options, scene.aabb, scene.aabb_scale, scene.near, scene.cone_angle,
                                       cfg.occupancy_resolution, cfg.samples_per_diagonal, cfg.quantize).to(self.device)
        self.train = scene.splits["train"].to(self.device)  # pixels live where the step runs
        # One generator drives every random choice of the loop, so a resumed run replays exactly.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.progress = Progress(cfg.steps, cfg.max_time)
        self.optimizer = self._make_optimizer()
        self.batch_rays = cfg.batch_rays  # resized every step to spend about cfg.sample_budget samples
        self.rays_seen = self.samples_seen = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self._rays_since_log = self._samples_since_log = self._steps_since_log = 0

    def _seed_grid_from_alpha(self) -> None:
        """Mark empty, for good, every grid cell some training view sees as wholly transparent: marching
        then skips the space around an RGBA object from the first step instead of learning it is empty."""
        grid = self.pipeline.grid
        centres, half_diagonals = grid.cell_centres()
        _, opaque = visual_hull(self.scene.splits["train"], centres.cpu(), half_diagonals.cpu())
        grid.seed(opaque.view(grid.levels, -1).to(grid.values.device))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self.pipeline.field.param_groups(self.cfg.lr)
        for group in groups:
            group["base_lr"] = group["lr"]
        return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)  # instant-ngp's Adam

    @property
    def step(self) -> int:
        return self.progress.step

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self) -> None:
        cfg, pipeline = self.cfg, self.pipeline
        progress = self.progress.value
        if pipeline.field.update(progress):
            self.optimizer = self._make_optimizer()  # the field replaced its parameters (DVGO's upscaling)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * learning_rate_factor(progress)
        if self.step % cfg.occupancy_every == 0:
            with record_function("occupancy_update"):
                pipeline.grid.update(pipeline.density_fn, warmup=progress < cfg.occupancy_warmup, generator=self.generator)

        with record_function("sample_rays"):
            rays, pixels = self.train.sample(self.batch_rays, self.generator)
            # A random background per ray makes transparency learnable (instant-ngp).
            background = torch.rand(len(rays), 3, generator=self.generator)
            target = pixels[:, :3]
            if pixels.shape[1] == 4:
                target = target * pixels[:, 3:] + background * (1 - pixels[:, 3:])
            rays, target, background = rays.to(self.device), target.to(self.device), background.to(self.device)

        out = pipeline.render(rays, background, generator=self.generator)
        photometric = F.mse_loss(out["rgb"], target)
        regularization = pipeline.field.regularization()
        loss = photometric if regularization is None else photometric + regularization
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # no sample hit the occupied space: nothing to learn this step
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                self.optimizer.step()
        self._loss_sum += photometric.detach()  # the logged loss and PSNR are photometric
        n_samples = out["n_samples"]  # a host int already: marching decides sizes on the host
        self._rays_since_log += len(rays)
        self._samples_since_log += n_samples
        self._steps_since_log += 1
        self.rays_seen += len(rays)
        self.samples_seen += n_samples
        if cfg.sample_budget and n_samples:
            # nerfacc's rule: scale the next batch by budget / samples spent, in multiples of 256
            # (fewer distinct sizes) and never more rays than the budget has samples.
            rays_wanted = self.batch_rays * cfg.sample_budget / n_samples
            self.batch_rays = int(min(max(256, round(rays_wanted / 256) * 256), cfg.sample_budget))
        self.progress.step += 1

    def run(self, observers: list[Observer] = (), stop_at: int | None = None, on_checkpoint=None) -> None:
        """Train until progress reaches 1 (or step `stop_at`), telling observers every log_every steps."""
        cfg = self.cfg
        self.pipeline.field.train()
        if self.step == 0 and self.scene.splits["train"].has_alpha:  # a fresh run (a resumed one loads its grid)
            self._seed_grid_from_alpha()
        last_log = time.perf_counter()
        self.progress.start_clock()
        try:
            while not self.progress.done and (stop_at is None or self.step < stop_at):
                self.train_step()
                if self.step % cfg.log_every == 0 or self.progress.done:
                    self.progress.stop_clock()
                    now = time.perf_counter()
                    stats = self._stats(now - last_log)
                    for observer in observers:
                        observer.on_step(self, stats)
                    last_log = time.perf_counter()
                    self.progress.start_clock()
                if on_checkpoint and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not self.progress.done:
                    self.progress.stop_clock()
                    on_checkpoint(self)
                    self.progress.start_clock()
        finally:
            self.progress.stop_clock()

    def _stats(self, wall: float) -> dict[str, Any]:
        loss = self._loss_sum.item() / max(self._steps_since_log, 1)  # one host sync per log, not per step
        stats = {
            "step": self.step,
            "progress": round(self.progress.value, 5),
            "train_seconds": round(self.progress.seconds, 3),
            "loss": loss,
            "psnr": -10 * math.log10(loss) if loss > 0 else float("inf"),
            "rays_per_second": self._rays_since_log / max(wall, 1e-9),
            "samples_per_second": self._samples_since_log / max(wall, 1e-9),
            "batch_rays": self.batch_rays,
            "lr": self.lr(),
            "occupancy": self.pipeline.grid.occupancy_fraction,
        }
        self._loss_sum.zero_()
        self._rays_since_log = self._samples_since_log = self._steps_since_log = 0
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "train_seconds": self.progress.seconds,
            "pipeline": self.pipeline.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"loop": self.generator.get_state(), "torch": torch.get_rng_state()},
            "batch": {"rays": self.batch_rays, "rays_seen": self.rays_seen, "samples_seen": self.samples_seen},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` left off."""
        saved = state["pipeline"]
        load_resizing(self.pipeline.field, saved["field"]["state"])
        load_resizing(self.pipeline.grid, saved["grid"])
        self.optimizer = self._make_optimizer()  # after resizing, so it holds the right tensors
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"]["loop"])
        torch.set_rng_state(state["rng"]["torch"])
        self.progress = Progress(self.cfg.steps, self.cfg.max_time, state["step"], state["train_seconds"])
        batch = state["batch"]
        self.batch_rays, self.rays_seen, self.samples_seen = batch["rays"], batch["rays_seen"], batch["samples_seen"]
