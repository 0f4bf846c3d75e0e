"""Decoders from encoded features to radiance, shared by the radiance-field backends."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recon.fields.base import Field, inside_unit_box
from recon.fields.cam import CamQuery
from recon.fields.encodings import MLP, SHEncoding, trunc_exp


class RadianceHead(nn.Module):
    """instant-ngp's two small MLPs: features [N, E] and unit directions [N, 3] -> density, rgb.

    The density MLP (E -> hidden -> geo_dim, one hidden layer) gives the geometry feature; its
    first channel is log-density, density = trunc_exp(raw + density_bias). With the default
    bias 0 (instant-ngp) a fresh field, whose encoded features start near 0, has density ~1
    everywhere; nerfacc's instant-ngp example uses -1 (density ~0.37). The colour MLP sees the
    whole geometry feature and the SH-encoded direction (geo_dim + 16 -> hidden -> hidden -> 3,
    sigmoid).
    """

    def __init__(self, in_dim: int, hidden: int = 64, geo_dim: int = 16, sh_degree: int = 4, density_bias: float = 0.0):
        super().__init__()
        self.density_bias = density_bias
        self.density_net = MLP(in_dim, geo_dim, hidden, layers=1)
        self.dir_encoding = SHEncoding(sh_degree)
        self.color_net = MLP(geo_dim + self.dir_encoding.out_dim, 3, hidden, layers=2)

    def forward(self, features: torch.Tensor, dirs: torch.Tensor,
                at: CamQuery | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(density [N], rgb [N, 3]). at: the query's coordinates for CAM."""
        geo = self.density_net(features, at)
        rgb = torch.sigmoid(self.color_net(torch.cat([geo, self.dir_encoding(dirs)], -1), at))
        return self._activate(geo), rgb

    def density_only(self, features: torch.Tensor, at: CamQuery | None = None) -> torch.Tensor:
        """Density [N] without the colour branch (occupancy updates, export)."""
        return self._activate(self.density_net(features, at))

    def _activate(self, geo: torch.Tensor) -> torch.Tensor:
        return trunc_exp(geo[..., 0] + self.density_bias)


class EncodedRadianceField(Field):
    """A position encoding decoded by a RadianceHead (instant-ngp, K-Planes' hybrid model).

    Subclasses set `self.head` and implement `encode(u)` for box coordinates u [N, 3] in [0, 1]^3
    (points outside the box arrive unclamped and get density 0). Parameters outside the head are
    the encoding's: never weight-decayed, while the MLPs take instant-ngp's 1e-6.
    """

    outputs = frozenset({"density", "rgb"})
    head: RadianceHead

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = self.normalize(x)
        return self.encode(u), inside_unit_box(u), u

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        features, inside, u = self._features(x)
        density, rgb = self.head(features, d, CamQuery(u, d))
        return {"density": density * inside, "rgb": rgb}

    def density(self, x: torch.Tensor) -> torch.Tensor:
        features, inside, u = self._features(x)
        return self.head.density_only(features, CamQuery(u)) * inside

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        encoding = [p for name, p in self.named_parameters() if not name.startswith("head.")]
        return [
            {"name": "encoding", "params": encoding, "lr": lr, "weight_decay": 0.0},
            {"name": "mlp", "params": list(self.head.parameters()), "lr": lr, "weight_decay": 1e-6},
        ]
