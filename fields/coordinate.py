"""Fields for the coordinate tasks: any backend's encoding decoded by an MLP.

- `image`: pixel positions (a box in pixel units) -> rgb, linear output trained with L2 (instant-ngp's image
  task);
- `sdf`: points -> signed distance, negative inside: the MLP (softplus, NeuS/IDR) sees the encoding and the
  box-centred coordinates, with the geometric initialisation of SAL / IDR (the first layer blind to the
  encoding, the last set so the untrained field is the SDF of a sphere), so every backend starts as a sphere.

The backend contributes `coordinate_encoding` (its grid, planes, factors or frequencies, in 2D or 3D) and the
default size of the MLP (`coordinate_decoder`); this module adds the decoder, so a backend never needs an
image or SDF variant of its own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recon.fields.base import Field
from recon.fields.cam import CamQuery
from recon.fields.encodings import MLP

TASKS = ("image", "sdf")
# instant-ngp's SDF and NeRF grids end at 2048 cells over a box of side 2: the finest detail per unit length.
FINEST_PER_UNIT = 1024
SPHERE_RADIUS = 0.5  # of the untrained SDF, in box-centred coordinates ([-1, 1] along the longest side)


def sphere_init(mlp: MLP, coords: int, radius: float = SPHERE_RADIUS) -> MLP:
    """Geometric initialisation (Atzmon & Lipman, SAL; as IDR and NeuS) of an MLP whose first `coords`
    inputs are positions: hidden weights N(0, sqrt(2 / width)), the first layer's weights on everything but
    the positions zero, the last layer's weights N(sqrt(pi / width), 1e-4) and bias -radius, so the output
    starts close to |x| - radius."""
    with torch.no_grad():
        for i, layer in enumerate(mlp.hidden):
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2 / layer.out_features))
            nn.init.zeros_(layer.bias)
            if i == 0:
                layer.weight[:, coords:] = 0
        nn.init.normal_(mlp.out.weight, math.sqrt(math.pi / mlp.out.in_features), 1e-4)
        mlp.out.bias.fill_(-radius)
    return mlp


class CoordinateField(Field):
    """Backend `backend`'s coordinate encoding over the box `aabb` [2, D], decoded for `task`.

    hidden, layers, lr_scale, sine: the decoder (defaults: the backend's `decoder_defaults(task)`); `sine`
    [lo, hi] makes its first layer sinusoidal (NeuRBF's), and an SDF decoder then sees the encoding alone
    instead of being the sphere-initialised one. Every other option goes to the backend's
    `coordinate_encoding`.
    """

    def __init__(self, aabb: torch.Tensor, backend: str, task: str, hidden: int | None = None,
                 layers: int | None = None, lr_scale: float | None = None, sine: list[float] | None = None,
                 geo_features: int = 0, **encoding_options: Any):
        from recon.fields import REGISTRY

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        super().__init__(aabb.reshape(2, -1))
        self.name, self.task = backend, task
        self.bounded_backend = REGISTRY[backend].bounded  # a surface field contracts unbounded space as its backend
        self.outputs = frozenset({"rgb"} if task == "image" else {"sdf"})
        given = {"hidden": hidden, "layers": layers, "lr_scale": lr_scale, "sine": sine}
        self.decoder_options = {**REGISTRY[backend].decoder_defaults(task),
                                **{k: v for k, v in given.items() if v is not None}}
        extent = (self.aabb[1] - self.aabb[0]).tolist()
        finest = max(extent) if task == "image" else FINEST_PER_UNIT * max(extent)
        self.encoding = REGISTRY[backend].coordinate_encoding(extent, finest, **encoding_options)
        hidden, layers = self.decoder_options["hidden"], self.decoder_options["layers"]
        sine = self.decoder_options.get("sine")
        out = 3 if task == "image" else 1 + geo_features  # an SDF decoder may add a geometry feature (NeuS)
        self.sees_coordinates = task == "sdf" and not sine
        if self.sees_coordinates:  # softplus (beta 100) layers, as NeuS / IDR, starting as a sphere
            self.decoder = sphere_init(MLP(self.dims + self.encoding.out_dim, out, hidden, layers, "softplus"),
                                       self.dims)
        else:
            self.decoder = MLP(self.encoding.out_dim, out, hidden, layers, sine=sine or None)

    @property
    def dims(self) -> int:
        return self.aabb.shape[1]

    def _decode(self, x: torch.Tensor, point_ids: torch.Tensor | None) -> torch.Tensor:
        u = self.normalize(x)
        features = self.encoding(u) if point_ids is None else self.encoding(u, point_ids=point_ids)
        if self.sees_coordinates:
            # Box-centred coordinates, [-1, 1] along the longest side, so the initial sphere stays round.
            extent = self.aabb[1] - self.aabb[0]
            features = torch.cat([(u - 0.5) * (extent / extent.max() * 2), features], -1)
        return self.decoder(features, CamQuery(u))

    def forward(self, x: torch.Tensor, d: torch.Tensor | None = None,
                point_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self._decode(x, point_ids)
        return {"rgb": out} if self.task == "image" else {"sdf": out[:, 0]}

    def rgb(self, x: torch.Tensor, point_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Colours [N, 3] (image task; not clamped). point_ids: rows of the attached point set that x are."""
        return self._decode(x, point_ids)

    def sdf(self, x: torch.Tensor, point_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Signed distance [N] in unit-frame lengths, negative inside (sdf task)."""
        return self._decode(x, point_ids)[:, 0]

    def sdf_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed distance [N], geometry feature [N, geo_features]) (sdf task)."""
        out = self._decode(x, None)
        return out[:, 0], out[:, 1:]

    @property
    def grows(self) -> bool:
        return self.encoding.grows

    def adapt(self, x: torch.Tensor, weights: torch.Tensor, generator: torch.Generator | None = None) -> bool:
        """Let a data-adaptive encoding (NeuRBF) place itself from points x weighted by `weights`; True if it did."""
        if not self.encoding.adaptive:
            return False
        self.encoding.adapt(self.normalize(x), weights, generator)
        return True

    def attach(self, x: torch.Tensor) -> bool:
        """Tell the encoding the fixed set of points training draws from, so it can index them once
        (`point_ids` then name rows of x); True if it keeps them."""
        if not self.encoding.adaptive:
            return False
        self.encoding.attach(self.normalize(x))
        return True

    def grow(self, progress: float) -> bool:
        return self.encoding.update(progress)

    def regularization(self) -> torch.Tensor | None:
        return self.encoding.regularization()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"name": "mlp", "params": list(self.decoder.parameters()),
                   "lr": lr * self.decoder_options.get("lr_scale", 1.0), "weight_decay": 1e-6}]
        encoding = list(self.encoding.parameters())
        if encoding:
            groups.insert(0, {"name": "encoding", "params": encoding, "lr": lr * self.encoding.lr_scale,
                              "weight_decay": 0.0})
        return groups
