"""The training loop, one for every task (radiance from posed images, an image, a mesh's SDF).

The loop owns the step, the optimiser and the schedules; the task (app.tasks) draws the batch and
says what its loss is. Observers (progress bar, log file, later the viewer) are told what happened
and never drive the loop.

A step's random draws are a function of (seed, step, stream): stream SHARED_STREAM for what every rank
must draw alike (occupancy-grid updates), streams 0..N-1 for the N ray batches of the step (`--batches`, shared
by the ranks of a distributed run, app.distributed). So a resumed run replays exactly without saving generator
states, on any number of ranks, and two ranks learn what one process summing both batches learns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from typing import Any, Protocol

import torch
from torch.profiler import record_function

from recon.app.checkpoint import load_resizing
from recon.app.config import FitConfig
from recon.app.distill import DistillTask
from recon.app.distributed import all_reduce_gradients, all_reduce_sum, broadcast_from_main, world
from recon.app.schedules import SCHEDULES, Progress
from recon.app.tasks import StepLoss, Task, task_class
from recon.data.scene import Scene
from recon.data.targets import ImageTarget, MeshTarget
from recon.fields import options_for_budget

log = logging.getLogger(__name__)
SKIPS_BEFORE_LR_DROP = 5  # consecutive non-finite steps skipped before the learning rate is halved
LR_DROPS = 3  # halvings tried before the run is declared diverged
SHARED_STREAM = -1


def stream_seed(seed: int, step: int, stream: int) -> int:
    """The seed of random stream `stream` at `step` (64 bits of a hash: no two (step, stream) pairs share one)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest(), "little")


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite after every learning-rate drop; the parameters are the last good ones."""


class Stopped(Exception):
    """A signal asked a distributed run to stop: raised on every rank after the same step."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Observer(Protocol):
    def on_step(self, trainer: "Trainer", stats: dict[str, Any]) -> None: ...


