"""Volume compositing over packed samples, in terms of optical depth.

Each sample carries its optical depth tau = -log(1 - alpha): sigma*dt for density fields, or from NeuS
alpha for SDF fields. Transmittance is then exp(-(sum of tau before the sample)), a segmented sum
that packs and differentiates simply, instead of a product of (1 - alpha).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from recon.cuda import kernels_for
from recon.cuda import ops as cuda_ops

if TYPE_CHECKING:
    from recon.renderers.marching import Samples


def density_to_tau(sigma: Tensor, dt: Tensor) -> Tensor:
    return sigma * dt


def alpha_to_tau(alpha: Tensor) -> Tensor:
    # Clamped below 1 so an opaque sample still has a finite tau (~13.8: transmittance 1e-6 behind it) and gradient.
    return -torch.log1p(-alpha.clamp(0.0, 1.0 - 1e-6))


def first_of_ray(ray_idx: Tensor, n_rays: int) -> Tensor:
    """[S]: the packed index of the first sample of each sample's ray (ray_idx ascending)."""
    return cuda_ops.ray_starts(ray_idx, n_rays)[ray_idx]


def render_weights(tau: Tensor, ray_idx: Tensor, n_rays: int) -> tuple[Tensor, Tensor]:
    """weights [S] = T_i * (1 - exp(-tau_i)) and transmittance T_i = exp(-sum of tau_j before i on its ray)."""
    # One cumulative sum over the whole batch, minus its value at each ray's start: in float64, as this
    # difference of two large sums would cancel the small ones in float32.
    tau64 = tau.double()
    before = torch.cumsum(tau64, 0) - tau64
    transmittance = torch.exp(before[first_of_ray(ray_idx, n_rays)] - before).to(tau.dtype)
    return transmittance * -torch.expm1(-tau), transmittance


def distortion(weights: Tensor, samples: Samples) -> Tensor:
    """mip-NeRF 360's distortion loss per ray [R], on packed intervals: sum_ij w_i w_j |m_i - m_j| over the
    interval midpoints m plus 1/3 sum_i w_i^2 (t1_i - t0_i). It pulls each ray's weight into one short
    stretch, which removes floaters. Linear in the samples: with the midpoints ascending along a ray, the
    double sum is 2 sum_i w_i (m_i W_i - M_i), W_i and M_i being the sums of w and w*m before sample i."""
    n = samples.n_rays
    mid = (0.5 * (samples.t0 + samples.t1)).double()
    w = weights.double()
    start = first_of_ray(samples.ray_idx, n)

    def before(x: Tensor) -> Tensor:  # exclusive per-ray cumulative sum (float64: see render_weights)
        total = torch.cumsum(x, 0) - x
        return total - total[start]

    pairs = 2 * w * (mid * before(w) - before(w * mid))
    inside = w.square() * (samples.t1 - samples.t0).double() / 3
    return accumulate(None, pairs + inside, samples.ray_idx, n).to(weights.dtype)


def accumulate(values: Tensor | None, weights: Tensor, ray_idx: Tensor, n_rays: int) -> Tensor:
    """Sum of w * v per ray: [R] for values [S] (or None: the sum of weights), [R, C] for values [S, C]."""
    src = weights if values is None else weights.reshape(-1, *(1,) * (values.dim() - 1)) * values
    return src.new_zeros((n_rays, *src.shape[1:])).index_add(0, ray_idx, src)


# instant-ngp's early termination: once a ray's transmittance is below this, its later samples neither add
# colour nor receive gradient (training and rendering alike).
STOP_EPS = 1e-4


def integrate(rgb: Tensor, tau: Tensor, samples: Samples, tau_before: Tensor | None = None,
              stop_eps: float = STOP_EPS) -> dict[str, Tensor]:
    """The weighted sums along each ray: colour [R, C], opacity [R], w*t [R], and weights [S].

    tau_before [R]: optical depth each ray has already crossed (rendering front to back in segments), which
    scales its weights by exp(-tau_before). A sample whose transmittance (tau_before included) is below
    stop_eps gets weight 0. Tensors on the GPU go to the fused kernel (recon.cuda); this is its twin.
    """
    ray_idx, n_rays = samples.ray_idx, samples.n_rays
    if (kernels := kernels_for(tau)) is not None:
        weights, color, opacity, weighted_t = cuda_ops.integrate(rgb, tau, samples.t_mid, ray_idx, n_rays, tau_before,
                                                                 stop_eps, kernels)
        return {"color": color, "opacity": opacity, "weighted_t": weighted_t, "weights": weights}
    weights, transmittance = render_weights(tau, ray_idx, n_rays)
    if tau_before is not None:
        scale = torch.exp(-tau_before)[ray_idx]
        weights, transmittance = weights * scale, transmittance * scale
    weights = torch.where(transmittance >= stop_eps, weights, 0.0)
    return {
        "color": accumulate(rgb, weights, ray_idx, n_rays),
        "opacity": accumulate(None, weights, ray_idx, n_rays),
        "weighted_t": accumulate(samples.t_mid, weights, ray_idx, n_rays),
        "weights": weights,
    }


def finish(sums: dict[str, Tensor], background: Tensor | None) -> dict[str, Tensor]:
    """`integrate`'s sums -> rgb [R, 3] over `background` ([3] or [R, 3]), opacity [R], depth [R].

    depth is the expected distance at which the ray ends given that it ends in the box,
    sum(w * t) / opacity (0 for rays that hit nothing; times opacity for the unnormalised depth).
    """
    color, opacity = sums["color"], sums["opacity"]
    if background is not None:
        color = color + (1 - opacity)[:, None] * background
    # A clamp, not a where, so rays with zero opacity get depth 0 and a finite gradient.
    return {"rgb": color, "opacity": opacity, "depth": sums["weighted_t"] / opacity.clamp(min=1e-10)}


def composite(rgb: Tensor, tau: Tensor, samples: Samples, background: Tensor | None = None) -> dict[str, Tensor]:
    """Render rgb [S, 3] with optical depths tau [S] along `samples`: `finish`'s rgb, depth and
    opacity, plus the weights [S]."""
    sums = integrate(rgb, tau, samples)
    return {**finish(sums, background), "weights": sums["weights"]}
