"""The kernels' pure-torch twins: the same names, arguments and results as `recon.cuda.ops`, plain tensors in
and out. They are the path wherever no kernel runs (a CPU by default, `RECON_KERNELS=off`, a failed build) and
the tests' oracle for the kernels.

- `integrate`: the weighted sums along packed rays (volume rendering in terms of optical depth tau);
- `hash_encode`: instant-ngp's multiresolution hash encoding, tiny-cuda-nn's function and table layout;
- `march`: the occupancy grid's samples along rays, stepped by a `StepRule`;
- `nearest`: the k nearest of a set of centres through per-cell candidate lists (NeuRBF's lookup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# --- compositing --------------------------------------------------------------------------------------------


def render_weights(tau: Tensor, ray_idx: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """weights [S] = T_i * (1 - exp(-tau_i)) and transmittance T_i = exp(-sum of tau_j before i on its ray)."""
    # One cumulative sum over the whole batch, minus its value at each ray's start: in float64, as this
    # difference of two large sums would cancel the small ones in float32.
    tau64 = tau.double()
    before = torch.cumsum(tau64, 0) - tau64
    transmittance = torch.exp(before[starts[ray_idx]] - before).to(tau.dtype)
    return transmittance * -torch.expm1(-tau), transmittance


def per_ray_sum(values: Tensor, ray_idx: Tensor, n_rays: int) -> Tensor:
    """[R, ...]: the sum of values [S, ...] over each ray's samples."""
    return values.new_zeros((n_rays, *values.shape[1:])).index_add(0, ray_idx, values)


