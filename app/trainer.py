"""The training loop, one for every task (radiance from posed images, an image, a mesh's SDF).

The loop owns the step, the optimiser and the schedules; the task (app.tasks) draws the batch and
says what its loss is. Observers (progress bar, log file, later the viewer) are told what happened
and never drive the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Any, Protocol

import torch
from torch.profiler import record_function

from recon.app.checkpoint import load_resizing
from recon.app.config import FitConfig
from recon.app.distill import DistillTask
from recon.app.schedules import SCHEDULES, Progress
from recon.app.tasks import Task, task_class
from recon.data.scene import Scene
from recon.data.targets import ImageTarget, MeshTarget
from recon.fields import options_for_budget

log = logging.getLogger(__name__)
SKIPS_BEFORE_LR_DROP = 5  # consecutive non-finite steps skipped before the learning rate is halved
LR_DROPS = 3  # halvings tried before the run is declared diverged


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite after every learning-rate drop; the parameters are the last good ones."""


class Observer(Protocol):
    def on_step(self, trainer: "Trainer", stats: dict[str, Any]) -> None: ...


class Gate(Protocol):
    """Who else uses the field while it trains (the viewer): a lock shared with each step, and a pause."""

    lock: Any
    paused: threading.Event

    def wait_while_paused(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: FitConfig, target: Scene | ImageTarget | MeshTarget, device: torch.device | None = None):
        self.device = device or resolve_device(cfg.device)
        kind = DistillTask if cfg.distilled_from else task_class(target)
        self.cfg = cfg = cfg.resolved(self.device, kind.kind, getattr(target, "unbounded", False))
        if cfg.params:  # the backend's size option fills the budget; config.json records the value chosen
            cfg.field_options = options_for_budget(cfg.field, target.box, kind.field_task, cfg.params,
                                                   **cfg.field_options)
        torch.manual_seed(cfg.seed)  # weight initialisation
        self.task: Task = kind(cfg, target, self.device)
        self.pipeline = self.task.pipeline
        # One generator drives every random choice of the loop, so a resumed run replays exactly.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.progress = Progress(cfg.steps, cfg.max_time)
        self.optimizer = self._make_optimizer()
        self.items_seen = self.samples_seen = 0
        self.lr_scale = 1.0  # halved when steps keep failing
        self.skipped_steps = self._failures_in_a_row = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self._items_since_log = self._samples_since_log = self._steps_since_log = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        pipeline = self.pipeline
        groups = pipeline.field.optimizer_groups(self.cfg.lr)
        others = {"background": pipeline.background} if pipeline.background is not None else {}
        others |= {f"proposal{k}": proposal for k, proposal in enumerate(pipeline.proposals or [])}
        for prefix, field in others.items():
            groups += [{**g, "name": f"{prefix}-{g['name']}"} for g in field.optimizer_groups(self.cfg.lr)]
        for name, own in self.task.learnable().items():
            groups.append({"name": name, "params": list(own.module.parameters()), "lr": own.lr,
                           "schedule": own.schedule})
        for group in groups:
            group["base_lr"] = group["lr"]
        return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)  # instant-ngp's Adam

    @property
    def step(self) -> int:
        return self.progress.step

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self) -> None:
        field, progress = self.pipeline.field, self.progress.value
        if field.update(progress):
            self.optimizer = self._make_optimizer()  # the field replaced its parameters (DVGO's upscaling)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * SCHEDULES[group.get("schedule", "step")](progress) * self.lr_scale
        self.task.before_step(self.step, progress, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            result = self.task.loss(self.generator)
            regularization = field.regularization()
            loss = result.loss if regularization is None else result.loss + regularization
            if not self._finite(loss):
                self.progress.step += 1  # the step is spent (schedules and resume stay aligned), nothing is learnt
                return
            if loss.requires_grad:  # e.g. no sample hit the occupied space: nothing to learn this step
                with record_function("backward"):
                    loss.backward()
        except torch.OutOfMemoryError:
            if not self._smaller_batch():
                raise
            return  # the step is tried again with the smaller batch
        if loss.requires_grad:
            with record_function("optimizer"):
                self.optimizer.step()
        self.task.after_step(result)
        self._loss_sum += result.data_loss  # the logged loss (and PSNR) are the data term's
        self._items_since_log += result.items
        self._samples_since_log += result.samples
        self._steps_since_log += 1
        self.items_seen += result.items
        self.samples_seen += result.samples
        self.progress.step += 1

    def _smaller_batch(self) -> bool:
        """After running out of memory: halve the task's batch and go on; False at the smallest batch."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        batch = self.task.halve_batch()
        if batch is not None:
            log.warning("step %d: out of %s memory, batch halved to %s", self.step, self.device.type.upper(), batch)
        return batch is not None

    def _finite(self, loss: torch.Tensor) -> bool:
        """Skip a non-finite step; after SKIPS_BEFORE_LR_DROP in a row halve the learning rate, and after
        LR_DROPS halvings give up. One host sync per step, as a mixed-precision scaler's check."""
        if bool(torch.isfinite(loss)):
            self._failures_in_a_row = 0
            return True
        self.skipped_steps += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row == 1:
            log.warning("step %d: non-finite loss, step skipped", self.step)
        if self._failures_in_a_row % SKIPS_BEFORE_LR_DROP == 0:
            if self._failures_in_a_row // SKIPS_BEFORE_LR_DROP > LR_DROPS:
                raise TrainingDiverged(f"the loss stayed non-finite for {self._failures_in_a_row} steps after "
                                       f"{LR_DROPS} learning-rate halvings (step {self.step})")
            self.lr_scale /= 2
            log.warning("step %d: %d non-finite steps in a row, learning rate halved (x%g)", self.step,
                        self._failures_in_a_row, self.lr_scale)
        return False

    def run(self, observers: list[Observer] = (), stop_at: int | None = None, on_checkpoint=None,
            gate: Gate | None = None) -> None:
        """Train until progress reaches 1 (or step `stop_at`), telling observers every log_every steps.
        gate (the viewer): each step runs under its lock, and waits (off the training clock) while it is paused."""
        cfg = self.cfg
        self.pipeline.field.train()
        if self.step == 0:  # a fresh run (a resumed one loads its state)
            self.task.prepare()
        last_log = time.perf_counter()
        self.progress.start_clock()
        try:
            while not self.progress.done and (stop_at is None or self.step < stop_at):
                if gate is not None and gate.paused.is_set():
                    self.progress.stop_clock()
                    gate.wait_while_paused()
                    self.progress.start_clock()
                with gate.lock if gate is not None else contextlib.nullcontext():
                    self.train_step()
                if self.step % cfg.log_every == 0 or self.progress.done:
                    self.progress.stop_clock()
                    now = time.perf_counter()
                    stats = self._stats(now - last_log)
                    for observer in observers:
                        observer.on_step(self, stats)
                    last_log = time.perf_counter()
                    self.progress.start_clock()
                if (on_checkpoint and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                        and not self.progress.done):
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
            f"{self.task.unit}_per_second": self._items_since_log / max(wall, 1e-9),
            "samples_per_second": self._samples_since_log / max(wall, 1e-9),
            "lr": self.lr(),
        }
        if self.task.reports_psnr:
            stats["psnr"] = -10 * math.log10(loss) if loss > 0 else float("inf")
        if self.pipeline.grid is not None:
            stats["occupancy"] = self.pipeline.grid.occupancy_fraction
        stats.update(self.task.state_dict())
        self._loss_sum.zero_()
        self._items_since_log = self._samples_since_log = self._steps_since_log = 0
        return stats

    def train_summary(self) -> dict[str, Any]:
        """metrics.json's "train": steps, training seconds and throughput."""
        seconds = max(self.progress.seconds, 1e-9)
        return {"steps": self.step, "seconds": round(self.progress.seconds, 3),
                f"{self.task.unit}_per_second": round(self.items_seen / seconds),
                "samples_per_second": round(self.samples_seen / seconds)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.kind,
            "step": self.step,
            "train_seconds": self.progress.seconds,
            "pipeline": self.pipeline.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"loop": self.generator.get_state(), "torch": torch.get_rng_state()},
            "seen": {"items": self.items_seen, "samples": self.samples_seen},
            "guard": {"lr_scale": self.lr_scale, "skipped_steps": self.skipped_steps},
            "task_state": self.task.state_dict(),
            "task_weights": {name: own.module.state_dict() for name, own in self.task.learnable().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` left off."""
        saved = state["pipeline"]
        load_resizing(self.pipeline.field, saved["field"]["state"])
        if self.pipeline.grid is not None:
            load_resizing(self.pipeline.grid, saved["grid"])
        if self.pipeline.background is not None:
            load_resizing(self.pipeline.background, saved["background"]["state"])
        if self.pipeline.proposals is not None:
            self.pipeline.proposals.load_state_dict(saved["proposals"])
        for name, own in self.task.learnable().items():
            own.module.load_state_dict(state["task_weights"][name])
        self.optimizer = self._make_optimizer()  # after resizing, so it holds the right tensors
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"]["loop"])
        torch.set_rng_state(state["rng"]["torch"])
        self.progress = Progress(self.cfg.steps, self.cfg.max_time, state["step"], state["train_seconds"])
        self.items_seen, self.samples_seen = state["seen"]["items"], state["seen"]["samples"]
        guard = state.get("guard", {})  # absent from checkpoints of earlier versions
        self.lr_scale, self.skipped_steps = guard.get("lr_scale", 1.0), guard.get("skipped_steps", 0)
        self.task.load_state_dict(state["task_state"])
