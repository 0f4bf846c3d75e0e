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

For the coordinate tasks (images, SDFs) the backend is one factorisation (the appearance one), decoded by
the task's MLP; in 2D a mode's "plane" is a line along the other axis, so the factors become TensoRF's
CP form there (a sum of outer products of two vectors).

Not taken from TensoRF: its alpha-mask and bounding-box shrinking (recon's occupancy grid does that job).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.fields import register
from recon.fields.base import Field, inside_unit_box
from recon.fields.cam import CamQuery
from recon.fields.encodings import MLP, Encoding, FrequencyEncoding, Upscaling, grid_shape

TENSORF_UPSCALES = (2 / 30, 3 / 30, 4 / 30, 5.5 / 30, 7 / 30)  # TensoRF's lego: steps 2k, 3k, 4k, 5.5k, 7k of 30k
# Each mode: the axes of its matrix and the axis of its vector (TensoRF's VM-split), per dimension count.
MODES = {3: (((0, 1), 2), ((0, 2), 1), ((1, 2), 0)), 2: (((0,), 1),)}


class VectorMatrix(Encoding):
    """`components` matrix x vector products per mode over a grid of about `num_voxels` voxels covering a box
    of side lengths `extent`: [N, modes * components]. Matrices and vectors are resampled (bi)linearly as
    the voxel count grows from `num_voxels_init` to `num_voxels` at the milestones of `upscale_at`."""

    lr_scale = 2.0  # TensoRF: 0.02 for the factors, 2x recon's base rate of 1e-2

    def __init__(self, extent: list[float], components: int, num_voxels_init: int, num_voxels: int,
                 upscale_at: tuple[float, ...] = (), scale: float = 0.1):
        super().__init__()
        self.dims, self.components, self.extent = len(extent), components, [float(e) for e in extent]
        self.modes = MODES[self.dims]
        self.upscaling = Upscaling(num_voxels_init, num_voxels, upscale_at)
        shape = grid_shape(self.extent, self.upscaling.voxels())
        self.planes = nn.ParameterList(nn.Parameter(scale * torch.randn(1, components, *self._plane_size(axes, shape)))
                                       for axes, _ in self.modes)
        self.lines = nn.ParameterList(nn.Parameter(scale * torch.randn(1, components, shape[c], 1))
                                      for _, c in self.modes)

    @staticmethod
    def _plane_size(axes: tuple[int, ...], shape: list[int]) -> tuple[int, int]:
        """(height, width) of a mode's matrix: axis axes[0] along its width (a 1-row matrix in 2D)."""
        return (shape[axes[1]] if len(axes) == 2 else 1), shape[axes[0]]

    @property
    def out_dim(self) -> int:
        return len(self.modes) * self.components

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [N, D] in [0, 1]^D."""
        u = u.clamp(0, 1) * 2 - 1
        zeros = torch.zeros_like(u[:, 0])
        products = []
        for (axes, c), plane, line in zip(self.modes, self.planes, self.lines):
            at = torch.stack([u[:, axes[0]], u[:, axes[1]] if len(axes) == 2 else zeros], -1)
            at_plane = F.grid_sample(plane, at[None, None], align_corners=True)[0, :, 0]
            at_line = F.grid_sample(line, torch.stack([zeros, u[:, c]], -1)[None, None], align_corners=True)[0, :, 0]
            products.append(at_plane * at_line)
        return torch.cat(products).T

    @property
    def grows(self) -> bool:
        return bool(self.upscaling.milestones)

    def update(self, progress: float) -> bool:
        if not self.upscaling.advance(progress):
            return False
        shape = grid_shape(self.extent, self.upscaling.voxels())
        with torch.no_grad():
            for i, (axes, c) in enumerate(self.modes):
                self.planes[i] = nn.Parameter(F.interpolate(self.planes[i].data, size=self._plane_size(axes, shape),
                                                            mode="bilinear", align_corners=True))
                self.lines[i] = nn.Parameter(F.interpolate(self.lines[i].data, size=(shape[c], 1), mode="bilinear",
                                                           align_corners=True))
        return True

    def l1(self) -> torch.Tensor:
        return sum(p.abs().mean() for p in self.parameters())


@register("vm")
class VectorMatrixField(Field):
    outputs = frozenset({"density", "rgb"})
    presets = {"cpu": {"num_voxels_init": 64**3, "num_voxels": 128**3}}
    # In 2D the factors are vectors, whose length the image fixes: the component count sizes them.
    size_option = {"radiance": "num_voxels", "image": "components", "sdf": "num_voxels"}
    bounded = True
    coordinate_decoder = {"hidden": 128, "layers": 2}  # TensoRF's MLP_Fea

    def __init__(self, aabb: torch.Tensor, num_voxels_init: int = 128**3, num_voxels: int = 300**3,
                 upscale_at: tuple[float, ...] = TENSORF_UPSCALES,
                 density_components: int = 16, appearance_components: int = 48, appearance_features: int = 27,
                 hidden: int = 128, frequencies: int = 2, density_shift: float = -10.0, distance_scale: float = 25.0,
                 l1: tuple[float, float] = (0.0, 4e-5), extra_appearance: int = 0):
        """extra_appearance: channels a subclass adds to the appearance features (`_appearance`), e.g. NeuRBF's."""
        super().__init__(aabb)
        self.density_shift, self.distance_scale, self.l1 = density_shift, distance_scale, tuple(l1)
        extent = (self.aabb[1] - self.aabb[0]).tolist()
        self.density_factors = VectorMatrix(extent, density_components, num_voxels_init, num_voxels, upscale_at)
        self.appearance_factors = VectorMatrix(extent, appearance_components, num_voxels_init, num_voxels, upscale_at)
        self.basis = nn.Linear(3 * appearance_components, appearance_features, bias=False)
        self.feature_encoding = FrequencyEncoding(appearance_features + extra_appearance, frequencies)
        self.view_encoding = FrequencyEncoding(3, frequencies)
        self.color_net = MLP(self.feature_encoding.out_dim + self.view_encoding.out_dim, 3, hidden, layers=2)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, components: int = 48,
                            num_voxels_init: int | None = None, num_voxels: int | None = None,
                            upscale_at: tuple[float, ...] = TENSORF_UPSCALES) -> Encoding:
        """One factorisation; by default TensoRF's 128³ -> 300³ in 3D, and in 2D the same growth per axis
        ending at one voxel per finest cell (pixel)."""
        num_voxels = num_voxels or (300**3 if len(extent) == 3 else round(finest**2))
        return VectorMatrix(extent, components, num_voxels_init or round(num_voxels * (128 / 300) ** len(extent)),
                            num_voxels, upscale_at)

    def _box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.normalize(x)
        return u.clamp(0, 1), inside_unit_box(u)

    def _density(self, u: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        raw = self.density_factors(u).sum(-1)
        return F.softplus(raw + self.density_shift) * self.distance_scale * inside

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._density(*self._box(x))

    def _appearance(self, u: torch.Tensor) -> torch.Tensor:
        """The appearance features the colour MLP encodes and decodes: TensoRF's basis of the factors."""
        return self.basis(self.appearance_factors(u))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        u, inside = self._box(x)
        features = self._appearance(u)
        rgb = torch.sigmoid(self.color_net(torch.cat([self.feature_encoding(features), self.view_encoding(d)], -1),
                                           CamQuery(u, d)))
        return {"density": self._density(u, inside), "rgb": rgb}

    @property
    def grows(self) -> bool:
        return self.density_factors.grows

    def grow(self, progress: float) -> bool:
        """Upscale both factorisations once per milestone passed; True when parameters changed."""
        return self.density_factors.update(progress) | self.appearance_factors.update(progress)

    def regularization(self) -> torch.Tensor | None:
        before, after = self.l1
        weight = before if int(self.density_factors.upscaling.done) == 0 else after
        return weight * self.density_factors.l1() if weight else None

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # TensoRF: 0.02 for the factors, 1e-3 for the basis and the MLP; 2x and 0.1x recon's base rate of 1e-2.
        factors = list(self.density_factors.parameters()) + list(self.appearance_factors.parameters())
        return [
            {"name": "factors", "params": factors, "lr": VectorMatrix.lr_scale * lr, "weight_decay": 0.0},
            {"name": "mlp", "params": list(self.basis.parameters()) + list(self.color_net.parameters()),
             "lr": 0.1 * lr, "weight_decay": 0.0},
        ]
