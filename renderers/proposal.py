"""Proposal sampling (mip-NeRF 360, nerfacto): small density fields place a fixed number of samples per ray.

Level 0 spaces its intervals evenly in a normalised spacing s of the distance t (0 at the ray's near end, 1 at
its far end): linear for a bounded scene, or nerfacto's piecewise rule for an unbounded one, linear up to
distance 1 and linear in disparity beyond, so far space gets few, long intervals. Each later level draws its
interval edges from the previous level's weights (inverse transform sampling of the piecewise-constant
histogram), and the field is evaluated on the last level's intervals. The proposal fields learn from the
interlevel loss alone: their histograms must bound the field's weights (mip-NeRF 360's L_prop), so they keep
room for every sample the field needs. Rays are batched [R, N] here (a fixed count per ray); the field's
intervals are handed on packed, as marching's are, so compositing and the losses serve both samplers alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from recon.data.rays import Rays
from recon.renderers.occupancy import DensityFn, rand
from recon.renderers.packing import Samples

HISTOGRAM_PADDING = 0.01  # nerfacto's: added to every bin before resampling, so no stretch of a ray goes unsampled
INTERLEVEL_EPS = 1e-7


def spacing_of(t: Tensor, kind: str) -> Tensor:
    """The spacing g(t) whose even steps the first level takes: "linear" t; "piecewise" t below 1 and 2 - 1/t
    beyond (continuous with its slope at 1: nerfacto's UniformLinDispPiecewiseSampler); "disparity" -1/t (even in
    disparity from the ray's near end: forward-facing captures, as NeRF's linear steps in NDC depth)."""
    if kind == "linear":
        return t
    if kind == "disparity":
        return -1 / t.clamp(min=1e-6)
    return torch.where(t < 1, t, 2 - 1 / t.clamp(min=1))


def distance_of(g: Tensor, kind: str) -> Tensor:
    """The inverse of `spacing_of`."""
    if kind == "linear":
        return g
    if kind == "disparity":
        return -1 / g.clamp(max=-1e-6)
    return torch.where(g < 1, g, 1 / (2 - g).clamp(min=1e-6))


@dataclass
class Histogram:
    """One proposal level along every ray: bins between `edges` [R, N + 1] (in s), their weights [R, N]."""

    edges: Tensor
    weights: Tensor


@dataclass
class Proposal:
    """What proposal sampling hands the renderer: the field's intervals and what the losses need."""

    samples: Samples  # the field's intervals in distance t, packed (the same count on every ray)
    spacing: Samples  # the same intervals in s, where mip-NeRF 360 measures the distortion loss
    histograms: list[Histogram]  # each proposal level's, differentiable w.r.t. its field while training

    def interlevel(self, weights: Tensor) -> Tensor:
        """mip-NeRF 360's L_prop: the mean over rays, summed over levels, of sum_i max(0, w_i - bound_i)^2 / w_i,
        where w [S] are the field's weights on its intervals (detached: only the proposals learn from it) and
        bound_i the proposal weight on the bins that meet interval i."""
        edges = torch.cat([self.spacing.t0.view(-1, self.count), self.spacing.t1.view(-1, self.count)[:, -1:]], 1)
        w = weights.detach().view(-1, self.count)
        loss = weights.new_zeros(())
        for level in self.histograms:
            excess = (w - outer_bound(edges, level.edges, level.weights)).clamp(min=0)
            loss = loss + (excess.square() / (w + INTERLEVEL_EPS)).sum(-1).mean()
        return loss

    @property
    def count(self) -> int:
        return len(self.samples) // max(self.samples.n_rays, 1)


def outer_bound(edges: Tensor, proposal_edges: Tensor, proposal_weights: Tensor) -> Tensor:
    """[R, M]: for each interval between `edges` [R, M + 1], the summed weight of the proposal bins
    (`proposal_edges` [R, N + 1], `proposal_weights` [R, N]) that overlap it."""
    n = proposal_weights.shape[-1]
    cumulative = torch.cat([proposal_weights.new_zeros(len(proposal_weights), 1), proposal_weights.cumsum(-1)], -1)
    # The first bin meeting [a, b) is the one holding a; the last, the one before the first edge >= b.
    first = (torch.searchsorted(proposal_edges.contiguous(), edges[:, :-1].contiguous(), right=True) - 1).clamp(0, n)
    end = torch.searchsorted(proposal_edges.contiguous(), edges[:, 1:].contiguous()).clamp(0, n)
    return (cumulative.gather(1, end) - cumulative.gather(1, first)).clamp(min=0)


