"""Occupancy grid: which cells of the scene may hold density, so marching can skip empty space.

instant-ngp's multi-cascade grid: level l covers the level-0 box scaled by 2^l about its centre,
each level at the same resolution, so cells grow with distance from the centre (unbounded scenes);
a bounded scene uses one level. Cells are flattened as [level, x, y, z] (z fastest), the layout
the CUDA twins share.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from recon.cuda.twins import occupied_at

DensityFn = Callable[[Tensor], Tensor]  # positions [N, 3] -> density sigma [N]


# Random numbers are drawn on the generator's own device and moved: callers may hold a CPU generator.
def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=source).to(device)


class OccupancyGrid(nn.Module):
    values: Tensor  # [levels, res^3] float32: max of recent sigma*dt estimates; -1 marks cells seeded as empty
    occupied: Tensor  # [levels, res^3] bool

    def __init__(self, aabb: Tensor, resolution: int = 128, levels: int = 1, step_size: float | None = None):
        """aabb [2, 3]: the level-0 box. step_size: the marching step at level 0, which turns density into the
        per-cell optical depth sigma*dt; None takes instant-ngp's default, the box diagonal / 1024."""
        super().__init__()
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(2, 3)
        self.register_buffer("aabb", aabb.clone(), persistent=False)  # a constructor argument, not state
        self.bounds = aabb.view(-1).tolist()  # the same as floats, for the marching kernel (no device read-back)
        self.resolution, self.levels = resolution, levels
        self.step_size = step_size if step_size is not None else float((aabb[1] - aabb[0]).norm()) / 1024
        self.register_buffer("values", torch.zeros(levels, resolution**3))
        self.register_buffer("occupied", torch.ones(levels, resolution**3, dtype=torch.bool))

    @property
    def occupancy_fraction(self) -> float:
        return self.occupied.float().mean().item()

    @property
    def cell_diagonal(self) -> float:
        """Diagonal of a level-0 cell (level l: times 2^l)."""
        return float((self.aabb[1] - self.aabb[0]).norm()) / self.resolution

    def normalize(self, x: Tensor) -> Tensor:
        """Positions [..., 3] -> coordinates in which the level-0 box is [-1, 1]^3 (level l: [-2^l, 2^l]^3)."""
        return (x - self.aabb.mean(0)) / ((self.aabb[1] - self.aabb[0]) / 2)

    def query(self, x: Tensor) -> Tensor:
        """bool [N]: whether x [N, 3] is in an occupied cell of the finest level containing it (False outside all)."""
        return occupied_at(self.occupied, self.resolution, *self.normalize(x).unbind(-1))

    @torch.no_grad()
    def update(self, density_fn: DensityFn, warmup: bool, generator: torch.Generator | None = None,
               threshold: float = 0.01, decay: float = 0.95, chunk: int = 2**16) -> None:
        """Re-estimate sigma*dt at one jittered point in each chosen cell, as instant-ngp / nerfacc do.

        Chosen cells become max(decay * old, new) (several samples of one cell: their max), so a cell turns
        on as soon as anything is seen in it and fades out slowly; warmup chooses every cell, otherwise a
        quarter of the cells uniformly plus up to as many occupied ones. A cell is occupied while its value
        exceeds min(threshold, mean value) (instant-ngp); when no cell does although some hold density (a
        uniform field, such as DVGO's initial grid, equals its mean everywhere), every cell with density
        stays occupied, or nothing would ever be sampled to learn from.
        """
        flat = self.values.view(-1)
        n = flat.numel()
        if warmup:
            cells = torch.arange(n, device=flat.device)
        else:
            uniform = randint(n, (n // 4,), generator, flat.device)
            occupied = self.occupied.view(-1).nonzero().squeeze(1)
            if len(occupied) > n // 4:
                occupied = occupied[randint(len(occupied), (n // 4,), generator, flat.device)]
            cells = torch.cat([uniform, occupied])
        cells = cells[flat[cells] >= 0]  # seeded-empty cells stay empty

        new = torch.zeros_like(flat)
        for part in cells.split(chunk):
            level = part // self.resolution**3
            sigma_dt = density_fn(self._jittered_points(part, generator)) * (self.step_size * torch.exp2(level.float()))
            new.scatter_reduce_(0, part, sigma_dt, "amax")
        chosen = torch.zeros_like(self.occupied.view(-1))
        chosen[cells] = True
        flat.copy_(torch.where(chosen, torch.maximum(flat * decay, new), flat))
        mean = flat[flat >= 0].mean()
        occupied = self.values > mean.clamp(max=threshold)
        self.occupied.copy_(torch.where(occupied.any(), occupied, self.values > 0))

    @torch.no_grad()
    def seed(self, mask: Tensor) -> None:
        """Restrict the grid to `mask` [levels, res^3] bool (e.g. an alpha visual hull): cells outside it are
        marked empty for good (instant-ngp's negative values), which updates then leave alone."""
        self.values.copy_(torch.where(mask, self.values.clamp(min=0), -1.0))
        self.occupied &= mask

    def occupied_points(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """`count` positions [count, 3], each uniform in an occupied cell drawn uniformly (none if none is)."""
        occupied = self.occupied.view(-1).nonzero().squeeze(1)
        if len(occupied) == 0:
            return self.aabb.new_zeros(0, 3)
        return self._jittered_points(occupied[randint(len(occupied), (count,), generator, occupied.device)], generator)

    def cell_centres(self) -> tuple[Tensor, Tensor]:
        """Every cell's centre [levels * res^3, 3] and half-diagonal [levels * res^3], in the flat layout."""
        cells = torch.arange(self.values.numel(), device=self.values.device)
        half_diagonal = self.cell_diagonal / 2 * torch.exp2((cells // self.resolution**3).float())
        return self._points(cells, torch.full((len(cells), 3), 0.5, device=cells.device)), half_diagonal

    def _jittered_points(self, cells: Tensor, generator: torch.Generator | None) -> Tensor:
        return self._points(cells, rand((len(cells), 3), generator, cells.device))

    def _points(self, cells: Tensor, offset: Tensor) -> Tensor:
        """Positions [N, 3] at `offset` [N, 3] (in [0, 1]^3 of the cell) inside flat cells [N]."""
        res = self.resolution
        level, cell = cells // res**3, cells % res**3
        ijk = torch.stack([cell // res**2, cell // res % res, cell % res], -1)
        u = (ijk + offset) * (2 / res) - 1  # in [-1, 1] of the cell's level
        return self.aabb.mean(0) + (self.aabb[1] - self.aabb[0]) / 2 * torch.exp2(level.float())[:, None] * u
