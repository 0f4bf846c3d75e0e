"""Ray marching through an occupancy grid into packed samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from recon.cuda import kernels_for
from recon.data.rays import Rays
from recon.renderers.compositing import first_of_ray
from recon.renderers.occupancy import OccupancyGrid, rand


@dataclass
class Samples:
    """Packed samples: the intervals [t0, t1] along their rays, sorted by ray."""

    ray_idx: Tensor  # [S] int64, ascending
    t0: Tensor  # [S] float32
    t1: Tensor  # [S] float32
    n_rays: int

    def __len__(self) -> int:
        return len(self.ray_idx)

    def __getitem__(self, keep: Tensor) -> Samples:
        """The samples selected by a bool mask (or ascending indices), still packed."""
        return Samples(self.ray_idx[keep], self.t0[keep], self.t1[keep], self.n_rays)

    @property
    def dt(self) -> Tensor:
        return self.t1 - self.t0

    @property
    def t_mid(self) -> Tensor:
        return (self.t0 + self.t1) / 2

    def positions(self, rays: Rays) -> Tensor:
        """Interval midpoints [S, 3]."""
        return rays.origins[self.ray_idx] + rays.dirs[self.ray_idx] * self.t_mid[:, None]

    def dirs(self, rays: Rays) -> Tensor:
        return rays.dirs[self.ray_idx]


def ray_aabb(origins: Tensor, dirs: Tensor, aabb: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test: t_near, t_far [R] of each ray's line through the box; t_far <= t_near for a miss.

    Both may be negative (origin inside: t_near < 0; box behind: t_far < 0).
    """
    t_lo, t_hi = (aabb[0] - origins) / dirs, (aabb[1] - origins) / dirs  # +-inf where a direction component is 0
    near, far = torch.minimum(t_lo, t_hi), torch.maximum(t_lo, t_hi)
    # 0/0 = NaN: a ray lying in a slab's boundary plane, which that slab does not constrain.
    t_near = torch.where(near.isnan(), -math.inf, near).amax(-1)
    t_far = torch.where(far.isnan(), math.inf, far).amin(-1)
    return t_near, t_far


