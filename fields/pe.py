"""The positional-encoding MLP of NeRF (Mildenhall et al., ECCV 2020): no grid, all in the weights.

Positions in the box's [-1, 1]^3 frame are encoded with `frequencies` octaves (NeRF: 10; NeuS: 6), directions
with `view_frequencies` (NeRF: 4). A `depth`-layer ReLU trunk of `width` units, the encoded input fed
again after layer 4 (NeRF's skip), gives the density and a feature; one more layer of width/2 takes the
feature and the encoded direction to colour.

NeRF's ReLU density is replaced by softplus: identical where positive, but it never dies at zero.

For the coordinate tasks the backend is the encoding of [-1, 1]^D coordinates (or, with `fourier_features`,
random Gaussian Fourier features of [0, 1]^D ones), decoded by a `layers` x `hidden` MLP (default 4 x 256, a
Fourier-feature network's size) at a tenth of the base learning rate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.fields import register
from recon.fields.base import Field, inside_unit_box
from recon.fields.cam import CamQuery
from recon.fields.encodings import MLP, Encoding, FrequencyEncoding, GaussianFourierEncoding

SKIP_AFTER = 4  # NeRF feeds the encoded position again after its 4th layer


class CentredFrequencyEncoding(FrequencyEncoding):
    """FrequencyEncoding of u in [0, 1]^D taken to [-1, 1]^D."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return super().forward(u * 2 - 1)


@register("pe")
class PositionalEncodingField(Field):
    outputs = frozenset({"density", "rgb"})
    # Eight 256-wide layers per sample are ~1 s a step on 2 cores; four 128-wide ones ~8x less.
    presets = {"cpu": {"depth": 4, "width": 128}}
    size_option = {"radiance": "width", "image": "hidden", "sdf": "hidden"}
    coordinate_decoder = {"hidden": 256, "layers": 4, "lr_scale": 0.1}
    smooth_gradient = True

    def __init__(self, aabb: torch.Tensor, frequencies: int = 10, view_frequencies: int = 4, depth: int = 8,
                 width: int = 256):
        super().__init__(aabb)
        self.position_encoding = FrequencyEncoding(3, frequencies)
        self.view_encoding = FrequencyEncoding(3, view_frequencies)
        self.trunk = MLP(self.position_encoding.out_dim, None, width, depth, skip=SKIP_AFTER)
        self.density_out = nn.Linear(width, 1)
        self.feature_out = nn.Linear(width, width)
        self.color_net = MLP(width + self.view_encoding.out_dim, 3, width // 2, 1)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, frequencies: int = 10,
                            fourier_features: int = 0, fourier_scale: float = 10.0) -> Encoding:
        """NeRF's octaves, or with `fourier_features` > 0 a Fourier-feature network's random Gaussian ones
        (CAM's image backbone: 256 at scale 10, with `layers=3`)."""
        if fourier_features:
            return GaussianFourierEncoding(len(extent), fourier_features, fourier_scale)
        return CentredFrequencyEncoding(len(extent), frequencies)

    def cam_targets(self) -> list[MLP]:
        return [self.trunk]  # CAM's NeRF variants modulate the trunk, not the colour branch

    def _trunk(self, x: torch.Tensor, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.normalize(x)
        inside = inside_unit_box(u)
        return self.trunk(self.position_encoding(u * 2 - 1), CamQuery(u, d)), inside

    def density(self, x: torch.Tensor) -> torch.Tensor:
        h, inside = self._trunk(x)
        return F.softplus(self.density_out(h)[:, 0]) * inside

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        h, inside = self._trunk(x, d)
        rgb = torch.sigmoid(self.color_net(torch.cat([self.feature_out(h), self.view_encoding(d)], -1)))
        return {"density": F.softplus(self.density_out(h)[:, 0]) * inside, "rgb": rgb}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # NeRF trains at 5e-4 (Adam); recon's base rate is 1e-2, so a twentieth of it.
        return [{"name": "mlp", "params": list(self.parameters()), "lr": lr / 20, "weight_decay": 0.0}]
