"""Rendering a batch of rays: evaluate the field on the sampler's samples, composite."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from recon.data.rays import Rays
from recon.renderers.compositing import STOP_EPS, accumulate, composite, finish, integrate
from recon.renderers.packing import Samples

# Interval midpoints x [S, 3], unit dirs d [S, 3] and lengths dt [S] -> {"tau": the intervals' optical depth [S],
# "rgb": their colour [S, 3], ...}: sigma * dt for a density field, NeuS's -log(1 - alpha) for an SDF field, so one
# renderer serves both. Whatever else the field computes on the way (an SDF's gradients) comes back as "extras".
FieldFn = Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]


# The sampler's half of a render: rays -> their packed samples (marching an occupancy grid, or proposal sampling).
SampleFn = Callable[[Rays], Samples]

# A render's field queries go in pieces of at most this many points on a CPU, where the intermediates of a piece
# (the MLPs' [points, 64] activations, the hash grid's per-level corner indices) then stay in cache: a fox frame
# 1.4x faster than 65 k points at once (BENCHMARKS.md). Training keeps its batch whole (its backward, pieced, lost
# more than the forward gained: lego 89 -> 110 ms a step), as does a GPU, which wants its batches large.
CPU_QUERY_POINTS = 1 << 13
GPU_QUERY_POINTS = 1 << 20


def query_points(device: torch.device) -> int:
    """How many points a render (or a bake) hands a field at once on `device`."""
    return CPU_QUERY_POINTS if device.type == "cpu" else GPU_QUERY_POINTS


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times `scale` [S] per sample backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.view(-1, *[1] * (grad.dim() - 1)), None


def render_rays(rays: Rays, field_fn: FieldFn, samples: Samples, background: Tensor | None = None,
                near_scale: float | None = None) -> dict[str, Any]:
    """Differentiable render (training) of `samples` along `rays`: `composite`'s rgb, depth, opacity, weights,
    plus the samples, n_samples (the field evaluations) and the field's "extras" at the samples (FieldFn).
    near_scale: the gradients of each sample's optical depth and colour are scaled by min(1, (t / near_scale)^2)
    for a sample at distance t along its ray from the camera ("Floaters No More", Philip and Deschaintre 2023):
    space close to a camera fills a large part of its image, so its pixels pull on it far harder than on a
    distant cell, and it learns floaters that explain them."""
    with record_function("field"):
        extras = field_fn(samples.positions(rays), samples.dirs(rays), samples.dt)
        tau, rgb = extras.pop("tau"), extras.pop("rgb")
        if near_scale is not None:
            scale = ((samples.t0 + samples.t1) / (2 * near_scale)).square().clamp(max=1)
            tau, rgb = _ScaleGradient.apply(tau, scale), _ScaleGradient.apply(rgb, scale)
    with record_function("composite"):
        out: dict[str, Any] = dict(composite(rgb, tau, samples, background))
    out["samples"], out["n_samples"], out["extras"] = samples, len(samples), extras
    return out


@torch.no_grad()
def render_chunked(rays: Rays, field_fn: FieldFn, sample_fn: SampleFn, background: Tensor | None = None,
                   chunk: int = 8192, early_stop_eps: float = STOP_EPS,
                   samples_per_round: int = 8) -> dict[str, Tensor]:
    """Render many rays (images, the viewer) `chunk` at a time, without grad: rgb [R, 3], depth [R], opacity [R].

    Each chunk is sampled once, then evaluated front to back in rounds of the next `samples_per_round`
    samples of every ray whose transmittance is still >= early_stop_eps, so the field is queried at most
    a round past where a ray turns opaque (instant-ngp's and nerfacc's test-time marching).
    """
    parts = []
    for r0 in range(0, max(len(rays), 1), chunk):  # one (empty) chunk for an empty batch
        bg = background[r0 : r0 + chunk] if background is not None and background.dim() == 2 else background
        part = rays[r0 : r0 + chunk]
        sums = _front_to_back(part, sample_fn(part), field_fn, early_stop_eps, samples_per_round)
        parts.append(finish(sums, bg))
    return {key: torch.cat([p[key] for p in parts]) for key in ("rgb", "depth", "opacity")}


def _front_to_back(rays: Rays, samples: Samples, field_fn: FieldFn, eps: float, per_round: int) -> dict[str, Tensor]:
    """`integrate`'s sums over `samples`, computed per round of samples and stopping rays at transmittance eps."""
    n = samples.n_rays
    rank = samples.rank()
    tau_before = torch.zeros(n, device=samples.t0.device)
    sums = {"color": torch.zeros(n, 3, device=tau_before.device), "opacity": torch.zeros_like(tau_before),
            "weighted_t": torch.zeros_like(tau_before)}
    max_tau = -math.log(eps) if eps > 0 else math.inf
    for first in range(0, len(samples), per_round):
        in_round = (rank >= first) & (rank < first + per_round) & (tau_before < max_tau)[samples.ray_idx]
        if not bool(in_round.any()):  # every ray has ended or run out of samples
            break
        part = samples[in_round]
        queried = _query(field_fn, part, rays)
        tau = queried["tau"]
        for key, value in integrate(queried["rgb"], tau, part, tau_before, eps).items():
            if key in sums:
                sums[key] += value
        tau_before += accumulate(None, tau, part.ray_idx, n)
    return sums


def _query(field_fn: FieldFn, samples: Samples, rays: Rays) -> dict[str, Tensor]:
    """The field's "tau" and "rgb" at `samples`, in pieces of `query_points`."""
    piece = query_points(samples.t0.device)
    parts = [field_fn(p.positions(rays), p.dirs(rays), p.dt)
             for p in (samples[first : first + piece] for first in range(0, max(len(samples), 1), piece))]
    return parts[0] if len(parts) == 1 else {key: torch.cat([p[key] for p in parts]) for key in ("tau", "rgb")}
