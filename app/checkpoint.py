"""Checkpoints: atomic writes, safe loads, and weights whose shapes may have changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; str(e) is one line naming the file."""


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file, fsync it, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Save `state` as checkpoints/step-NNNNNNN.pt and point `latest` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    atomic_write(folder / "latest", lambda f: f.write(path.name.encode()))
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    return path if path.exists() else None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint's state; tensors and plain data only, so loading never runs code from the file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a crafted pickle, a truncated or foreign file: all refused the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable recon checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format') if isinstance(state, dict) else None} "
                        f"is not {FORMAT}")
    return state


def load_resizing(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that first gives every parameter and buffer the checkpoint's shape.

    Backends change shape while training (grid upscaling), so a module built from its
    config may not match the saved tensors; the checkpoint is the truth.
    """
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, saved in state.items():
        tensor = own.get(name)
        if tensor is not None and tensor.shape != saved.shape:
            tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
    module.load_state_dict(state)
