"""Rays in the unit frame: what `data` hands to `renderers`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rays:
    """A batch of rays. `dirs` are unit length, so ray parameters t are distances in the unit frame."""

    origins: torch.Tensor  # [R, 3] float32
    dirs: torch.Tensor  # [R, 3] float32, unit length

    def __len__(self) -> int:
        return self.origins.shape[0]

    def __getitem__(self, index) -> "Rays":
        return Rays(self.origins[index], self.dirs[index])

    def detach(self) -> "Rays":
        return Rays(self.origins.detach(), self.dirs.detach())

    def to(self, device: torch.device | str) -> "Rays":
        return Rays(self.origins.to(device), self.dirs.to(device))
