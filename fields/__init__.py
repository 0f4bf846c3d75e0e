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
    """Backend `name` over the box `aabb` for `task`: its radiance field; (task "image" or "sdf") its coordinate
    encoding decoded by that task's MLP (fields.coordinate); or ("surface") a NeuS SDF field (fields.surface)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown field '{name}' (known: {', '.join(sorted(REGISTRY))})")
    if task == "radiance":
        return REGISTRY[name](aabb=aabb, **options)
    if task == "surface":
        return SurfaceField(aabb, name, **options)
    return CoordinateField(aabb, name, task, **options)


def final_parameters(name: str, aabb: torch.Tensor, task: str = "radiance", **options: Any) -> int:
    """Parameters of the field once every progressive upscale is done (DVGO, TensoRF grow while training)."""
    field = build_field(name, aabb, task, **options)
    field.grow(1.0)
    return field.num_parameters()


def options_for_budget(name: str, aabb: torch.Tensor, task: str, budget: int, **options: Any) -> dict[str, Any]:
    """`options` with the backend's size option (its class's `size_option[task]`) set so that its final
    parameter count comes closest to `budget`: comparisons at equal size."""
    key = REGISTRY[name].size_option[task]
    count = lambda value: final_parameters(name, aabb, task, **{**options, key: value})  # noqa: E731
    lo, hi = 1, 2
    while count(hi) < budget:  # counts grow with the option; bracket the budget, then bisect.
        # Gentle steps: a size option may be an exponent (log2_table), where doubling it would not fit in memory.
        lo, hi = hi, max(hi + 1, int(hi * 1.25))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < budget else (lo, mid)
    best = min((lo, hi), key=lambda value: abs(count(value) - budget))
    return {**options, key: best}


from recon.fields import hashgrid, neurbf, pe, triplane, vm, voxel  # noqa: E402,F401  (each registers its backend)
from recon.fields.coordinate import CoordinateField  # noqa: E402
from recon.fields.surface import SurfaceField  # noqa: E402

__all__ = ["Field", "REGISTRY", "SurfaceField", "register", "build_field"]