class Gate(Protocol):
    """Who else uses the field while it trains (the viewer): a lock shared with each step, and a pause."""

    lock: Any
    paused: threading.Event

    def wait_while_paused(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one (a distributed run's: the rank's own), else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{world().local_rank}" if torch.cuda.is_available() else "cpu")
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
        self.world = world()
        cfg.batches = cfg.batches or self.world.size  # config.json keeps it: a resumed run draws the same batches
        self.streams = list(range(self.world.rank, cfg.batches, self.world.size))  # this rank's share of them
        self.batches_per_step = cfg.batches
        self.generator = torch.Generator()  # reseeded for each stream of each step (stream_seed)
        self.stop_signal = 0  # set by a signal handler in a distributed run; every rank stops after the same step
        self._paused = False  # a distributed run's viewer paused on rank 0 (agreed with the step)
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
        # Adam's square-root rule (Malladi et al. 2022): the mean gradient of N batches, a step's learning rate
        # times sqrt(N). With 2 ranks it beat the unscaled rate by 0.3 and 0.7 dB (BENCHMARKS.md).
        for group in groups:
            group["lr"] = group["base_lr"] = group["lr"] * math.sqrt(self.cfg.batches)
        return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)  # instant-ngp's Adam

    @property
    def step(self) -> int:
        return self.progress.step

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, gate: Gate | None = None) -> None:
        field, progress = self.pipeline.field, self.progress.value
        if field.update(progress):
            self.optimizer = self._make_optimizer()  # the field replaced its parameters (DVGO's upscaling)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * SCHEDULES[group.get("schedule", "step")](progress) * self.lr_scale
        self.task.before_step(self.step, progress, self._stream(SHARED_STREAM))
        self.optimizer.zero_grad(set_to_none=True)
        data_loss, items, samples, finite, out_of_memory = self._backward_batches()
        if self.world.distributed:
            data_loss, items, samples, finite, out_of_memory = self._agree(data_loss, items, samples, finite,
                                                                           out_of_memory, gate)
        if out_of_memory:
            if not self._smaller_batch():
                raise torch.OutOfMemoryError(f"step {self.step}: out of memory at the smallest batch")
            return  # the step is tried again with the smaller batch
        if not self._finite(finite):
            self.progress.step += 1  # the step is spent (schedules and resume stay aligned), nothing is learnt
            return
        if any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"]):
            with record_function("optimizer"):
                self.optimizer.step()
        self.task.after_step(StepLoss(data_loss, data_loss, items // self.batches_per_step,
                                      samples // self.batches_per_step))  # per batch, as a task's batch is sized
        self._loss_sum += data_loss / self.batches_per_step  # the logged loss (and PSNR) are the data term's
        self._items_since_log += items
        self._samples_since_log += samples
        self._steps_since_log += 1
        self.items_seen += items
        self.samples_seen += samples
        self.progress.step += 1

    def _stream(self, stream: int) -> torch.Generator:
        return self.generator.manual_seed(stream_seed(self.cfg.seed, self.step, stream))

    def _backward_batches(self) -> tuple[torch.Tensor, int, int, bool, bool]:
        """This rank's batches of the step, each one's gradients added, scaled so that the sum over every rank's
        is the mean: (summed data loss, items, samples, every loss finite, out of memory)."""
        data_loss, items, samples = torch.zeros((), device=self.device), 0, 0
        try:
            for stream in self.streams:
                result = self.task.loss(self._stream(stream))
                regularization = self.pipeline.field.regularization()
                loss = result.loss if regularization is None else result.loss + regularization
                if not bool(torch.isfinite(loss)):  # one host sync per batch, as a mixed-precision scaler's check
                    return data_loss, items, samples, False, False
                if loss.requires_grad:  # e.g. no sample hit the occupied space: nothing to learn from it
                    with record_function("backward"):
                        (loss / self.batches_per_step).backward()
                data_loss = data_loss + result.data_loss
                items, samples = items + result.items, samples + result.samples
        except torch.OutOfMemoryError:
            return data_loss, items, samples, True, True
        return data_loss, items, samples, True, False

    def _agree(self, data_loss: torch.Tensor, items: int, samples: int, finite: bool, out_of_memory: bool,
               gate: Gate | None) -> tuple[torch.Tensor, int, int, bool, bool]:
        """Every rank's gradients summed, and what the step's outcome depends on agreed, in one exchange: a
        skipped or shrunk step anywhere is one everywhere, the counts are the run's, the schedules' clock is rank
        0's, and a stop or a pause asked of any rank is every rank's after this step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with record_function("all_reduce"):
            agreed = all_reduce_gradients(params, [
                not finite, out_of_memory, items, samples, self.stop_signal == signal.SIGTERM,
                self.stop_signal == signal.SIGINT, gate is not None and gate.paused.is_set(),
                self.progress.clock() if self.world.main else 0.0, data_loss.detach()])
        non_finite, oom, items, samples, sigterm, sigint, paused, seconds, loss = agreed
        self.progress.agree(seconds)
        self._paused = paused > 0
        if sigterm or sigint:
            self.stop_signal = signal.SIGTERM if sigterm else signal.SIGINT
        return torch.tensor(loss, device=self.device), round(items), round(samples), non_finite == 0, oom > 0

    def _smaller_batch(self) -> bool:
        """After running out of memory: halve the task's batch and go on; False at the smallest batch."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        batch = self.task.halve_batch()
        if batch is not None:
            log.warning("step %d: out of %s memory, batch halved to %s", self.step, self.device.type.upper(), batch)
        return batch is not None

    def _finite(self, finite: bool) -> bool:
        """Skip a non-finite step; after SKIPS_BEFORE_LR_DROP in a row halve the learning rate, and after
        LR_DROPS halvings give up."""
        if finite:
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
        self._broadcast_weights()
        last_log = time.perf_counter()
        self.progress.start_clock()
        try:
            while not self.progress.done and (stop_at is None or self.step < stop_at):
                if self._paused or (gate is not None and gate.paused.is_set() and not self.world.distributed):
                    self.progress.stop_clock()
                    self._wait_while_paused(gate)
                    self.progress.start_clock()
                with gate.lock if gate is not None else contextlib.nullcontext():
                    self.train_step(gate)
                if self.stop_signal and self.world.distributed:
                    raise Stopped(self.stop_signal)
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

    def _broadcast_weights(self) -> None:
        """Every rank from rank 0's weights and state (DDP's start): a data-adaptive placement or a loaded
        checkpoint leaves no rank apart."""
        modules = self.pipeline.modules() + [own.module for own in self.task.learnable().values()]
        broadcast_from_main([t.data for m in modules for t in list(m.parameters()) + list(m.buffers())])

    def _wait_while_paused(self, gate: Gate | None) -> None:
        """The viewer's pause (off the training clock). In a distributed run rank 0's viewer holds every rank,
        which check with it each half second, so none waits long enough in a collective to give up."""
        if not self.world.distributed:
            gate.wait_while_paused()
            return
        while self._paused:
            if gate is not None and gate.paused.is_set():
                time.sleep(0.5)
            still = torch.tensor([float(gate is not None and gate.paused.is_set())], device=self.device)
            all_reduce_sum(still)
            self._paused = bool(still.item())

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
                "samples_per_second": round(self.samples_seen / seconds),
                **({"ranks": self.world.size} if self.world.distributed else {})}

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.kind,
            "step": self.step,
            "train_seconds": self.progress.seconds,
            "pipeline": self.pipeline.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},  # the loop's streams are seeded by step (stream_seed)
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
        torch.set_rng_state(state["rng"]["torch"])
        self.progress = Progress(self.cfg.steps, self.cfg.max_time, state["step"], state["train_seconds"])
        self.items_seen, self.samples_seen = state["seen"]["items"], state["seen"]["samples"]
        guard = state.get("guard", {})  # absent from checkpoints of earlier versions
        self.lr_scale, self.skipped_steps = guard.get("lr_scale", 1.0), guard.get("skipped_steps", 0)
        self.task.load_state_dict(state["task_state"])
