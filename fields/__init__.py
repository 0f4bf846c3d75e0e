"""Field backends and the registry that names them.

A new backend is one file in this folder whose class carries `@register("name")`: every module here is imported
with the package, so nothing else needs to know of it. What a backend can do it declares on its class (see
`Field`): the registry and the app ask instead of checking names or types.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

import torch

from recon.fields.base import Field

# name -> the backend's class, built as cls(aabb=..., **options)
REGISTRY: dict[str, type[Field]] = {}


def register(name: str) -> Callable[[type[Field]], type[Field]]:
    def wrap(cls: type[Field]) -> type[Field]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def build_field(name: str, aabb: torch.Tensor, task: str = "radiance", **options: Any) -> Field:
    """Backend `name` over the box `aabb` for `task`: its radiance field; (task "image" or "sdf") its coordinate
    encoding decoded by that task's MLP (fields.coordinate); or ("surface") a NeuS SDF field (fields.surface).

    The field's `options` record what rebuilds it, `build_field(name, aabb, **field.options)`: the options given
    and its constructor's default values, so a saved field rebuilds as it was trained even if a default changes."""
    if name not in REGISTRY:
        raise KeyError(f"unknown field '{name}' (known: {', '.join(sorted(REGISTRY))})")
    if task != "radiance" and not REGISTRY[name].has_coordinate_encoding():
        raise ValueError(f"field '{name}' fits radiance only: it has no coordinate encoding for task '{task}'")
    if task == "radiance":
        cls, field = REGISTRY[name], REGISTRY[name](aabb=aabb, **options)
    elif task == "surface":
        cls, field = SurfaceField, SurfaceField(aabb, name, **options)
    else:
        cls, field = CoordinateField, CoordinateField(aabb, name, task, **options)
    defaults = {key: p.default for key, p in inspect.signature(cls.__init__).parameters.items()
                if p.default not in (p.empty, None)}  # None: derived from the rest, again when rebuilt
    field.options = {**defaults, **options} | ({} if task == "radiance" else {"task": task})
    return field


def final_parameters(name: str, aabb: torch.Tensor, task: str = "radiance", **options: Any) -> int:
    """Parameters of the field once every progressive upscale is done (DVGO, TensoRF grow while training)."""
    field = build_field(name, aabb, task, **options)
    if field.grows:
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


from recon.fields.coordinate import CoordinateField  # noqa: E402
from recon.fields.surface import SurfaceField  # noqa: E402

for _module in pkgutil.iter_modules(__path__):  # each backend's module registers it
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Field", "REGISTRY", "SurfaceField", "register", "build_field"]
