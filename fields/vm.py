"""TensoRF's vector-matrix decomposition (Chen et al., ECCV 2022), the VM-split model.

Density and appearance are each a sum over three modes of (plane in two axes) x (line along the third):
density = softplus(sum over modes and components of plane * line + shift) * distance_scale (TensoRF:
16 components per mode, shift -10, scale 25); appearance concatenates the 3 x 48 plane * line products,
maps them through a linear basis to 27 features, and an MLP takes those, their positional encoding
(2 octaves), the view direction and its encoding (2 octaves) to colour (TensoRF's MLP_Fea, 2 x 128).
Resolution grows from `num_voxels_init` to `num_voxels` at `upscale_at` of progress, the voxel counts
log-spaced between (TensoRF's lego: 128³ -> 300³ at steps 2k, 3k, 4k, 5.5k, 7k of 30k), planes and lines
resampled linearly. An L1 penalty on the density factors keeps them sparse: TensoRF's 4e-5 from the first
upscale on, but none before it where TensoRF has 8e-5. At the start the density sits at softplus(-10),
where the photometric gradient is ~1e-10; recon trains on random backgrounds, and there the L1 pull wins
and the factors collapse to zero (the tiny test scene: no loss decrease in 100 steps with 8e-5 from the
start, 2.7x lower without). A run so short that the first upscale comes within ~50 steps of the start
can still stall this way. NeuRBF's radiance results are built on this backbone.

Not taken from TensoRF: its alpha-mask and bounding-box shrinking (recon's occupancy grid does that job).
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
from recon.fields.voxel import grid_shape

PLANE_AXES = ((0, 1), (0, 2), (1, 2))
LINE_AXES = (2, 1, 0)  # each plane's complementary axis


class VectorMatrix(nn.Module):
    """`components` plane x line products per mode, over a grid of `shape` voxels: [N, 3 * components]."""

    def __init__(self, components: int, shape: list[int], scale: float = 0.1):
        super().__init__()
        self.planes = nn.ParameterList(
            nn.Parameter(scale * torch.randn(1, components, shape[b], shape[a])) for a, b in PLANE_AXES)
        self.lines = nn.ParameterList(nn.Parameter(scale * torch.randn(1, components, shape[c], 1)) for c in LINE_AXES)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [N, 3] in [-1, 1]^3."""
        products = []
        for (a, b), c, plane, line in zip(PLANE_AXES, LINE_AXES, self.planes, self.lines):
            at_plane = F.grid_sample(plane, u[None, None, :, [a, b]], align_corners=True)[0, :, 0]
            at_line = F.grid_sample(line, torch.stack([torch.zeros_like(u[:, c]), u[:, c]], -1)[None, None],
                                    align_corners=True)[0, :, 0]
            products.append(at_plane * at_line)
        return torch.cat(products).T

    def resize(self, shape: list[int]) -> None:
        with torch.no_grad():
            for i, ((a, b), c) in enumerate(zip(PLANE_AXES, LINE_AXES)):
                self.planes[i] = nn.Parameter(F.interpolate(self.planes[i].data, size=(shape[b], shape[a]),
                                                            mode="bilinear", align_corners=True))
                self.lines[i] = nn.Parameter(F.interpolate(self.lines[i].data, size=(shape[c], 1), mode="bilinear",
                                                           align_corners=True))

    def l1(self) -> torch.Tensor:
        return sum(p.abs().mean() for p in self.parameters())


@register("vm")
class VectorMatrixField(Field):
    outputs = frozenset({"density", "rgb"})
    presets = {"cpu": {"num_voxels_init": 64**3, "num_voxels": 128**3}}

    def __init__(self, aabb: torch.Tensor, num_voxels_init: int = 128**3, num_voxels: int = 300**3,
                 upscale_at: tuple[float, ...] = (2 / 30, 3 / 30, 4 / 30, 5.5 / 30, 7 / 30),
                 density_components: int = 16, appearance_components: int = 48, appearance_features: int = 27,
                 hidden: int = 128, frequencies: int = 2, density_shift: float = -10.0, distance_scale: float = 25.0,
                 l1: tuple[float, float] = (0.0, 4e-5)):
        super().__init__(aabb)
        self._config = dict(num_voxels_init=num_voxels_init, num_voxels=num_voxels, upscale_at=list(upscale_at),
                            density_components=density_components, appearance_components=appearance_components,
                            appearance_features=appearance_features, hidden=hidden, frequencies=frequencies,
                            density_shift=density_shift, distance_scale=distance_scale, l1=list(l1))
        self.upscale_at = tuple(upscale_at)
        self.register_buffer("upscales_done", torch.zeros((), dtype=torch.long))
        shape = grid_shape(self.aabb[1] - self.aabb[0], num_voxels_init)
        self.density_factors = VectorMatrix(density_components, shape)
        self.appearance_factors = VectorMatrix(appearance_components, shape)
        self.basis = nn.Linear(3 * appearance_components, appearance_features, bias=False)
        self.feature_encoding = FrequencyEncoding(appearance_features, frequencies)
        self.view_encoding = FrequencyEncoding(3, frequencies)
        self.color_net = MLP(self.feature_encoding.out_dim + self.view_encoding.out_dim, 3, hidden, layers=2)

    def _box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.normalize(x)
        return u.clamp(0, 1) * 2 - 1, ((u >= 0) & (u <= 1)).all(-1)

    def _density(self, u: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        raw = self.density_factors(u).sum(-1)
        return F.softplus(raw + self._config["density_shift"]) * self._config["distance_scale"] * inside

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._density(*self._box(x))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        u, inside = self._box(x)
        features = self.basis(self.appearance_factors(u))
        rgb = torch.sigmoid(self.color_net(torch.cat([self.feature_encoding(features), self.view_encoding(d)], -1)))
        return {"density": self._density(u, inside), "rgb": rgb}

    def update(self, progress: float) -> bool:
        """Upscale once per milestone passed, to the next log-spaced voxel count; True when parameters changed."""
        due = sum(progress >= at for at in self.upscale_at)
        if due <= int(self.upscales_done):
            return False
        self.upscales_done.fill_(due)
        start, end = math.log(self._config["num_voxels_init"]), math.log(self._config["num_voxels"])
        voxels = round(math.exp(start + (end - start) * due / len(self.upscale_at)))
        shape = grid_shape(self.aabb[1] - self.aabb[0], voxels)
        self.density_factors.resize(shape)
        self.appearance_factors.resize(shape)
        return True

    def regularization(self) -> torch.Tensor | None:
        before, after = self._config["l1"]
        weight = before if int(self.upscales_done) == 0 else after
        return weight * self.density_factors.l1() if weight else None

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # TensoRF: 0.02 for the factors, 1e-3 for the basis and the MLP; 2x and 0.1x recon's base rate of 1e-2.
        factors = list(self.density_factors.parameters()) + list(self.appearance_factors.parameters())
        return [
            {"name": "factors", "params": factors, "lr": 2 * lr, "weight_decay": 0.0},
            {"name": "mlp", "params": list(self.basis.parameters()) + list(self.color_net.parameters()),
             "lr": 0.1 * lr, "weight_decay": 0.0},
        ]

    def config(self) -> dict[str, Any]:
        return dict(self._config)
