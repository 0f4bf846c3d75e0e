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
import torch.nn.functional as F
from torch import nn

from recon.fields.base import Field
from recon.fields.encodings import MLP

TASKS = ("image", "sdf")
# instant-ngp's SDF and NeRF grids end at 2048 cells over a box of side 2: the finest detail per unit length.
FINEST_PER_UNIT = 1024
SPHERE_RADIUS = 0.5  # of the untrained SDF, in box-centred coordinates ([-1, 1] along the longest side)
SOFTPLUS_BETA = 100  # NeuS / IDR


class SphereInitMLP(nn.Module):
    """in_dim -> `layers` softplus(beta=100) layers -> 1, whose first `coords` inputs are positions.

    Geometric initialisation (Atzmon & Lipman, SAL; as IDR and NeuS): hidden weights N(0, sqrt(2 / width)),
    the first layer's weights on everything but the positions zero, the last layer's weights
    N(sqrt(pi / width), 1e-4) and bias -radius, so the output starts close to |x| - radius.
    """

    def __init__(self, in_dim: int, coords: int, hidden: int, layers: int, radius: float = SPHERE_RADIUS):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 1)
        with torch.no_grad():
            for i, layer in enumerate(self.hidden):
                nn.init.normal_(layer.weight, 0.0, math.sqrt(2 / layer.out_features))
                nn.init.zeros_(layer.bias)
                if i == 0:
                    layer.weight[:, coords:] = 0
            nn.init.normal_(self.out.weight, math.sqrt(math.pi / dims[-1]), 1e-4)
            self.out.bias.fill_(-radius)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            h = F.softplus(layer(h), beta=SOFTPLUS_BETA)
        return self.out(h)


class CoordinateField(Field):
    """Backend `backend`'s coordinate encoding over the box `aabb` [2, D], decoded for `task`.

    hidden, layers, lr_scale: the decoder (defaults: the backend's `coordinate_decoder`); every other option
    goes to the backend's `coordinate_encoding`.
    """

    def __init__(self, aabb: torch.Tensor, backend: str, task: str, hidden: int | None = None,
                 layers: int | None = None, lr_scale: float | None = None, **encoding_options: Any):
        from recon.fields import REGISTRY

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        aabb = torch.as_tensor(aabb, dtype=torch.float32)
        super().__init__(aabb.reshape(2, -1))
        self.name, self.task = backend, task
        self.outputs = frozenset({"rgb"} if task == "image" else {"sdf"})
        given = {"hidden": hidden, "layers": layers, "lr_scale": lr_scale}
        self.decoder_options = {**REGISTRY[backend].coordinate_decoder, **{k: v for k, v in given.items() if v is not None}}
        self._config = {"task": task, **{k: v for k, v in given.items() if v is not None}, **encoding_options}
        extent = (self.aabb[1] - self.aabb[0]).tolist()
        finest = max(extent) if task == "image" else FINEST_PER_UNIT * max(extent)
        self.encoding = REGISTRY[backend].coordinate_encoding(extent, finest, **encoding_options)
        hidden, layers = self.decoder_options["hidden"], self.decoder_options["layers"]
        if task == "image":
            self.decoder = MLP(self.encoding.out_dim, 3, hidden, layers)
        else:
            self.decoder = SphereInitMLP(self.dims + self.encoding.out_dim, self.dims, hidden, layers)

    @property
    def dims(self) -> int:
        return self.aabb.shape[1]

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        u = self.normalize(x)
        if self.task == "image":
            return self.decoder(self.encoding(u))
        # Box-centred coordinates, [-1, 1] along the longest side, so the initial sphere stays round.
        extent = self.aabb[1] - self.aabb[0]
        centred = (u - 0.5) * (extent / extent.max() * 2)
        return self.decoder(torch.cat([centred, self.encoding(u)], -1))[:, 0]

    def forward(self, x: torch.Tensor, d: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"rgb" if self.task == "image" else "sdf": self._decode(x)}

    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Colours [N, 3] (image task; not clamped)."""
        return self._decode(x)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] in unit-frame lengths, negative inside (sdf task)."""
        return self._decode(x)

    def update(self, progress: float) -> bool:
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

    def config(self) -> dict[str, Any]:
        return dict(self._config)
