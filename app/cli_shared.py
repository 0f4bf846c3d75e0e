"""What the `recon` commands share: a trained run opened, its task and splits checked, an output file checked
before the work, and the option helpers their parsers use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from recon.app.config import FitConfig, argument_type, option_help
from recon.app.pipeline import Pipeline
from recon.app.run import RunDir, UserError
from recon.app.trainer import resolve_device
from recon.data.checks import Number, contains
from recon.data.scene import Scene, load_scene


def number_option(spec: Number, default: int | float, help: str) -> dict[str, Any]:
    """add_argument's keywords for a number option: its type checks the range, its help shows the default."""
    return {"type": argument_type(spec), "default": default, "help": option_help(help, f"default {default:,}", spec)}


def output_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--output", help=f"file to write (default {default}; an existing file outside the run is "
                                    "replaced only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def open_run(path: str) -> tuple[RunDir, FitConfig]:
    """A run folder and its config, with the scene found wherever the run is opened from (a note when it is
    found beside the run instead of where it was)."""
    run = RunDir(path)
    cfg = run.load_config()
    cfg.scene, note = run.scene_path(cfg.scene, cfg.scene_from_run)
    if note:
        print(f"recon: {note}")
    return run, cfg


def load_run(path: str) -> tuple[RunDir, FitConfig, Pipeline, dict[str, Any]]:
    run, cfg = open_run(path)
    state = run.latest_state()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # runs move between machines and paths
        print(f"recon: {run.path} was trained with --device {cfg.device}; no GPU here, so it runs on the CPU")
        device = torch.device("cpu")
    pipeline = Pipeline.from_state(state["pipeline"]).to(device)
    return run, cfg, pipeline, state


def require_task(cfg: FitConfig, command: str, *tasks: str) -> None:
    if cfg.task not in tasks:
        raise UserError(f"{cfg.out}: {command} needs a run of task {' or '.join(tasks)}; this run's task is {cfg.task}")


def load_split(cfg: FitConfig, split: str) -> Scene:
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    if split not in scene.splits:
        raise UserError(f"{cfg.scene}: no '{split}' split (has: {', '.join(scene.splits)})")
    return scene


def world_box(flag: str, given: list[float]) -> torch.Tensor:
    """[2, 3] from a flag's X0 Y0 Z0 X1 Y1 Z1 (world frame); an empty box is the user's error."""
    box = torch.tensor(given, dtype=torch.float32).view(2, 3)
    if (box[1] <= box[0]).any():
        raise UserError(f"{flag} {given}: empty box (need x0 < x1, y0 < y1, z0 < z1)")
    return box


def output_file(given: str | None, default: Path, overwrite: bool, protected: tuple[Path, ...] = (),
                suffixes: tuple[str, ...] = ()) -> Path:
    """Where a command writes (and its sidecars, the same path with `suffixes`), checked before the work: not a
    folder, not a file of `protected` (a run's records, the input scene's files), and an existing file the user
    named replaced only with --overwrite; recon's own default names are replaced. Its folder is made."""
    output = Path(given) if given else default
    for path in (output, *(output.with_suffix(suffix) for suffix in suffixes)):
        if path.is_dir():
            raise UserError(f"{path}: is a folder; --output names a file")
        if path.exists() and any(contains(folder, path) for folder in protected):
            raise UserError(f"{path}: belongs to the run or its input; choose another --output")
        if path.exists() and given and not overwrite:
            raise UserError(f"{path}: exists (pass --overwrite to replace it)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{output.parent}: cannot be created ({error.strerror or error})") from None
    return output
