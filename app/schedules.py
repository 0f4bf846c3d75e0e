"""Schedules as functions of training progress in [0, 1].

Progress is steps over --steps, or training time over --max-time (whichever is further),
so a time-capped run walks the same schedule as a step-capped one and ends on the final
learning rate.
"""

from __future__ import annotations

import time


class Progress:
    """Tracks steps and training seconds (evaluation and checkpoint time excluded)."""

    def __init__(self, steps: int | None, max_time: float | None, step: int = 0, seconds: float = 0.0):
        if not steps and not max_time:
            raise ValueError("a fit needs --steps or --max-time")
        self.steps, self.max_time = steps, max_time
        self.step, self.seconds = step, seconds
        self._started: float | None = None
        self._agreed: float | None = None

    def agree(self, seconds: float) -> None:
        """Hold the clock the schedules read at `seconds` (a distributed run's: rank 0's, agreed each step so
        that every rank's learning rate and end are the same); the clock itself keeps running."""
        self._agreed = seconds

    def start_clock(self) -> None:
        self._started = time.perf_counter()

    def stop_clock(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def clock(self) -> float:
        """Training seconds so far, on this process's clock."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.seconds + running

    def elapsed(self) -> float:
        """The seconds the schedules read: the clock, or the one agreed."""
        return self.clock() if self._agreed is None else self._agreed

    @property
    def value(self) -> float:
        fractions = []
        if self.steps:
            fractions.append(self.step / self.steps)
        if self.max_time:
            fractions.append(self.elapsed() / self.max_time)
        return min(1.0, max(fractions))

    @property
    def done(self) -> bool:
        return self.value >= 1.0


def warm_up(progress: float, warmup: float) -> float:
    """Linear from 1% to 1 over the first `warmup` of progress."""
    return min(1.0, 0.01 + 0.99 * progress / warmup) if warmup > 0 else 1.0


def learning_rate_factor(progress: float, warmup: float = 0.01, milestones=(0.5, 0.75, 0.9),
                         gamma: float = 0.33) -> float:
    """Linear warm-up from 1% then step decay, as nerfacc's instant-ngp recipe, on progress.

    The factor is constant after the last milestone, so any run (step- or time-capped) ends
    exactly on the final learning rate.
    """
    return warm_up(progress, warmup) * gamma ** sum(progress >= m for m in milestones)


FINAL_LEARNING_RATE_FACTOR = learning_rate_factor(1.0)


def exponential_factor(progress: float, final: float = 0.01, warmup: float = 0.01) -> float:
    """The same warm-up, then an exponential decay to `final` at the end: BARF's pose schedule (1e-3 to 1e-5)."""
    return warm_up(progress, warmup) * final**progress


SCHEDULES = {"step": learning_rate_factor, "exponential": exponential_factor}  # by an optimiser group's "schedule"
