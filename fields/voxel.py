"""DVGO's fine stage (Sun et al., "Direct Voxel Grid Optimization", CVPR 2022): dense voxel grids.

A density grid read with post-activation interpolation (interpolate the raw value, then softplus
with a shift set from the initial alpha, so a fresh grid is nearly transparent instead of opaque), and
a feature grid decoded with the positional-encoded view direction by a shallow MLP for view-dependent
colour. Training starts from a coarser grid and upscales it at fixed points of progress (progressive
scaling, each time doubling the voxel count, the optimiser rebuilt as the official code does); the
resolution reached is stored with the weights, so checkpoints reload at it. Total-variation
regularisation on both grids is an option (the official NeRF-synthetic configuration leaves it off;
its unbounded configurations use 1e-6 and 1e-7).

Not taken from DVGO: its coarse stage (recon's occupancy grid, seeded by the alpha visual hull, finds
the occupied box and skips empty space) and its background-entropy and per-point colour losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.fields import register
from recon.fields.base import Field
from recon.fields.encodings import MLP, FrequencyEncoding


def grid_shape(extent: torch.Tensor, num_voxels: int) -> list[int]:
    """Voxels per axis for about `num_voxels` cubic voxels over a box of side lengths `extent` (DVGO's rule)."""
    voxel = (float(extent.prod()) / num_voxels) ** (1 / 3)
    return [max(2, int(e / voxel)) for e in extent.tolist()]


def sample_grid(grid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Trilinear samples [N, C] of a grid [1, C, X, Y, Z] at u [N, 3] in [0, 1]^3 (corner voxels at 0 and 1)."""
    coords = (u * 2 - 1).flip(-1).view(1, 1, 1, -1, 3)  # grid_sample wants (z, y, x) order in [-1, 1]
    return F.grid_sample(grid, coords, mode="bilinear", align_corners=True).view(grid.shape[1], -1).T


def total_variation(grid: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring voxels along each axis, summed over the three axes."""
    return sum(grid.diff(dim=axis).pow(2).mean() for axis in (2, 3, 4))


@register("voxel")
class VoxelGridField(Field):
    """DVGO's dense grids over the box `aabb`; density is 0 outside it.

    num_voxels: the final voxel count (DVGO's fine stage: 160³). upscale_at: progress fractions at
    which the grid doubles its voxel count (DVGO: steps 1k, 2k, 3k, 4k of 20k); it starts at
    num_voxels / 2^len(upscale_at). Densities are in units of the final voxel size (DVGO's
    voxel_size_base), so the step rule never rescales them.
    """

    outputs = frozenset({"density", "rgb"})
    presets = {"cpu": {"num_voxels": 96**3}}

    def __init__(self, aabb: torch.Tensor, num_voxels: int = 160**3, features: int = 12, hidden: int = 128,
                 hidden_layers: int = 2, view_frequencies: int = 4, alpha_init: float = 1e-2,
                 upscale_at: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2), tv_density: float = 0.0,
                 tv_features: float = 0.0):
        super().__init__(aabb)
        self._config = dict(num_voxels=num_voxels, features=features, hidden=hidden, hidden_layers=hidden_layers,
                            view_frequencies=view_frequencies, alpha_init=alpha_init, upscale_at=list(upscale_at),
                            tv_density=tv_density, tv_features=tv_features)
        extent = self.aabb[1] - self.aabb[0]
        self.voxel_base = (float(extent.prod()) / num_voxels) ** (1 / 3)
        self.shift = math.log(1 / (1 - alpha_init) - 1)  # softplus(0 + shift) * 1 voxel = -log(1 - alpha_init)
        self.upscale_at = tuple(upscale_at)
        self.register_buffer("upscales_done", torch.zeros((), dtype=torch.long))
        shape = grid_shape(extent, num_voxels // 2 ** len(upscale_at))
        self.density_grid = nn.Parameter(torch.zeros(1, 1, *shape))
        self.feature_grid = nn.Parameter(torch.zeros(1, features, *shape))
        self.view_encoding = FrequencyEncoding(3, view_frequencies)
        self.color_net = MLP(features + self.view_encoding.out_dim, 3, hidden, hidden_layers)
        nn.init.zeros_(self.color_net[-1].bias)

    @property
    def resolution(self) -> list[int]:
        return list(self.density_grid.shape[2:])

    def _inside(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.normalize(x)
        return u.clamp(0, 1), ((u >= 0) & (u <= 1)).all(-1)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        u, inside = self._inside(x)
        raw = sample_grid(self.density_grid, u)[:, 0]
        return F.softplus(raw + self.shift) / self.voxel_base * inside  # post-activation

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        u, inside = self._inside(x)
        raw = sample_grid(self.density_grid, u)[:, 0]
        features = sample_grid(self.feature_grid, u)
        rgb = torch.sigmoid(self.color_net(torch.cat([features, self.view_encoding(d)], -1)))
        return {"density": F.softplus(raw + self.shift) / self.voxel_base * inside, "rgb": rgb}

    def update(self, progress: float) -> bool:
        """Progressive scaling: upscale once per milestone passed; True when the parameters were replaced."""
        due = sum(progress >= at for at in self.upscale_at)
        if due <= int(self.upscales_done):
            return False
        self.upscales_done.fill_(due)
        extent = self.aabb[1] - self.aabb[0]
        shape = grid_shape(extent, self._config["num_voxels"] // 2 ** (len(self.upscale_at) - due))
        with torch.no_grad():
            for name in ("density_grid", "feature_grid"):
                grid = getattr(self, name)
                resized = F.interpolate(grid.data, size=shape, mode="trilinear", align_corners=True)
                setattr(self, name, nn.Parameter(resized))
        return True

    def regularization(self) -> torch.Tensor | None:
        weights = (self._config["tv_density"], self._config["tv_features"])
        if not any(weights):
            return None
        return weights[0] * total_variation(self.density_grid) + weights[1] * total_variation(self.feature_grid)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # DVGO: 0.1 for the grids and 1e-3 for the MLP, i.e. 10x and 0.1x recon's base rate of 1e-2.
        return [
            {"name": "grids", "params": [self.density_grid, self.feature_grid], "lr": 10 * lr, "weight_decay": 0.0},
            {"name": "mlp", "params": list(self.color_net.parameters()), "lr": 0.1 * lr, "weight_decay": 0.0},
        ]

    def config(self) -> dict[str, Any]:
        return dict(self._config)
