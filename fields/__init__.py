"""Field backends and the registry that names them.

A new backend is one file in this folder plus one line in `REGISTRY`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from recon.fields.base import Field

# name -> builder(aabb, **options) -> Field
REGISTRY: dict[str, Callable[..., Field]] = {}


def register(name: str) -> Callable[[type[Field]], type[Field]]:
    def wrap(cls: type[Field]) -> type[Field]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def build_field(name: str, aabb: torch.Tensor, task: str = "radiance", **options: Any) -> Field:
    """Backend `name` over the box `aabb` for `task`: its radiance field, or (task "image" or "sdf") its
    coordinate encoding decoded by that task's MLP (fields.coordinate)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown field '{name}' (known: {', '.join(sorted(REGISTRY))})")
    if task == "radiance":
        return REGISTRY[name](aabb=aabb, **options)
    return CoordinateField(aabb, name, task, **options)


from recon.fields import hashgrid, pe, triplane, vm, voxel  # noqa: E402,F401  (each registers its backend)
from recon.fields.coordinate import CoordinateField  # noqa: E402

__all__ = ["Field", "REGISTRY", "register", "build_field"]
