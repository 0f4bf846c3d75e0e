"""CAM: coordinate-aware modulation (Lee et al., "Coordinate-Aware Modulation for Neural Fields", ICLR 2024).

After each hidden linear layer of an MLP, before its activation:

    h <- gamma(c) * Norm(W h + b) + beta(c)

with gamma and beta sampled from small learnable grids at a coordinate c of the query, one scalar pair per
layer and point (the official code's grids hold one channel each), initialised to gamma = 1, beta = 0.
The grids train at the rate the official code actually uses: 10x the MLP's for images; the MLP's own for
Mip-NeRF (one optimiser group) and for NerfAcc (whose 10x group matches no parameter name, so it is empty);
never above the base rate grid encodings train at. The image code's 10x is 1e-2 beside its FFN's 1e-3, which
is what the positional-encoding MLP gets here; a grid backbone's decoder already trains at 1e-2 (instant-ngp's),
and 10x that, 0.1, cost the hash grid 2.3 dB on a photo where the capped rate gains 0.1 (BENCHMARKS.md, CAM).
Norm is a layer norm over the channels of each point, without its own affine (the image code's instance
norm acts that way on its layout; Mip-NeRF's GroupNorm(1) would mix a ray's samples); it never mixes points,
so an output does not depend on how queries are batched. The tri-plane variant has none, as the official
NerfAcc code, which also keeps an SDF decoder's geometric initialisation intact (normalising each layer would
undo it).

The coordinate and grid per task, as the official code:
- "plane" (images): a 32 x 32 grid over the pixel coordinates, bilinear, borders clamped;
- "direction" (radiance, the Mip-NeRF variant): a 10 x 3 grid over the view direction's azimuth and
  elevation, linear; queries without a direction (occupancy updates, exports) take the grid's mean;
- "triplane" (radiance as the NerfAcc variant, SDFs): three 512^2 planes over the xy, xz, yz coordinates
  whose bilinear samples multiply. The official beta planes all start at 0, so their product never gets a
  gradient and beta stays 0 for good; here the first beta plane starts at 0 and the other two at 1, so beta
  starts at 0 and trains.

`bits` quantises gamma and beta (the grids, before interpolation) with the official min-max straight-through
quantiser: q = sign(w) round(|w| / s * n) / n * s, s = max |w|, n = 2^(bits - 1) - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("plane", "direction", "triplane")
RESOLUTION = {"plane": 32, "direction": (3, 10), "triplane": 512}  # the official grid sizes
NORMALIZED = {"plane": True, "direction": True, "triplane": False}  # as the official image, Mip-NeRF, NerfAcc code
LR_FACTOR = {"plane": 10.0, "direction": 1.0, "triplane": 1.0}  # the grids' rate / the MLP's (docstring)
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


@dataclass
class CamQuery:
    """What a modulation may read at each query: the position in its field's box, [0, 1]^D, and the
    unit view direction (None where the query has none)."""

    position: Tensor | None = None
    direction: Tensor | None = None


def quantize_straight_through(w: Tensor, bits: int) -> Tensor:
    levels = 2 ** (bits - 1) - 1
    scale = w.detach().abs().max().clamp(min=1e-6)
    q = torch.sign(w) * torch.round(w.abs() / scale * levels) / levels * scale
    return w + (q - w).detach()


def direction_coordinates(d: Tensor) -> Tensor:
    """Unit directions [N, 3] -> grid_sample coordinates [N, 2] in [-1, 1]: (azimuth, elevation)."""
    azimuth = torch.atan2(d[:, 1], d[:, 0]) / math.pi  # [-1, 1]
    elevation = torch.atan2(d[:, 2], d[:, :2].norm(dim=-1)) / (math.pi / 2)  # [-1, 1]
    return torch.stack([azimuth, elevation], -1)


class Modulation(nn.Module):
    """gamma, beta [layers, N, 1] for the `layers` hidden layers of one MLP (see the module docstring)."""

    lr_cap = 1.0  # the grids' rate is at most this times the base rate, the rate grid encodings train at

    def __init__(self, kind: str, layers: int, resolution: int | None = None, bits: int | None = None,
                 normalize: bool | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown CAM coordinate {kind!r} (known: {', '.join(KINDS)})")
        self.kind, self.bits, self.lr_factor = kind, bits, LR_FACTOR[kind]
        self.normalize = NORMALIZED[kind] if normalize is None else normalize
        if kind == "direction":
            height, width = RESOLUTION["direction"] if resolution is None else (resolution, resolution)
            grid = torch.stack([torch.ones(layers, height, width), torch.zeros(layers, height, width)], 1)
        elif kind == "plane":
            r = resolution or RESOLUTION["plane"]
            grid = torch.stack([torch.ones(layers, r, r), torch.zeros(layers, r, r)], 1)
        else:
            r = resolution or RESOLUTION["triplane"]
            grid = torch.ones(layers, 3, 2, r, r)
            grid[:, 0, 1] = 0  # beta's first plane: beta = 0 * 1 * 1 at the start, with a gradient
        self.grid = nn.Parameter(grid)

    def forward(self, at: CamQuery, n: int) -> tuple[Tensor, Tensor]:
        grid = quantize_straight_through(self.grid, self.bits) if self.bits else self.grid
        layers = grid.shape[0]
        if self.kind == "triplane":
            u = at.position * 2 - 1
            coords = torch.stack([u[:, list(axes)] for axes in PLANE_AXES])  # [3, N, 2]
            planes = grid.flatten(0, 1)  # [layers * 3, 2, R, R]
            coords = coords.repeat(layers, 1, 1)[:, :, None]  # [layers * 3, N, 1, 2]
            samples = F.grid_sample(planes, coords, align_corners=True)[..., 0]  # [layers * 3, 2, N]
            values = samples.view(layers, 3, 2, -1).prod(1)  # [layers, 2, N]
        elif self.kind == "direction" and at.direction is None:
            values = grid.mean((2, 3))[:, :, None].expand(layers, 2, n)
        else:
            coords = direction_coordinates(at.direction) if self.kind == "direction" else at.position * 2 - 1
            coords = coords[None, :, None].expand(layers, -1, 1, 2)
            values = F.grid_sample(grid, coords, align_corners=True, padding_mode="border")[..., 0]
        return values[:, 0, :, None], values[:, 1, :, None]

    def modulate(self, h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        if self.normalize:
            h = F.layer_norm(h, h.shape[-1:])
        return gamma * h + beta
