"""Volume compositing over packed samples, in terms of optical depth.

Each sample carries its optical depth tau = -log(1 - alpha): sigma*dt for density fields, or from NeuS
alpha for SDF fields. Transmittance is then exp(-(sum of tau before the sample)), a segmented sum
that packs and differentiates simply, instead of a product of (1 - alpha).
"""

from __future__ import annotations

import torch
from torch import Tensor

from recon.cuda import ops, twins
from recon.renderers.packing import Samples, first_of_ray


def distortion(weights: Tensor, samples: Samples) -> Tensor:
    """mip-NeRF 360's distortion loss per ray [R], on packed intervals: sum_ij w_i w_j |m_i - m_j| over the
    interval midpoints m plus 1/3 sum_i w_i^2 (t1_i - t0_i). It pulls each ray's weight into one short
    stretch, which removes floaters. Linear in the samples: with the midpoints ascending along a ray, the
    double sum is 2 sum_i w_i (m_i W_i - M_i), W_i and M_i being the sums of w and w*m before sample i."""
    n = samples.n_rays
    mid = (0.5 * (samples.t0 + samples.t1)).double()
    w = weights.double()
    start = first_of_ray(samples.ray_idx, n)

    def before(x: Tensor) -> Tensor:  # exclusive per-ray cumulative sum (float64: see twins.render_weights)
        total = torch.cumsum(x, 0) - x
        return total - total[start]

    pairs = 2 * w * (mid * before(w) - before(w * mid))
    inside = w.square() * (samples.t1 - samples.t0).double() / 3
    return accumulate(None, pairs + inside, samples.ray_idx, n).to(weights.dtype)


def accumulate(values: Tensor | None, weights: Tensor, ray_idx: Tensor, n_rays: int) -> Tensor:
    """Sum of w * v per ray: [R] for values [S] (or None: the sum of weights), [R, C] for values [S, C]."""
    src = weights if values is None else weights.reshape(-1, *(1,) * (values.dim() - 1)) * values
    return twins.per_ray_sum(src, ray_idx, n_rays)


# instant-ngp's early termination: once a ray's transmittance is below this, its later samples neither add
# colour nor receive gradient (training and rendering alike).
STOP_EPS = 1e-4


def integrate(rgb: Tensor, tau: Tensor, samples: Samples, tau_before: Tensor | None = None,
              stop_eps: float = STOP_EPS) -> dict[str, Tensor]:
    """The weighted sums along each ray: colour [R, C], opacity [R], w*t [R], and weights [S].

    tau_before [R]: optical depth each ray has already crossed (rendering front to back in segments), which
    scales its weights by exp(-tau_before). A sample whose transmittance (tau_before included) is below
    stop_eps gets weight 0. One fused kernel where there is one (recon.cuda.ops.integrate).
    """
    weights, color, opacity, weighted_t = ops.integrate(rgb, tau, samples.t_mid, samples.ray_idx, samples.starts,
                                                        tau_before, stop_eps)
    return {"color": color, "opacity": opacity, "weighted_t": weighted_t, "weights": weights}


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
