"""Every option of a fit, saved as the run's config.json so a run can be reproduced or resumed."""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from recon.fields import REGISTRY

# Defaults that depend on the machine; a field backend adds its own (its class's `presets`).
# gpu: instant-ngp's. cpu: what a 2-core CPU trains fastest with (BENCHMARKS.md, issue 3).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"batch_rays": 4096, "sample_budget": 2**18, "occupancy_resolution": 128, "samples_per_diagonal": 1024,
            "eval_chunk": 2**16, "batch_points": 2**18},
    "cpu": {"batch_rays": 1024, "sample_budget": 2**15, "occupancy_resolution": 64, "samples_per_diagonal": 256,
            "eval_chunk": 2**13, "batch_points": 2**16},
}
TASKS = ("radiance", "image", "mesh-sdf")


@dataclass
class FitConfig:
    scene: str  # the scene folder or transforms file
    out: str  # the run folder
    field: str = "hashgrid"
    field_options: dict[str, Any] = dataclass_field(default_factory=dict)  # backend keyword arguments
    task: str = "radiance"  # what the input is: posed images ("radiance"), an image, or a mesh ("mesh-sdf")
    model: str = "radiance"  # posed images: a density field ("radiance") or a NeuS SDF field ("sdf")
    surface_box: list[float] | None = None  # --model sdf: the SDF field's box, world frame x0 y0 z0 x1 y1 z1 (None: the inner cascade)
    quantize: float = 0.0  # CQ-NIR cell size relative to the object radius (0: off), any backend
    params: int | None = None  # a parameter budget the backend's size option is set to fill (comparisons)
    cam: str | None = None  # CAM on the field's MLPs: "auto" (the task's coordinate), "plane", "direction", "triplane"
    cam_resolution: int | None = None  # CAM grid side (None: the paper's, 32 / 10 x 3 / 512)
    cam_bits: int | None = None  # quantise CAM's gamma and beta to this many bits (the paper's 8-bit variant)
    cam_norm: bool | None = None  # CAM's per-point layer norm (None: the paper's variant's, on for images and directions)
    steps: int = 20000  # training length in steps (progress = step / steps) ...
    max_time: float | None = None  # ... or in seconds of training time; with both, whichever ends first
    preset: str | None = None  # "cpu" or "gpu": fills every option left None (None: by device)
    batch_rays: int | None = None  # rays of the first step; later steps size the batch to sample_budget
    sample_budget: int | None = None  # field samples per step the ray batch adapts to (nerfacc's examples)
    lr: float = 1e-2
    downscale: int = 0  # 0: automatic (1 unless the pixels overflow the memory budget); config.json keeps the factor
    occupancy_resolution: int | None = None
    occupancy_every: int = 16  # steps between occupancy-grid updates
    occupancy_warmup: float = 0.02  # progress during which every cell is refreshed
    samples_per_diagonal: int | None = None  # marching step = the box diagonal / this (instant-ngp: sqrt(3)*2/1024 on its unit cube)
    eval_stride: int | None = None  # end-of-fit evaluation renders every k-th test view (None: all on GPU, at most 25 on CPU)
    eval_chunk: int | None = None  # rays (or points) per chunk when rendering whole images
    batch_points: int | None = None  # pixels or points per step of the image and mesh-sdf tasks
    sdf_pool: int = 2**20  # mesh-sdf: training points drawn once, with their exact distances
    distortion: float = 0.0  # weight of mip-NeRF 360's distortion loss against floaters (theirs 0.01; 0 off)
    # L1 on the expected depth (unit frame, box half-size 1) for scenes with depth maps, 0 ignores them: at 1 a
    # 1% depth error costs what a colour MSE of 0.01 does; 0.1 barely moved 300-step fits (tests/test_fit.py).
    depth_weight: float = 1.0
    refine_poses: bool = False  # a learnable SE(3) correction per training camera
    pose_lr: float = 1e-3  # its base learning rate (on the same schedule as the field's)
    appearance: bool = False  # a colour transform per training image (exposure changes)
    checkpoint_every: int = 2000  # steps; a checkpoint is also written at the end and on Ctrl-C
    log_every: int = 25
    seed: int = 0
    device: str = "auto"
    tcnn: bool = False

    def resolved(self, device: torch.device, task: str = "radiance") -> FitConfig:
        """A copy for `task` with the preset chosen (by device unless given) and every option it sets filled
        in; a backend's own presets are for its radiance field, so they apply to that task only (and to an
        SDF from images, `--model sdf`, those of them its coordinate encoding shares, e.g. a grid's size)."""
        preset = self.preset or ("gpu" if device.type == "cuda" else "cpu")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        unset = {key: value for key, value in PRESETS[preset].items() if getattr(self, key) is None}
        backend = REGISTRY.get(self.field)
        field_defaults = getattr(backend, "presets", {}).get(preset, {}) if task == "radiance" else {}
        if field_defaults and self.model == "sdf":
            shared = inspect.signature(backend.coordinate_encoding).parameters
            field_defaults = {key: value for key, value in field_defaults.items() if key in shared}
        return dataclasses.replace(self, preset=preset, task=task, field_options={**field_defaults, **self.field_options},
                                   **unset)

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
