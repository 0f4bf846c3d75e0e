"""The run folder: everything a fit writes, in one place.

    RUN/config.json      every option (FitConfig)
    RUN/scene.json       what was loaded and the world -> unit transform
    RUN/checkpoints/     step-NNNNNNN.pt (atomic) and `latest`
    RUN/log.jsonl        one JSON record per logged step
    RUN/metrics.json     evaluation results (schema in the README)
    RUN/renders/         rendered test views, orbits and camera-path videos
    RUN/camera_paths/    camera paths saved from the viewer (nerfstudio's camera_path.json)
    RUN/export/          meshes, SDF volumes, point clouds, videos (crop.json: the stored export box)

`--overwrite` replaces only a folder that holds exactly that, never one with anything else in it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from recon.app.checkpoint import atomic_write, latest_checkpoint, load_checkpoint
from recon.app.config import FitConfig
from recon.data.checks import contains, nothing_to_lose

# Everything a run writes at its top level; a folder holding anything else is not (only) a run.
RUN_ENTRIES = frozenset({"config.json", "scene.json", "checkpoints", "log.jsonl", "metrics.json", "renders", "export",
                         "crop.json", "refined_poses.json", "camera_paths"})


class UserError(Exception):
    """A problem with what the user asked for (exit code 2), or a run that cannot go on: printed as one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    scene = property(lambda self: self.path / "scene.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    log = property(lambda self: self.path / "log.jsonl")
    metrics = property(lambda self: self.path / "metrics.json")
    renders = property(lambda self: self.path / "renders")
    camera_paths = property(lambda self: self.path / "camera_paths")

    def check_new(self, overwrite: bool, scene: Path) -> None:
        """Refuse, before any work, a folder a new run cannot be written to without losing something: a
        file, a folder with content (unless `overwrite` and it is a recon run and nothing else), and any folder
        that holds the scene being fitted."""
        if contains(self.path, scene):
            raise UserError(f"{self.path}: holds the input {scene}; choose another run folder")
        problem = nothing_to_lose(self.path)
        if problem is None:
            return
        if not self.path.is_dir() or self.path.is_symlink():
            raise UserError(f"{self.path}: {problem}")
        if not overwrite:
            raise UserError(f"{self.path}: run folder exists (pass --overwrite to replace it, or --resume to "
                            "continue it)")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"{self.path}: --overwrite replaces only a recon run folder; this one also holds {shown}")

    def foreign_entries(self) -> list[str]:
        """What in the folder a run did not write (all of it when there is no run's config.json)."""
        names = [entry.name for entry in self.path.iterdir()]
        if not self.config.is_file() or not _is_run_config(self.config):
            return names
        return [name for name in names if name not in RUN_ENTRIES and not name.startswith(".")]

    def create(self, overwrite: bool, scene: Path) -> None:
        """Make the run folder; `overwrite` replaces a recon run there (check_new's rule, checked again)."""
        self.check_new(overwrite, scene)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{self.path}: cannot be created ({error.strerror or error})") from None

    def scene_path(self, stored: str, from_run: str | None) -> tuple[str, str | None]:
        """The scene a run was fitted on, from any working directory and after the run moved: the absolute
        path stored, else the path relative to the run (a note says so), else a UserError naming both."""
        if Path(stored).exists():
            return stored, None
        beside = os.path.normpath(self.path.absolute() / from_run) if from_run else None
        if beside and Path(beside).exists():
            return beside, f"{stored} is gone; using {beside} (where it lies relative to the run folder)"
        tried = f" nor at {beside} (relative to the run)" if beside else ""
        raise UserError(f"{self.path}: its scene is not at {stored}{tried}")

    def require(self) -> None:
        """Check this is a run folder before a command reads it."""
        if not self.config.exists():
            raise UserError(f"{self.path}: not a run folder (no config.json)")

    def load_config(self) -> FitConfig:
        """The run's config.json, or a UserError naming the folder or the file and what is wrong."""
        self.require()
        try:
            return FitConfig.load(self.config)
        except ValueError as error:
            raise UserError(str(error)) from None

    def latest_state(self) -> dict[str, Any]:
        """The latest checkpoint's state (CheckpointError for a bad file), or a UserError when there is none."""
        checkpoint = latest_checkpoint(self.checkpoints)
        if checkpoint is None:
            raise UserError(f"{self.checkpoints}: no checkpoint to load")
        return load_checkpoint(checkpoint)

    def write_json(self, path: Path, data: Any) -> None:
        write_json(path, data)

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: Path, data: Any) -> None:
    """Atomically, as checkpoints: a crash or a full disk never leaves half a file in place of a good one."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2, allow_nan=False) + "\n").encode()))


def _is_run_config(path: Path) -> bool:
    """config.json as a fit writes it (a scene and a field backend named), not any JSON of that name."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("scene"), str) and isinstance(doc.get("field"), str)