@dataclass(frozen=True)
class StepRule:
    """instant-ngp's step dt(t) = clamp(t * cone_angle, step, max_step), with its sample boundaries in closed form.

    From t_start the steps are constant (step) until t >= step / cone_angle, then geometric (x(1 + cone_angle)
    per step) until t >= max_step / cone_angle, then constant (max_step) again. So the k-th boundary t_k and
    the number of boundaries before a distance are closed forms, and candidates can be enumerated without a loop.
    """

    step: float
    cone_angle: float
    max_step: float

    def dt(self, t: Tensor) -> Tensor:
        return (t * self.cone_angle).clamp(self.step, self.max_step)

    def count(self, t_start: Tensor, t_end: Tensor) -> Tensor:
        """[R] int64: how many boundaries t_k (k >= 0) lie before t_end, i.e. the number of intervals."""
        if self.cone_angle == 0:
            return ((t_end - t_start) / self.step).ceil().clamp(min=0).long()
        n1, t1, n2, t2 = self._phases(t_start)
        growth = math.log1p(self.cone_angle)
        count = torch.where(
            t_end <= t1,
            ((t_end - t_start) / self.step).ceil(),
            torch.where(
                t_end <= t2,
                n1 + (torch.log(t_end / t1) / growth).ceil(),
                n1 + n2 + ((t_end - t2) / self.max_step).ceil(),
            ),
        )
        return count.clamp(min=0).long()

    def boundary(self, t_start: Tensor, k: Tensor | float) -> Tensor:
        """t_k for ray starts t_start and (float) indices k, broadcast together."""
        if self.cone_angle == 0:
            return t_start + k * self.step
        n1, t1, n2, t2 = self._phases(t_start)
        return torch.where(
            k <= n1,
            t_start + k * self.step,
            torch.where(
                k <= n1 + n2,
                t1 * torch.exp((k - n1) * math.log1p(self.cone_angle)),
                t2 + (k - n1 - n2) * self.max_step,
            ),
        )

    def _phases(self, t_start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """n1 constant steps reach t1 >= step / cone_angle, then n2 geometric ones reach t2 >= max_step / cone_angle."""
        n1 = ((self.step / self.cone_angle - t_start) / self.step).ceil().clamp(min=0)
        t1 = t_start + n1 * self.step
        n2 = (torch.log(self.max_step / self.cone_angle / t1) / math.log1p(self.cone_angle)).ceil().clamp(min=0)
        t2 = t1 * torch.exp(n2 * math.log1p(self.cone_angle))
        return n1, t1, n2, t2


def march(rays: Rays, grid: OccupancyGrid, aabb: Tensor, step_size: float, cone_angle: float = 0.0, near: float = 0.0,
          generator: torch.Generator | None = None, max_samples_per_ray: int = 1024, chunk: int = 2**20,
          kernels: ModuleType | None | str = "auto") -> Samples:
    """Samples along each ray through `aabb`, in the cells `grid` marks occupied.

    Rays start at max(near, entry into aabb) and step by StepRule: constant for cone_angle 0, growing
    with distance otherwise, up to a cell diagonal of the grid's coarsest level (instant-ngp) so no coarse
    cell is stepped over. The last interval ends at the box exit. A generator jitters each ray's first
    boundary by u * dt (stratified sampling, for training). An interval is kept where its midpoint is
    occupied, at most `max_samples_per_ray` per ray (the nearest).

    Candidates are tested in blocks of the next K steps of the rays still inside the box (K * rays ~ chunk),
    which broadcasts per-ray values instead of gathering them per sample. `kernels` (recon.cuda's module;
    "auto": `recon.cuda.kernels_for` the rays) march each ray in one thread instead, two passes: count, then fill.
    """
    origins, dirs, device = rays.origins, rays.dirs, rays.origins.device
    rule = StepRule(step_size, cone_angle, max(step_size, grid.cell_diagonal * 2 ** (grid.levels - 1)))
    t_near, t_far = ray_aabb(origins, dirs, aabb)
    t_start = t_near.clamp(min=near)
    if generator is not None:
        t_start = t_start + rand(t_start.shape, generator, device) * rule.dt(t_start)
    if kernels == "auto":
        kernels = kernels_for(origins)
    if kernels is not None:
        return _march_kernel(kernels, rays, grid, rule, t_start, t_far, max_samples_per_ray)

    # Midpoints are tested in the grid's normalized frame, one contiguous [rays, K] tensor per axis.
    o_u, d_u = grid.normalize(origins), dirs / ((grid.aabb[1] - grid.aabb[0]) / 2)
    counts = rule.count(t_start, t_far)
    blocks, k0, k_end = [], 0, int(counts.max()) if len(rays) else 0
    while k0 < k_end:
        active = (counts > k0).nonzero().squeeze(1)
        k = torch.arange(k0, min(k0 + max(1, chunk // len(active)), k_end), device=device, dtype=torch.float32)
        t0, t1 = _interval(rule, t_start[active, None], t_far[active, None], k)
        t_mid = (t0 + t1) / 2
        u = (torch.addcmul(o_u[active, a, None], d_u[active, a, None], t_mid) for a in range(3))
        block = torch.zeros(len(rays), len(k), dtype=torch.bool, device=device)
        block[active] = grid.query_normalized(*u) & (t1 > t0)  # t1 > t0: past the exit of a shorter ray
        blocks.append(block)
        k0 += len(k)

    hits = torch.cat(blocks, 1) if blocks else torch.zeros(len(rays), 0, dtype=torch.bool, device=device)
    ray_idx, k = hits.nonzero().unbind(1)  # ray-major, then k: packed and sorted
    t0, t1 = _interval(rule, t_start[ray_idx], t_far[ray_idx], k.float())
    samples = Samples(ray_idx, t0, t1, len(rays))
    rank = torch.arange(len(samples), device=device) - first_of_ray(ray_idx, len(rays))
    return samples[rank < max_samples_per_ray]


def _march_kernel(kernels: ModuleType, rays: Rays, grid: OccupancyGrid, rule: StepRule, t_start: Tensor, t_far: Tensor,
                  max_samples: int) -> Samples:
    args = (rays.origins.contiguous(), rays.dirs.contiguous(), t_start.contiguous(), t_far.contiguous(),
            grid.occupied.view(-1).contiguous(), grid.bounds, grid.levels, grid.resolution, rule.step, rule.cone_angle,
            rule.max_step, max_samples)
    counts = kernels.march_count(*args)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    total = int(offsets[-1])  # the one host sync of marching, as the twin's
    t0, t1 = kernels.march_fill(*args, offsets, total)
    ray_idx = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    return Samples(ray_idx, t0, t1, len(counts))


def _interval(rule: StepRule, t_start: Tensor, t_far: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """The k-th interval [t_k, t_k + dt(t_k)], cut at the box exit (broadcasting)."""
    t0 = rule.boundary(t_start, k)
    return t0, torch.minimum(t0 + rule.dt(t0), t_far)
