"""Every option of a fit, saved as the run's config.json so a run can be reproduced or resumed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any


@dataclass
class FitConfig:
    scene: str  # the scene folder or transforms file
    out: str  # the run folder
    field: str = "hashgrid"
    field_options: dict[str, Any] = dataclass_field(default_factory=dict)  # backend keyword arguments
    steps: int = 20000  # training length in steps (progress = step / steps) ...
    max_time: float | None = None  # ... or in seconds of training time; with both, whichever ends first
    batch_rays: int = 4096
    lr: float = 1e-2
    downscale: int = 1
    occupancy_resolution: int = 128
    occupancy_every: int = 16  # steps between occupancy-grid updates
    occupancy_warmup: float = 0.02  # progress during which every cell is refreshed
    samples_per_diagonal: int = 1024  # marching step = the box diagonal / this (instant-ngp: sqrt(3)*2/1024 on its unit cube)
    early_stop_eps: float = 1e-4  # transmittance below which evaluation stops marching
    eval_stride: int | None = None  # end-of-fit evaluation renders every k-th test view (None: all on GPU, at most 25 on CPU)
    eval_chunk: int = 16384  # rays per chunk when rendering whole images
    checkpoint_every: int = 2000  # steps; a checkpoint is also written at the end and on Ctrl-C
    log_every: int = 25
    seed: int = 0
    device: str = "auto"
    tcnn: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        return cls.from_json(json.loads(path.read_text()))
