"""Packed samples: every ray's samples side by side in flat arrays, sorted by ray (nerfacc's layout).

Ray r owns the samples [starts[r], starts[r + 1]) of the arrays; marching makes them, compositing sums over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recon.data.rays import Rays


def ray_starts(ray_idx: Tensor, n_rays: int) -> Tensor:
    """[R + 1] int64: ray r's samples are [starts[r], starts[r + 1]) of the packed (ray-sorted) arrays.

    A binary search rather than a bincount: on a GPU, bincount reads its input's extremes back to the host,
    a sync on every call."""
    return torch.searchsorted(ray_idx, torch.arange(n_rays + 1, device=ray_idx.device, dtype=ray_idx.dtype))


def first_of_ray(ray_idx: Tensor, n_rays: int) -> Tensor:
    """[S]: the packed index of the first sample of each sample's ray (ray_idx ascending)."""
    return ray_starts(ray_idx, n_rays)[ray_idx]


@dataclass
class Samples:
    """Packed samples: the intervals [t0, t1] along their rays, sorted by ray."""

    ray_idx: Tensor  # [S] int64, ascending
    t0: Tensor  # [S] float32
    t1: Tensor  # [S] float32
    n_rays: int

    def __len__(self) -> int:
        return len(self.ray_idx)

    def __getitem__(self, keep: Tensor | slice) -> Samples:
        """The samples selected by a bool mask, ascending indices or a slice, still packed."""
        return Samples(self.ray_idx[keep], self.t0[keep], self.t1[keep], self.n_rays)

    @property
    def dt(self) -> Tensor:
        return self.t1 - self.t0

    @property
    def t_mid(self) -> Tensor:
        return (self.t0 + self.t1) / 2

    @property
    def starts(self) -> Tensor:
        """[R + 1]: `ray_starts` of these samples."""
        return ray_starts(self.ray_idx, self.n_rays)

    def rank(self) -> Tensor:
        """[S] int64: each sample's place along its ray (0 for the nearest)."""
        return torch.arange(len(self), device=self.ray_idx.device) - first_of_ray(self.ray_idx, self.n_rays)

    def positions(self, rays: Rays) -> Tensor:
        """Interval midpoints [S, 3]."""
        return rays.origins[self.ray_idx] + rays.dirs[self.ray_idx] * self.t_mid[:, None]

    def dirs(self, rays: Rays) -> Tensor:
        return rays.dirs[self.ray_idx]
