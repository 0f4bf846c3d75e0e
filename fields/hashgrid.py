"""instant-ngp's radiance field: a multiresolution hash grid decoded by two small MLPs."""

from __future__ import annotations

from typing import Any

import torch

from recon.fields import register
from recon.fields.base import Field
from recon.fields.encodings import HashGridEncoding, tcnn_available
from recon.fields.heads import RadianceHead

__all__ = ["HashGridField", "tcnn_available"]


@register("hashgrid")
class HashGridField(Field):
    """Hash-grid radiance field over the box `aabb`; density is 0 outside it.

    `max_resolution=None` scales instant-ngp's 2048 (for a box of side 2) with the box's
    largest side, as instant-ngp does with 2048 * aabb_scale. `tcnn=True` runs the encoding
    with tiny-cuda-nn (same function and weights; raises if tcnn is not installed).
    """

    outputs = frozenset({"density", "rgb"})
    # On a CPU a step costs in proportion to levels x samples and Adam to the table: half the levels,
    # a quarter of the table (BENCHMARKS.md, issue 3). The GPU keeps instant-ngp's defaults.
    presets = {"cpu": {"levels": 8, "log2_table": 17}}

    def __init__(
        self,
        aabb: torch.Tensor,
        levels: int = 16,
        features: int = 2,
        log2_table: int = 19,
        base_resolution: int = 16,
        max_resolution: float | None = None,
        hidden: int = 64,
        tcnn: bool = False,
    ):
        super().__init__(aabb)
        if max_resolution is None:
            max_resolution = 2048 * float((self.aabb[1] - self.aabb[0]).max()) / 2
        self._config = dict(
            levels=levels,
            features=features,
            log2_table=log2_table,
            base_resolution=base_resolution,
            max_resolution=float(max_resolution),
            hidden=hidden,
            tcnn=tcnn,
        )
        self.encoding = HashGridEncoding(levels, features, log2_table, base_resolution, max_resolution, tcnn)
        self.head = RadianceHead(self.encoding.out_dim, hidden)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded features of x clamped into the box, and which points were inside it."""
        u = self.normalize(x)
        inside = ((u >= 0) & (u <= 1)).all(-1)
        return self.encoding(u), inside

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        features, inside = self._encode(x)
        density, rgb = self.head(features, d)
        return {"density": density * inside, "rgb": rgb}

    def density(self, x: torch.Tensor) -> torch.Tensor:
        features, inside = self._encode(x)
        return self.head.density_only(features) * inside

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # instant-ngp: L2 weight decay 1e-6 on the MLPs only; the grid is never decayed.
        return [
            {"name": "grid", "params": list(self.encoding.parameters()), "lr": lr, "weight_decay": 0.0},
            {"name": "mlp", "params": list(self.head.parameters()), "lr": lr, "weight_decay": 1e-6},
        ]

    def config(self) -> dict[str, Any]:
        return dict(self._config)