def ray_weights(tau: Tensor) -> Tensor:
    """[R, N] volume-rendering weights of optical depths tau [R, N] along each ray. The batched twin of
    compositing's packed weights: a cumulative sum per row needs neither ray offsets nor float64."""
    before = torch.cumsum(tau, -1) - tau
    return torch.exp(-before) * -torch.expm1(-tau)


def resample(edges: Tensor, weights: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """[R, count + 1] edges drawn from the histogram (`edges` [R, N + 1], `weights` [R, N]) by inverse transform
    sampling, padded by HISTOGRAM_PADDING: evenly spaced quantiles, all shifted by one random fraction of a step
    per ray when a generator is given (stratified, for training), else spanning the histogram end to end."""
    pdf = weights.detach() + HISTOGRAM_PADDING
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf / cdf[:, -1:]], -1)
    steps = torch.arange(count + 1, device=edges.device, dtype=edges.dtype)
    if generator is None:
        u = (steps / count).expand(len(edges), -1)
    else:
        u = (steps + rand((len(edges), 1), generator, edges.device)) / (count + 1)
    u = u.contiguous()
    right = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(1, right - 1), cdf.gather(1, right)
    s0, s1 = edges.gather(1, right - 1), edges.gather(1, right)
    fraction = ((u - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0, 1)
    return s0 + fraction * (s1 - s0)


def propose(rays: Rays, t_near: Tensor, t_far: Tensor, density_fns: Sequence[DensityFn], counts: Sequence[int],
            field_count: int, spacing: str, generator: torch.Generator | None = None, anneal: float = 1.0) -> Proposal:
    """The field's `field_count` intervals per ray between t_near and t_far [R] (rays that miss get empty
    intervals at t_near, which weigh nothing), after one proposal level per density function, level k
    evaluating `density_fns[k]` on `counts[k]` intervals. A generator jitters the levels (training). anneal:
    the proposal weights are raised to this power before resampling (nerfacto's, rising from 0 to 1 early in
    training so the first samples spread along the ray while the proposals know nothing)."""
    t_far = torch.maximum(t_far, t_near)
    g_near, g_far = spacing_of(t_near, spacing)[:, None], spacing_of(t_far, spacing)[:, None]

    def distances(s: Tensor) -> Tensor:
        return distance_of(g_near + s * (g_far - g_near), spacing)

    # Level 0 resamples one bin spanning the ray: even steps in s (stratified in training), as nerfacc does.
    whole = torch.tensor([[0.0, 1.0]], device=t_near.device).expand(len(rays), -1)
    edges = resample(whole, torch.ones_like(whole[:, :1]), counts[0] if counts else field_count, generator)
    histograms = []
    for level, density_fn in enumerate(density_fns):
        t = distances(edges)
        midpoints = rays.origins[:, None] + rays.dirs[:, None] * ((t[:, 1:] + t[:, :-1]) / 2)[..., None]
        sigma = density_fn(midpoints.reshape(-1, 3)).view(len(rays), -1)
        weights = ray_weights(sigma * (t[:, 1:] - t[:, :-1]))
        histograms.append(Histogram(edges, weights))
        following = counts[level + 1] if level + 1 < len(counts) else field_count
        with torch.no_grad():
            edges = resample(edges, weights.pow(anneal), following, generator)
    t = distances(edges)
    ray_idx = torch.arange(len(rays), device=t.device).repeat_interleave(edges.shape[1] - 1)
    samples = Samples(ray_idx, t[:, :-1].reshape(-1), t[:, 1:].reshape(-1), len(rays))
    return Proposal(samples, Samples(ray_idx, edges[:, :-1].reshape(-1), edges[:, 1:].reshape(-1), len(rays)),
                    histograms)
