"""instant-ngp's radiance field: a multiresolution hash grid decoded by two small MLPs."""

from __future__ import annotations

import torch

from recon.fields import register
from recon.fields.encodings import Encoding, HashGridEncoding, tcnn_available
from recon.fields.heads import EncodedRadianceField, RadianceHead

__all__ = ["HashGridField", "tcnn_available"]


@register("hashgrid")
class HashGridField(EncodedRadianceField):
    """Hash-grid radiance field over the box `aabb`; density is 0 outside it.

    `max_resolution=None` scales instant-ngp's 2048 (for a box of side 2) with the box's
    largest side, as instant-ngp does with 2048 * aabb_scale. `tcnn=True` runs the encoding
    with tiny-cuda-nn (same function and weights; raises if tcnn is not installed).
    """

    # On a CPU a step costs in proportion to levels x samples and Adam to the table: half the levels,
    # a quarter of the table (BENCHMARKS.md, issue 3). The GPU keeps instant-ngp's defaults.
    presets = {"cpu": {"levels": 8, "log2_table": 17}}
    size_option = {"radiance": "log2_table", "image": "log2_table", "sdf": "log2_table"}

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
        self.encoding = HashGridEncoding(levels, features, log2_table, base_resolution, max_resolution, tcnn)
        self.head = RadianceHead(self.encoding.out_dim, hidden)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, levels: int = 16, features: int = 2,
                            log2_table: int | None = None, base_resolution: int = 16,
                            max_resolution: float | None = None, tcnn: bool = False) -> Encoding:
        """instant-ngp's image (2^24 table) and SDF (2^19) encodings, the finest level at the finest cells."""
        return HashGridEncoding(levels, features, log2_table or (24 if len(extent) == 2 else 19), base_resolution,
                                max_resolution or finest, tcnn, dims=len(extent))

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        return self.encoding(u)
