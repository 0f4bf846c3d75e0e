"""Tri-planes as in K-Planes (Fridovich-Keil et al., CVPR 2023), static hybrid model; EG3D's representation.

Three axis-aligned feature planes (xy, xz, yz) at several scales. A point's feature is, per scale, the
three bilinear plane samples combined by Hadamard product (K-Planes: the product, unlike a sum, can
localise a signal in 3D, and it measured better) or by sum (EG3D), concatenated across scales, then
decoded by instant-ngp-sized MLPs (K-Planes' hybrid decoder: density and a geometry feature, then colour
from it and the spherical-harmonics direction). Planes start uniform in [0.1, 0.5] for the product
(so products start non-zero) and normal(0, 0.1) for the sum; plane total variation is the regulariser.

For the coordinate tasks the backend is the planes alone: in 3D the same three, in 2D the one image plane
(K-Planes' k-planes are the C(D, 2) axis pairs), decoded by the task's MLP.

Not taken from K-Planes: its proposal networks (recon's occupancy grid skips empty space) and their
histogram and distortion losses.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from recon.fields import register
from recon.fields.encodings import Encoding
from recon.fields.heads import EncodedRadianceField, RadianceHead


def plane_total_variation(planes: torch.Tensor) -> torch.Tensor:
    return planes.diff(dim=2).pow(2).mean() + planes.diff(dim=3).pow(2).mean()


class PlaneEncoding(Encoding):
    """Feature planes over every pair of axes (xy, xz, yz in 3D; the one plane in 2D) at `resolution` x each
    of `scales`, `features` channels each; per scale the planes' bilinear samples are combined by product or
    sum, and the scales concatenated: [N, features * len(scales)]."""

    def __init__(self, dims: int, resolution: int = 128, scales: tuple[int, ...] = (1, 2, 4), features: int = 32,
                 combine: str = "product", tv: float = 1e-4):
        super().__init__()
        if combine not in ("product", "sum"):
            raise ValueError(f"combine must be 'product' or 'sum', got {combine!r}")
        self.dims, self.features, self.combine, self.tv = dims, features, combine, tv
        self.axes = list(itertools.combinations(range(dims), 2))
        self.planes = nn.ParameterList()
        for scale in scales:
            side = resolution * scale
            planes = torch.empty(len(self.axes), features, side, side)
            nn.init.uniform_(planes, 0.1, 0.5) if combine == "product" else nn.init.normal_(planes, 0.0, 0.1)
            self.planes.append(nn.Parameter(planes))

    @property
    def out_dim(self) -> int:
        return self.features * len(self.planes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u.clamp(0, 1) * 2 - 1
        # [P, 1, N, 2]: (x -> width, y -> height)
        coords = torch.stack([u[:, list(axes)] for axes in self.axes])[:, None]
        per_scale = []
        for planes in self.planes:
            samples = F.grid_sample(planes, coords, mode="bilinear", align_corners=True)[:, :, 0].transpose(1, 2)
            per_scale.append(samples.prod(0) if self.combine == "product" else samples.sum(0))
        return torch.cat(per_scale, -1)

    def regularization(self) -> torch.Tensor | None:
        return self.tv * sum(plane_total_variation(planes) for planes in self.planes) if self.tv else None


@register("triplane")
class TriPlaneField(EncodedRadianceField):
    """resolution: the coarsest planes' side; scales multiply it (K-Planes: 128 x [1, 2, 4], 32 features each)."""

    presets = {"cpu": {"resolution": 64, "features": 16}}
    size_option = {"radiance": "resolution", "image": "resolution", "sdf": "resolution"}
    bounded = True

    def __init__(self, aabb: torch.Tensor, resolution: int = 128, scales: tuple[int, ...] = (1, 2, 4),
                 features: int = 32, combine: str = "product", hidden: int = 64, tv: float = 1e-4):
        super().__init__(aabb)
        self.encoding = PlaneEncoding(3, resolution, scales, features, combine, tv)
        self.head = RadianceHead(self.encoding.out_dim, hidden)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, resolution: int | None = None,
                            scales: tuple[int, ...] = (1, 2, 4), features: int = 32, combine: str | None = None,
                            tv: float = 1e-4) -> Encoding:
        """By default K-Planes' 128 in 3D; in 2D the finest plane at half the finest cells (pixels). In 3D the
        planes are summed by default: on the armadillo SDF the sum reached 0.990 IoU / 8.8 deg against the
        product's 0.949 / 10.5 at equal size and steps (BENCHMARKS.md)."""
        default = 128 if len(extent) == 3 else max(2, round(finest / 2 / max(scales)))
        combine = combine or ("sum" if len(extent) == 3 else "product")
        return PlaneEncoding(len(extent), resolution or default, scales, features, combine, tv)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        return self.encoding(u)

    def regularization(self) -> torch.Tensor | None:
        return self.encoding.regularization()