def integrate(rgb: Tensor, tau: Tensor, t: Tensor, ray_idx: Tensor, starts: Tensor, tau_before: Tensor | None,
              stop_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights [S], colour [R, C], opacity [R], weighted distance [R]) of packed samples (ray r owns
    [starts[r], starts[r + 1])) with colours rgb [S, C], optical depths tau [S] and distances t [S].

    tau_before [R] (or None): the optical depth each ray crossed before these samples, which scales their weights
    by exp(-tau_before). A sample whose transmittance (tau_before included) is below stop_eps weighs 0."""
    weights, transmittance = render_weights(tau, ray_idx, starts)
    if tau_before is not None:
        scale = torch.exp(-tau_before)[ray_idx]
        weights, transmittance = weights * scale, transmittance * scale
    weights = torch.where(transmittance >= stop_eps, weights, 0.0)
    n_rays = len(starts) - 1
    color = per_ray_sum(weights[:, None] * rgb, ray_idx, n_rays)
    return weights, color, per_ray_sum(weights, ray_idx, n_rays), per_ray_sum(weights * t, ray_idx, n_rays)


# --- the hash encoding --------------------------------------------------------------------------------------

# tiny-cuda-nn's spatial hash: coordinates times these, XORed (the 1 keeps x-neighbours close in memory).
PRIMES = (1, 2654435761, 805459861)


class HashLevels(NamedTuple):
    """A hash grid's levels as the kernel reads them, CPU tensors [L] (a GPU step then reads nothing back):
    scale (float32: a point sits at x * scale + 0.5 in vertex units), vertices per axis, first row in the
    table, and the hash mask (table rows - 1; -1 for a dense level, indexed x + y V + z V^2)."""

    scale: Tensor
    vertices: Tensor
    offset: Tensor
    mask: Tensor


def _as_elements(t: Tensor) -> Tensor:
    """[..., F] real -> [..., K]: each pair of features becomes one complex element (K = F/2).

    A row of the usual F=2 table is then a single element, so the interpolation's gathers and
    scatters index 1-D tensors, torch's fast CPU paths (2-D index_add is ~3x and the
    embedding backward ~10x slower). Odd F stays real, one element per feature.
    """
    return torch.view_as_complex(t.unflatten(-1, (-1, 2))) if t.shape[-1] % 2 == 0 else t


def _as_features(t: Tensor) -> Tensor:
    return torch.view_as_real(t).flatten(-2) if t.is_complex() else t


class _Interpolate(torch.autograd.Function):
    """out[b] = sum_c weights[b, c] * table[index[b, c]]: the blend of a cell's corners.

    Fused by `embedding_bag`, so the [B, 8, F] corner features are never materialised in the
    forward. The backward is built from differentiable ops, so second derivatives (eikonal
    losses on d out / d x) work.
    """

    @staticmethod
    def forward(ctx, table: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(table, weights, index)
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, weights, index = ctx.saved_tensors
        grad = _as_elements(grad.contiguous())  # [B, K]
        k = grad.shape[-1]
        elements = (index[..., None] if k == 1
                    else index[..., None] * k + torch.arange(k, device=index.device)).view(-1)
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            src = (weights[..., None] * grad[:, None]).reshape(-1)  # a lone level can leave weights permuted
            grad_table = _as_features(grad.new_zeros(table.shape[0] * k).index_add_(0, elements, src).view(-1, k))
        if ctx.needs_input_grad[1]:  # only when positions require grad
            corners = _as_elements(table).reshape(-1).index_select(0, elements).view(*index.shape, k)
            grad_weights = (corners * grad[:, None].conj()).real.sum(-1)  # Re(a conj(b)): the dot product
        return grad_table, grad_weights, None


def _outer_over_axes(per_axis: Tensor, combine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """[L, N, D, 2] -> [L, N, 2, ..., 2]: combine(axis terms) for every corner, the last axis varying fastest
    in reverse (x fastest), e.g. for D = 3 out[..., z, y, x] = combine(combine(t_z, t_y), t_x)."""
    out = per_axis[:, :, 0]
    for axis in range(1, per_axis.shape[2]):
        out = combine(per_axis[:, :, axis].reshape(*per_axis.shape[:2], 2, *[1] * (axis)), out[:, :, None])
    return out


def hash_encode(x: Tensor, table: Tensor, levels: HashLevels) -> Tensor:
    """[N, L * F] features of x [N, D] in [0, 1]^D (D = 2 or 3) from `table` [rows, F]: at each level the
    (bi/tri)linear blend of the 2^D vertices around x. Differentiable with respect to the table and x (twice)."""
    n, dims = x.shape
    device, count = x.device, len(levels.scale)
    dense = levels.mask < 0
    first_hashed = int(dense.sum())  # dense levels are the coarsest ones, first in the table (CPU: no sync)
    vertices = levels.vertices.float()
    # Per level and axis [L, D, N], so every elementwise op runs along N contiguous points.
    scale = levels.scale.to(device)[:, None, None]
    pos = torch.minimum(x.t() * scale + 0.5, (vertices - 1).to(device)[:, None, None])
    cell = torch.minimum(pos.detach().floor(), (vertices - 2).to(device)[:, None, None])  # top vertex in range
    frac = pos - cell  # autograd reaches x through here
    w = torch.stack([1 - frac, frac], 2).permute(0, 3, 1, 2)  # [L, N, axis, corner bit]
    weights = _outer_over_axes(w, torch.mul)  # [L, N, (z,) y, x]

    with torch.no_grad():
        # Per-axis terms of the index for both corner bits, then combined separably:
        # dense levels add them (x + y V + z V^2), hashed levels XOR them.
        powers = levels.vertices[:, None] ** torch.arange(dims)
        mult = torch.where(dense[:, None], powers, torch.tensor(PRIMES[:dims])).to(device)[:, :, None]
        mask = levels.mask.to(device)[:, None, None]
        lo = cell.long() * mult  # int64: prime products overflow int32
        terms = torch.empty(count, dims, 2, n, dtype=torch.int32, device=device)  # [L, axis, bit, N]
        torch.bitwise_and(lo, mask, out=terms[:, :, 0])
        torch.bitwise_and(lo + mult, mask, out=terms[:, :, 1])
        terms = terms.permute(0, 3, 1, 2)  # [L, N, axis, bit]
        index = torch.cat([_outer_over_axes(terms[:first_hashed], torch.add),
                           _outer_over_axes(terms[first_hashed:], torch.bitwise_xor)])
        index += levels.offset.to(device=device, dtype=torch.int32).view(-1, *[1] * (dims + 1))

    corners = 2**dims
    out = _Interpolate.apply(table, weights.reshape(-1, corners), index.reshape(-1, corners))  # [L * N, F]
    return out.view(count, n, table.shape[1]).transpose(0, 1).reshape(n, count * table.shape[1])


# --- marching ----------------------------------------------------------------------------------------------


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

    def interval(self, t_start: Tensor, t_far: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The k-th interval [t_k, t_k + dt(t_k)], cut at the box exit t_far (broadcasting)."""
        t0 = self.boundary(t_start, k)
        return t0, torch.minimum(t0 + self.dt(t0), t_far)

    def _phases(self, t_start: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """n1 constant steps reach t1 >= step / cone_angle, then n2 geometric ones reach t2 >= max_step / cone_angle."""
        n1 = ((self.step / self.cone_angle - t_start) / self.step).ceil().clamp(min=0)
        t1 = t_start + n1 * self.step
        n2 = (torch.log(self.max_step / self.cone_angle / t1) / math.log1p(self.cone_angle)).ceil().clamp(min=0)
        t2 = t1 * torch.exp(n2 * math.log1p(self.cone_angle))
        return n1, t1, n2, t2


def occupied_at(occupied: Tensor, resolution: int, ux: Tensor, uy: Tensor, uz: Tensor) -> Tensor:
    """bool: whether the cell holding each point of a cascaded grid's bits `occupied` [levels, res^3] (flattened
    [level, x, y, z], z fastest) is occupied, at the finest level containing it (False outside all). The point
    is given per axis (any shape; contiguous is fastest) in coordinates where level 0 is [-1, 1]^3."""
    levels = occupied.shape[0]
    # frexp's exponent of max|u| is the smallest l with max|u| < 2^l: the finest level containing u
    # (instant-ngp's mip_from_pos).
    level = torch.frexp(torch.maximum(torch.maximum(ux.abs(), uy.abs()), uz.abs())).exponent.clamp_(min=0)
    inside = level < levels
    level = level.clamp_(max=levels - 1)
    scale = torch.exp2(-level.float()) * (resolution / 2)  # normalized coordinate -> cells from the level's centre
    # int32 throughout: converting floats to int64 is several times slower on CPU.
    i, j, k = (torch.addcmul(torch.full_like(u, resolution / 2), u, scale).int().clamp_(0, resolution - 1)
               for u in (ux, uy, uz))
    index = ((level * resolution + i) * resolution + j) * resolution + k
    return occupied.view(-1).index_select(0, index.view(-1)).view(index.shape) & inside


MARCH_CHUNK = 2**20  # candidates tested at once


def march(origins: Tensor, dirs: Tensor, t_start: Tensor, t_far: Tensor, occupied: Tensor, box: list[float],
          resolution: int, rule: StepRule, max_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ray_idx [S], t0 [S], t1 [S]), packed by ray: the intervals from t_start (stepped by `rule`, the last cut at
    t_far) whose midpoints lie in occupied cells of the cascaded grid `occupied` [levels, res^3] with level-0 box
    `box` (x0, y0, z0, x1, y1, z1); at most `max_samples` per ray, the nearest.

    Candidates are tested in blocks of the next K steps of the rays still inside the box (K * rays ~ MARCH_CHUNK),
    which broadcasts per-ray values instead of gathering them per sample."""
    device, n_rays = origins.device, len(origins)
    lo, hi = torch.tensor(box[:3], device=device), torch.tensor(box[3:], device=device)
    # Midpoints are tested in the grid's normalized frame, one contiguous [rays, K] tensor per axis.
    o_u, d_u = (origins - (lo + hi) / 2) / ((hi - lo) / 2), dirs / ((hi - lo) / 2)
    counts = rule.count(t_start, t_far)
    blocks, k0, k_end = [], 0, int(counts.max()) if n_rays else 0
    while k0 < k_end:
        active = (counts > k0).nonzero().squeeze(1)
        k = torch.arange(k0, min(k0 + max(1, MARCH_CHUNK // len(active)), k_end), device=device, dtype=torch.float32)
        t0, t1 = rule.interval(t_start[active, None], t_far[active, None], k)
        t_mid = (t0 + t1) / 2
        u = (torch.addcmul(o_u[active, a, None], d_u[active, a, None], t_mid) for a in range(3))
        block = torch.zeros(n_rays, len(k), dtype=torch.bool, device=device)
        block[active] = occupied_at(occupied, resolution, *u) & (t1 > t0)  # t1 > t0: past a shorter ray's exit
        blocks.append(block)
        k0 += len(k)

    hits = torch.cat(blocks, 1) if blocks else torch.zeros(n_rays, 0, dtype=torch.bool, device=device)
    ray_idx, k = hits.nonzero().unbind(1)  # ray-major, then k: packed and sorted
    if k_end > max_samples:  # keep each ray's nearest max_samples: its first, counted from its first sample
        rank = torch.arange(len(ray_idx), device=device) - torch.searchsorted(ray_idx, ray_idx)
        ray_idx, k = ray_idx[rank < max_samples], k[rank < max_samples]
    t0, t1 = rule.interval(t_start[ray_idx], t_far[ray_idx], k.float())
    return ray_idx, t0, t1


# --- nearest centres ----------------------------------------------------------------------------------------

NEAREST_CHUNK = 2**24  # distances computed at once (bounds memory)


def nearest(points: Tensor, centres: Tensor, candidates: Tensor, resolution: int, k: int) -> tuple[Tensor, Tensor]:
    """(indices [N, k] int64, squared distances [N, k]), nearest first, of each point's k nearest centres [K, D]
    among its cell's candidates: `candidates` [res^D, width] lists, per cell of a uniform grid over [0, 1]^D
    (flattened, last axis fastest), centre indices padded with -1."""
    dims, width = points.shape[1], candidates.shape[1]
    index, distance = [], []
    for part in points.split(max(1, NEAREST_CHUNK // max(width, 1))):
        ijk = (part * resolution).long().clamp(0, resolution - 1)
        cell = ijk[:, 0]
        for axis in range(1, dims):
            cell = cell * resolution + ijk[:, axis]
        listed = candidates[cell]  # [n, width]
        d2 = (part[:, None] - centres[listed.clamp(min=0)]).square().sum(-1)
        d2 = torch.where(listed >= 0, d2, math.inf)
        values, pick = d2.topk(k, dim=1, largest=False)
        index.append(listed.gather(1, pick))
        distance.append(values)
    if not index:
        return points.new_zeros(0, k, dtype=torch.long), points.new_zeros(0, k)
    return torch.cat(index), torch.cat(distance)
