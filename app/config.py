"""Every option of a fit, defined once: its default, type, range and help. The command line's options, their
`--help` defaults, the checks of a value (typed or read back from config.json) and config.json itself all
come from FitConfig's fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from recon.data.checks import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Number
from recon.fields import REGISTRY

# Defaults that depend on the machine; a field backend adds its own (its class's `presets`).
# gpu: instant-ngp's (the proposal sampler's: nerfacto's). cpu: what a 2-core CPU trains fastest with (BENCHMARKS.md,
# issue 3; the proposal sampler's: mip-NeRF 360's counts, a third of nerfacto's samples, issue 32).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"batch_rays": 4096, "sample_budget": 2**18, "occupancy_resolution": 128, "samples_per_diagonal": 1024,
            "eval_chunk": 2**16, "batch_points": 2**18, "proposal_samples": [256, 96], "field_samples": 48},
    "cpu": {"batch_rays": 1024, "sample_budget": 2**15, "occupancy_resolution": 64, "samples_per_diagonal": 256,
            "eval_chunk": 2**13, "batch_points": 2**16, "proposal_samples": [64, 64], "field_samples": 32},
}
SAMPLERS = ("auto", "occupancy", "proposal")
PROPOSAL_DISTORTION = 0.002  # nerfacto's distortion weight, the default with the proposal sampler
TASKS = ("radiance", "image", "mesh-sdf")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


def option(default: Any = None, help: str | None = None, check: Any = None, choices: tuple[str, ...] | None = None,
           **argparse_keywords: Any) -> Any:
    """A FitConfig field. With `help` it is a command-line option (the flag is the name with dashes unless
    argparse_keywords give `flag`); `check` converts and range-checks a value (a data.checks.Number or any
    callable that raises ValueError), on the command line and in config.json alike; `choices` is the check
    of a value that names one of them."""
    if choices is not None:
        check, argparse_keywords["choices"] = _one_of(tuple(choices)), tuple(choices)
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return dataclass_field(**factory, metadata={"help": help, "check": check, "argparse": argparse_keywords})


def _one_of(names: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value
    return check


def _sample_counts(counts: Any) -> list[int]:
    """--proposal-samples: one to three counts, each 1..4096."""
    if not isinstance(counts, list) or not 1 <= len(counts) <= 3:
        raise ValueError("must be one to three sample counts")
    return [Number(int, 1, 4096)(count) for count in counts]


def _six_finite(box: Any) -> list[float]:
    """--surface-box read back from config.json (the command line's type reads each number)."""
    if not isinstance(box, list) or len(box) != 6 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError("must be six finite numbers")
    return box


@dataclass
class FitConfig:
    scene: str  # the scene folder or file, absolute once the run is made
    out: str  # the run folder
    field: str = option("hashgrid", "field backend", choices=sorted(REGISTRY))
    field_options: dict[str, Any] = option(dict)  # backend keyword arguments (-o KEY=VALUE, parsed in app.fit_command)
    task: str = option("radiance", choices=TASKS)  # what the input is: posed images, an image, or a mesh
    model: str = option("radiance", "posed images: a density field or an SDF field trained NeuS-style",
                        choices=("radiance", "sdf"))
    surface_box: list[float] | None = option(
        None, "--model sdf: the box the SDF covers, world frame (default: the inner cascade, instant-ngp's unit "
        "cube); a density field answers around it", _six_finite, type=float, nargs=6,
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"))
    quantize: float = option(0.0, "quantized coordinates (CQ-NIR) on any field: cell size / object radius, e.g. "
                             "2e-4; 0 off", NON_NEGATIVE, metavar="CELL")
    params: int | None = option(None, "size the backend to about N parameters (its size option, e.g. log2_table, "
                                "num_voxels); config.json records the value chosen", POSITIVE_INT, metavar="N")
    cam: str | None = option(None, "coordinate-aware modulation of the field's MLPs (CAM); auto: the view direction "
                             "for radiance, a 2D grid for images, tri-planes for SDFs",
                             choices=("auto", "plane", "direction", "triplane"), nargs="?", const="auto")
    cam_resolution: int | None = option(None, "CAM grid side (default the paper's: 32, 10 x 3 or 512)", Number(int, 2),
                                        metavar="N")
    cam_bits: int | None = option(None, "quantise CAM's gamma and beta to B bits, e.g. 8", Number(int, 2, 16),
                                  metavar="B")
    cam_norm: bool | None = option(None, "CAM's per-point layer norm (default the paper's: on for images and "
                                   "directions)", action=argparse.BooleanOptionalAction)
    steps: int | None = option(20000, "training steps (progress = step / steps)", POSITIVE_INT)
    max_time: float | None = option(None, "training time cap in seconds (schedules follow it); with --steps, "
                                    "whichever ends first", POSITIVE, metavar="SECONDS")
    preset: str | None = option(None, "machine defaults, filling every option marked 'preset' (default: by device)",
                                choices=tuple(PRESETS))
    batch_rays: int | None = option(None, "rays of the first step; later steps size the batch to --sample-budget",
                                    POSITIVE_INT)
    sample_budget: int | None = option(None, "field samples per step the ray batch adapts to (nerfacc's examples)",
                                       POSITIVE_INT)
    lr: float = option(1e-2, "base learning rate", POSITIVE)
    downscale: int = option(0, "divide image resolution by N (0: 1, or what fits a quarter of the memory); "
                            "config.json keeps the factor chosen", Number(int, 0), metavar="N")
    occupancy_resolution: int | None = option(None, "occupancy grid cells per side", Number(int, 4, 1024),
                                              flag="--grid-resolution")
    occupancy_every: int = option(16, check=POSITIVE_INT)  # steps between occupancy-grid updates
    occupancy_warmup: float = option(0.02, check=Number(float, 0, 1))  # progress during which every cell is refreshed
    samples_per_diagonal: int | None = option(None, "marching step = the box diagonal / this (instant-ngp: 1024)",
                                              POSITIVE_INT)
    sampler: str = option("auto", "how rays are sampled: marching an occupancy grid, or proposal density fields "
                          "(mip-NeRF 360, nerfacto); auto: proposal for unbounded scenes, else occupancy",
                          choices=SAMPLERS)
    proposal_samples: list[int] | None = option(None, "proposal sampler: samples per ray of each proposal level",
                                                _sample_counts, type=int, nargs="+", metavar="N")
    field_samples: int | None = option(None, "proposal sampler: the field's samples per ray", Number(int, 1, 4096),
                                       metavar="N")
    eval_stride: int | None = option(None, "evaluate every k-th test view after the fit (default: all on a GPU, at "
                                     "most 25 on a CPU)", POSITIVE_INT, metavar="K")
    eval_chunk: int | None = option(None, check=POSITIVE_INT)  # rays (or points) per chunk when rendering whole images
    batch_points: int | None = option(None, "image and mesh inputs: pixels or points per step", POSITIVE_INT)
    sdf_pool: int = option(2**20, "mesh inputs: training points with exact distances", POSITIVE_INT)
    distortion: float | None = option(None, "mip-NeRF 360's distortion loss against floaters (theirs 0.01; 0 off; "
                                      f"default {PROPOSAL_DISTORTION} with the proposal sampler, else 0)", NON_NEGATIVE,
                                      metavar="WEIGHT")
    gradient_scaling: bool | None = option(None, "scale each sample's gradients by min(1, (its distance from the "
                                           "camera / the cameras' spread)^2) against floaters by the cameras "
                                           "(\"Floaters No More\"; default: on for unbounded scenes)",
                                           action=argparse.BooleanOptionalAction)
    # L1 on the expected depth (unit frame, box half-size 1): at 1 a 1% depth error costs what a colour MSE of
    # 0.01 does; 0.1 barely moved 300-step fits (tests/test_fit.py).
    depth_weight: float = option(1.0, "scenes with depth maps: weight of the L1 depth loss (0 ignores them)",
                                 NON_NEGATIVE, metavar="W")
    refine_poses: bool = option(False, "learn an SE(3) correction per training camera (real captures with "
                                "imperfect poses; the hash grid opens coarse to fine meanwhile, and the test views "
                                "are scored from poses aligned to their photos)", action="store_true")
    pose_lr: float = option(3e-4, "learning rate of the pose corrections (decays exponentially to a hundredth)",
                            POSITIVE)
    appearance: bool = option(False, "a colour transform per training image, for exposure changes (test views: the "
                              "mean)", action="store_true")
    checkpoint_every: int = option(2000, "steps between checkpoints (also one at the end and on Ctrl-C)",
                                   POSITIVE_INT, metavar="STEPS")
    batches: int | None = option(None, "ray batches a step (each --batch-rays / --sample-budget, from its own random "
                                 "stream), their gradients averaged; a distributed run's ranks share them (default: "
                                 "one a rank, kept when resumed on another number of ranks)", POSITIVE_INT, metavar="N")
    log_every: int = option(25, check=POSITIVE_INT)
    seed: int = option(0, "random seed", Number(int, 0, 2**63 - 1))
    device: str = option("auto", "auto, cpu, cuda or cuda:N", device_name)
    tcnn: bool = option(False, "use tiny-cuda-nn if installed (untested)", action="store_true")
    scene_from_run: str | None = option(None)  # the scene relative to the run folder, for runs that move
    distilled_from: dict[str, Any] | None = option(None)  # `recon distill`: {"run": the teacher, "method": ...}

    def resolved(self, device: torch.device, task: str = "radiance", unbounded: bool = False) -> FitConfig:
        """A copy for `task` with the preset chosen (by device unless given) and every option it sets filled
        in; a backend's own presets are for its radiance field, so they apply to that task only (and to an
        SDF from images, `--model sdf`, those of them its coordinate encoding shares, e.g. a grid's size).
        The sampler "auto" becomes proposal for an `unbounded` scene, else occupancy; the distortion weight
        follows it; gradient scaling is on for an unbounded scene unless set."""
        preset = self.preset or ("gpu" if device.type == "cuda" else "cpu")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        unset = {key: value for key, value in PRESETS[preset].items() if getattr(self, key) is None}
        backend = REGISTRY.get(self.field)
        field_defaults = getattr(backend, "presets", {}).get(preset, {}) if task == "radiance" else {}
        if field_defaults and self.model == "sdf":
            shared = inspect.signature(backend.coordinate_encoding).parameters
            field_defaults = {key: value for key, value in field_defaults.items() if key in shared}
        sampler = self.sampler if self.sampler != "auto" else "proposal" if unbounded else "occupancy"
        distortion = self.distortion if self.distortion is not None else (
            PROPOSAL_DISTORTION if sampler == "proposal" else 0.0)
        scaling = unbounded if self.gradient_scaling is None else self.gradient_scaling
        return dataclasses.replace(self, preset=preset, task=task, sampler=sampler, distortion=distortion,
                                   gradient_scaling=scaling, field_options={**field_defaults, **self.field_options},
                                   **unset)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checked(self) -> FitConfig:
        """Every value through its field's check (ValueError "--flag VALUE: must be ..."); returns self."""
        for spec in dataclasses.fields(self):
            check, value = spec.metadata.get("check"), getattr(self, spec.name)
            if check is None or value is None:
                continue
            try:
                setattr(self, spec.name, check(value))
            except ValueError as error:
                raise ValueError(f"{flag_of(spec)} {value!r}: {error}") from None
        return self

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FitConfig":
        """The config of a config.json, checked as typed options are; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("scene"), str):
            raise ValueError("not a recon run's config (no scene)")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (written by "
                             "another version of recon?)")
        if not isinstance(data.get("field_options", {}), dict):
            raise ValueError("field_options is not an object")
        # A run made before the proposal sampler marched its occupancy grid, whatever the scene, and one made
        # before gradient scaling did without it.
        return cls(**({"sampler": "occupancy", "gradient_scaling": False} | data)).checked()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        """config.json, or ValueError naming the file and what is wrong with it."""
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, RecursionError) as error:
            raise ValueError(f"{path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def flag_of(spec: dataclasses.Field) -> str:
    return spec.metadata.get("argparse", {}).get("flag") or "--" + spec.name.replace("_", "-")


def command_line_fields() -> list[dataclasses.Field]:
    """FitConfig's fields that are command-line options, in their definition order."""
    return [spec for spec in dataclasses.fields(FitConfig) if spec.metadata.get("help")]


def preset_default(name: str) -> str | None:
    values = {preset: table[name] for preset, table in PRESETS.items() if name in table}
    return ", ".join(f"{value} {preset}" for preset, value in values.items()) if values else None


def add_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """FitConfig's options on `parser`, every one defaulting to None (so a resume sees what was typed); their
    help shows the default a fit takes: `defaults`' (a command's own, e.g. the demo's), the field's, or the
    preset's."""
    defaults = defaults or {}
    for spec in command_line_fields():
        keywords = dict(spec.metadata["argparse"])
        flag = keywords.pop("flag", None) or flag_of(spec)
        default = defaults.get(spec.name, spec.default if spec.default is not dataclasses.MISSING else None)
        preset = preset_default(spec.name)
        shown = f"preset: {preset}" if preset else None if default in (None, False) else f"default {default}"
        keywords.setdefault("type", argument_type(spec.metadata["check"]) if "action" not in keywords else None)
        if keywords["type"] is None:
            del keywords["type"]
        if keywords.get("action") == "store_true":
            keywords["default"] = None
        help_text = option_help(spec.metadata["help"], shown, spec.metadata["check"])
        parser.add_argument(flag, dest=spec.name, help=help_text, **keywords)


def option_help(text: str, shown: str | None, check: Any) -> str:
    """An option's help: what it does, its default (or preset) and, for a number, its range."""
    limits = f"; {check.describe()}" if isinstance(check, Number) else ""
    return text + (f" ({shown})" if shown else "") + limits


def argument_type(check: Any):
    """A check as an argparse type: its message, not argparse's 'invalid value', says what is wrong."""
    if check is None:
        return None

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text}: {error}") from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse
