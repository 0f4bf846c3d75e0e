"""The proposal sampler's density fields (renderers.proposal): nerfacto's HashMLPDensityField.

A small hash grid (5 levels of 2 features, a 2^17 table, finest level 128 or 256) and one 16-wide hidden layer
to a log-density: cheap enough to query at hundreds of points per ray, fine enough to say where along a ray
the real field will put its weight. It is not a backend (it answers density only, and is never registered);
every pipeline with the proposal sampler owns one per proposal level, whatever its backend.
"""

from __future__ import annotations

import torch

from recon.fields.base import Field
from recon.fields.encodings import MLP, HashGridEncoding, trunc_exp


class ProposalDensity(Field):
    outputs = frozenset({"density"})

    def __init__(self, aabb: torch.Tensor, max_resolution: int = 128, levels: int = 5, log2_table: int = 17,
                 hidden: int = 16):
        super().__init__(aabb)
        self.encoding = HashGridEncoding(levels, 2, log2_table, 16, max_resolution)
        self.mlp = MLP(self.encoding.out_dim, 1, hidden, layers=1)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density [N] at x [N, 3]; 0 outside the box (contracted space has no outside)."""
        u = self.normalize(x)
        inside = ((u >= 0) & (u <= 1)).all(-1)
        return trunc_exp(self.mlp(self.encoding(u))[..., 0].float()) * inside

    def param_groups(self, lr: float) -> list[dict]:
        return [{"name": "encoding", "params": list(self.encoding.parameters()), "lr": lr, "weight_decay": 0.0},
                {"name": "mlp", "params": list(self.mlp.parameters()), "lr": lr, "weight_decay": 1e-6}]
