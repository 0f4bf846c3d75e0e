"""The run folder: everything a fit writes, in one place.

    RUN/config.json      every option (FitConfig)
    RUN/scene.json       what was loaded and the world -> unit transform
    RUN/checkpoints/     step-NNNNNNN.pt (atomic) and `latest`
    RUN/log.jsonl        one JSON record per logged step
    RUN/metrics.json     evaluation results (schema in the README)
    RUN/renders/         rendered test views and orbits
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from recon.app.checkpoint import atomic_write


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

    def create(self, overwrite: bool) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise UserError(f"{self.path}: run folder exists (pass --overwrite to replace it, or --resume to continue it)")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def require(self) -> None:
        """Check this is a run folder before a command reads it."""
        if not self.config.exists():
            raise UserError(f"{self.path}: not a run folder (no config.json)")

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
