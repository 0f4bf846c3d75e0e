"""Tri-planes as in K-Planes (Fridovich-Keil et al., CVPR 2023), static hybrid model; EG3D's representation.

Three axis-aligned feature planes (xy, xz, yz) at several scales. A point's feature is, per scale, the
three bilinear plane samples combined by Hadamard product (K-Planes: the product, unlike a sum, can
localise a signal in 3D, and it measured better) or by sum (EG3D), concatenated across scales, then
decoded by instant-ngp-sized MLPs (K-Planes' hybrid decoder: density and a geometry feature, then colour
from it and the spherical-harmonics direction). Planes start uniform in [0.1, 0.5] for the product
(so products start non-zero) and normal(0, 0.1) for the sum; plane total variation is the regulariser.

Not taken from K-Planes: its proposal networks (recon's occupancy grid skips empty space) and their
histogram and distortion losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.fields import register
from recon.fields.heads import EncodedRadianceField, RadianceHead

PLANE_AXES = ((0, 1), (0, 2), (1, 2))  # xy, xz, yz


def sample_planes(planes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bilinear samples [3, N, C] of planes [3, C, R, R] at u [N, 3] in [-1, 1]^3."""
    coords = torch.stack([u[:, list(axes)] for axes in PLANE_AXES])[:, None]  # [3, 1, N, 2]: (x -> width, y -> height)
    return F.grid_sample(planes, coords, mode="bilinear", align_corners=True)[:, :, 0].transpose(1, 2)


def plane_total_variation(planes: torch.Tensor) -> torch.Tensor:
    return planes.diff(dim=2).pow(2).mean() + planes.diff(dim=3).pow(2).mean()


@register("triplane")
class TriPlaneField(EncodedRadianceField):
    """resolution: the coarsest planes' side; scales multiply it (K-Planes: 128 x [1, 2, 4], 32 features each)."""

    presets = {"cpu": {"resolution": 64, "features": 16}}

    def __init__(self, aabb: torch.Tensor, resolution: int = 128, scales: tuple[int, ...] = (1, 2, 4),
                 features: int = 32, combine: str = "product", hidden: int = 64, tv: float = 1e-4):
        super().__init__(aabb)
        if combine not in ("product", "sum"):
            raise ValueError(f"combine must be 'product' or 'sum', got {combine!r}")
        self._config = dict(resolution=resolution, scales=list(scales), features=features, combine=combine,
                            hidden=hidden, tv=tv)
        self.planes = nn.ParameterList()
        for scale in scales:
            side = resolution * scale
            planes = torch.empty(3, features, side, side)
            nn.init.uniform_(planes, 0.1, 0.5) if combine == "product" else nn.init.normal_(planes, 0.0, 0.1)
            self.planes.append(nn.Parameter(planes))
        self.head = RadianceHead(features * len(scales), hidden)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        u = u.clamp(0, 1) * 2 - 1
        per_scale = []
        for planes in self.planes:
            samples = sample_planes(planes, u)
            per_scale.append(samples.prod(0) if self._config["combine"] == "product" else samples.sum(0))
        return torch.cat(per_scale, -1)

    def regularization(self) -> torch.Tensor | None:
        if not self._config["tv"]:
            return None
        return self._config["tv"] * sum(plane_total_variation(planes) for planes in self.planes)

    def config(self) -> dict[str, Any]:
        return dict(self._config)
