"""Encodings and small networks shared by the field backends.

`Encoding` is what every backend contributes to the coordinate tasks (images, SDFs): coordinates in
[0, 1]^D to features. `HashGridEncoding` is instant-ngp's multiresolution hash encoding in plain torch,
with the function and parameter layout of tiny-cuda-nn's "HashGrid" (so weights trained by either
implementation load into the other), `SHEncoding` the real spherical harmonics used for view
directions, `MLP` a plain ReLU stack and `trunc_exp` instant-ngp's density activation.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from recon.cuda import ops
from recon.cuda.twins import HashLevels


class Encoding(nn.Module):
    """Coordinates u [N, D] in [0, 1]^D -> features [N, out_dim].

    `lr_scale` multiplies the base learning rate for its parameters (grids often train faster than
    MLPs); `update` and `regularization` mirror Field's (progressive upscaling, TV and L1 terms).
    """

    dims: int
    lr_scale: float = 1.0
    grows: bool = False  # its parameters change shape in `update` (progressive upscaling)
    coarse_to_fine: bool = False  # it has levels that open one by one (`active_levels` of `levels`)
    adaptive: bool = False  # it places itself from data (`adapt`) and may index a fixed point set (`attach`)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def update(self, progress: float) -> bool:
        return False

    def regularization(self) -> torch.Tensor | None:
        return None


def grid_shape(extent: list[float] | torch.Tensor, num_voxels: int) -> list[int]:
    """Voxels per axis for about `num_voxels` cubic voxels over a box of side lengths `extent` (DVGO's rule)."""
    extent = [float(e) for e in extent]
    voxel = (math.prod(extent) / num_voxels) ** (1 / len(extent))
    return [max(2, int(e / voxel)) for e in extent]


class Upscaling(nn.Module):
    """Progressive scaling of a grid: from `initial` to `final` voxels in log-spaced steps, one at each
    milestone of progress passed (DVGO doubles the voxels at each; TensoRF log-spaces 128³ -> 300³). The
    number of upscales done is state, so a checkpoint reloads at the resolution it reached."""

    def __init__(self, initial: int, final: int, milestones: tuple[float, ...] | list[float]):
        super().__init__()
        self.initial, self.final, self.milestones = max(1, initial), max(1, final), tuple(milestones)
        self.register_buffer("done", torch.zeros((), dtype=torch.long))

    def voxels(self, done: int | None = None) -> int:
        done = int(self.done) if done is None else done
        if not self.milestones:
            return self.final
        start, end = math.log(self.initial), math.log(self.final)
        return round(math.exp(start + (end - start) * done / len(self.milestones)))

    def advance(self, progress: float) -> bool:
        """Count the milestones passed; True when that raised the voxel count (the caller resamples)."""
        due = sum(progress >= at for at in self.milestones)
        if due <= int(self.done):
            return False
        self.done.fill_(due)
        return True


@functools.cache
def tcnn_available() -> bool:
    """Whether tiny-cuda-nn's torch bindings import (never raises)."""
    try:
        import tinycudann  # noqa: F401
    except (ImportError, OSError):  # OSError (= EnvironmentError): tinycudann without a usable GPU
        return False
    return True


class HashGridEncoding(Encoding):
    """Multiresolution hash encoding (Müller et al. 2022): [..., D] in [0, 1]^D -> [..., L*F] (D = 2 or 3).

    Level l spans `scale_l = base * b^l - 1` cells with `V_l = ceil(scale_l) + 1` vertices per
    axis (b = growth factor from base to max resolution), a point sits at `x * scale_l + 0.5`
    in vertex units, and its feature is the (bi/tri)linear blend of the 2^D surrounding vertices.
    These are tiny-cuda-nn's conventions, so the function equals its "HashGrid" encoding. A
    level whose V^D vertices fit in T = 2^log2_table rows is stored densely
    (x + y V + z V^2); finer levels hash (x * 1 ^ y * 2654435761 ^ z * 805459861) & (T - 1).
    All levels share one table [sum of level sizes, F], level-major, each level
    min(T, V^D rounded up to 8) rows: tiny-cuda-nn's parameter layout (flattened).

    Positions beyond the upper face of a level's grid (the last half cell, where
    tiny-cuda-nn reads past the level's end) are clamped onto it.
    """

    coarse_to_fine = True

    def __init__(
        self,
        levels: int = 16,
        features: int = 2,
        log2_table: int = 19,
        base_resolution: int = 16,
        max_resolution: float = 2048,
        tcnn: bool = False,
        dims: int = 3,
    ):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"hash grid of {dims} dimensions: only 2 and 3 are supported")
        self.dims, self.levels, self.features, self.log2_table = dims, levels, features, log2_table
        self.base_resolution, self.max_resolution = base_resolution, max_resolution
        self.growth = math.exp(math.log(max_resolution / base_resolution) / (levels - 1)) if levels > 1 else 1.0
        table_size = 1 << log2_table
        # In fp32 as tiny-cuda-nn computes it, so both agree on each level's vertex count.
        growth32 = torch.tensor(self.growth, dtype=torch.float32)
        scales = torch.exp2(torch.arange(levels, dtype=torch.float32) * torch.log2(growth32)) * base_resolution - 1
        vertices = [math.ceil(s) + 1 for s in scales.tolist()]
        dense = [v**dims <= table_size for v in vertices]
        sizes = [min(-(-(v**dims) // 8) * 8, table_size) for v in vertices]
        offsets = [sum(sizes[:level]) for level in range(levels)]
        if sum(sizes) >= 2**31:
            raise ValueError(f"hash grid of {sum(sizes)} rows exceeds int32 indexing")
        self.dense_levels = sum(dense)  # dense levels are the coarsest ones, first in the table
        self.active_levels: float = levels  # coarse to fine (SDF fields, pose refinement): finer levels read 0

        self.table = nn.Parameter(torch.empty(sum(sizes), features).uniform_(-1e-4, 1e-4))
        # The levels as recon.cuda reads them: CPU tensors in a plain attribute (not buffers), so they stay on the
        # CPU and a GPU step reads nothing back.
        hashed = [-1 if d else table_size - 1 for d in dense]
        self.hash_levels = HashLevels(scales, torch.tensor(vertices), torch.tensor(offsets), torch.tensor(hashed))
        self._tcnn = self._make_tcnn() if tcnn else None

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def _make_tcnn(self) -> nn.Module:
        """tiny-cuda-nn's HashGrid reading this module's table (UNTESTED: no GPU/tcnn here).

        tcnn's own flat parameter is dropped; each forward hands it `table.view(-1)`, so the
        optimiser and the state_dict only ever see the canonical torch table.
        """
        if not tcnn_available():
            raise RuntimeError("tiny-cuda-nn is not installed; use tcnn=False for the pure-torch hash grid")
        import tinycudann

        config = {
            "otype": "HashGrid",
            "n_levels": self.levels,
            "n_features_per_level": self.features,
            "log2_hashmap_size": self.log2_table,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.growth,
            "interpolation": "Linear",
        }
        encoding = tinycudann.Encoding(self.dims, config, dtype=torch.float32)
        if encoding.params.numel() != self.table.numel():
            raise RuntimeError(f"tiny-cuda-nn grid has {encoding.params.numel()} parameters, "
                               f"expected {self.table.numel()}")
        del encoding.params
        return encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dims = x.shape[:-1], self.dims
        x = x.reshape(-1, dims).to(self.table.dtype).clamp(0, 1)
        if self._tcnn is not None:
            self._tcnn.params = self.table.view(-1)
            return self._tcnn(x).view(*batch, self.out_dim)
        return self._mask_levels(ops.hash_encode(x, self.table, self.hash_levels).view(*batch, self.out_dim))

    def _mask_levels(self, features: torch.Tensor) -> torch.Tensor:
        """[..., L * F] with the levels not yet open (coarse to fine) zeroed. A fractional `active_levels` a
        opens level l by BARF's smooth window, (1 - cos(pi clamp(a - l, 0, 1))) / 2 (an integer a opens
        levels 0..a-1 fully)."""
        if self.active_levels >= self.levels:
            return features
        opening = (self.active_levels - torch.arange(self.levels, device=features.device)).clamp(0, 1)
        weight = (1 - torch.cos(torch.pi * opening)) / 2
        return features * weight.to(features.dtype).repeat_interleave(self.features)

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, levels={self.levels}, features={self.features}, log2_table={self.log2_table}, "
            f"resolution={self.base_resolution}..{self.max_resolution:g}, dense_levels={self.dense_levels}, "
            f"tcnn={self._tcnn is not None}"
        )


class SHEncoding(nn.Module):
    """Real spherical harmonics of unit directions [..., 3] -> [..., degree^2] (degree 1..4 bands).

    tiny-cuda-nn's constants and signs (Condon-Shortley phase, orthonormal on the sphere);
    tcnn takes directions mapped to [0, 1]^3, this takes them unit length as they are.
    """

    def __init__(self, degree: int = 4):
        super().__init__()
        if not 1 <= degree <= 4:
            raise ValueError(f"SH degree must be 1..4, got {degree}")
        self.degree = degree

    @property
    def out_dim(self) -> int:
        return self.degree**2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        x, y, z = d.unbind(-1)
        out = [torch.full_like(x, 0.28209479177387814)]
        if self.degree > 1:
            out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
        if self.degree > 2:
            xy, yz, xz, x2, y2, z2 = x * y, y * z, x * z, x * x, y * y, z * z
            out += [
                1.0925484305920792 * xy,
                -1.0925484305920792 * yz,
                0.94617469575755997 * z2 - 0.31539156525251999,
                -1.0925484305920792 * xz,
                0.54627421529603959 * (x2 - y2),
            ]
        if self.degree > 3:
            out += [
                0.59004358992664352 * y * (y2 - 3 * x2),
                2.8906114426405538 * xy * z,
                0.45704579946446572 * y * (1 - 5 * z2),
                0.3731763325901154 * z * (5 * z2 - 3),
                0.45704579946446572 * x * (1 - 5 * z2),
                1.4453057213202769 * z * (x2 - y2),
                0.59004358992664352 * x * (3 * y2 - x2),
            ]
        return torch.stack(out, -1)


class FrequencyEncoding(Encoding):
    """NeRF's positional encoding: [x, sin(2^k x), cos(2^k x) for k < frequencies] per coordinate."""

    def __init__(self, dims: int, frequencies: int):
        super().__init__()
        self.dims, self.frequencies = dims, frequencies
        self.register_buffer("scales", 2.0 ** torch.arange(frequencies), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.dims * (1 + 2 * len(self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x[..., None] * self.scales).flatten(-2)
        return torch.cat([x, torch.sin(scaled), torch.cos(scaled)], -1)


class GaussianFourierEncoding(Encoding):
    """Random Fourier features (Tancik et al., NeurIPS 2020): [sin(2 pi B u), cos(2 pi B u)] for u in [0, 1]^D,
    B [features, D] drawn once from N(0, scale^2) with a fixed seed and kept as a buffer, so a saved run
    reloads to the same features. CAM's image experiments use 256 features at scale 10."""

    def __init__(self, dims: int, features: int = 256, scale: float = 10.0, seed: int = 0):
        super().__init__()
        self.dims = dims
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(features, dims, generator=generator) * (2 * math.pi * scale))

    @property
    def out_dim(self) -> int:
        return 2 * len(self.projection)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        phase = u @ self.projection.T
        return torch.cat([torch.sin(phase), torch.cos(phase)], -1)


class MLP(nn.Module):
    """in_dim -> `layers` hidden layers of width `hidden` -> out_dim (no output activation; out_dim None:
    the last hidden activation, a trunk).

    activation: "relu", or "softplus" (beta 100, NeuS's smooth ReLU). sine: [lo, hi] replaces the first
    hidden layer's activation by NeuRBF's composition h + sin(h * m0), m0 log-spaced over the units. skip:
    the input joins again before that hidden layer (NeRF's). `modulation` (CAM, fields.cam) scales and
    shifts every hidden layer's pre-activation by values read at the query's coordinate, given as `at`.
    """

    def __init__(self, in_dim: int, out_dim: int | None, hidden: int = 64, layers: int = 1, activation: str = "relu",
                 sine: tuple[float, float] | list[float] | None = None, skip: int | None = None):
        super().__init__()
        if activation not in ("relu", "softplus"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation, self.skip = activation, skip
        widths = [in_dim] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a + (in_dim if i == skip else 0), b)
                                    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        self.out = nn.Linear(widths[-1], out_dim) if out_dim is not None else None
        m0 = None if sine is None else torch.exp2(torch.linspace(math.log2(sine[0]), math.log2(sine[1]), hidden))
        self.register_buffer("m0", m0, persistent=False)
        self.modulation: nn.Module | None = None

    def forward(self, x: torch.Tensor, at=None) -> torch.Tensor:
        gammas = betas = None
        if self.modulation is not None:
            gammas, betas = self.modulation(at, len(x))
        h = x
        for i, layer in enumerate(self.hidden):
            h = layer(torch.cat([h, x], -1) if i == self.skip else h)
            if gammas is not None:
                h = self.modulation.modulate(h, gammas[i], betas[i])
            if i == 0 and self.m0 is not None:
                h = h + torch.sin(h * self.m0)
            elif self.activation == "relu":
                h = F.relu(h)
            else:
                h = F.softplus(h, beta=100)
        return self.out(h) if self.out is not None else h


class _TruncExp(torch.autograd.Function):
    # Under CUDA autocast the input arrives fp16, where exp overflows beyond ~11: compute in fp32.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x), with the gradient of exp(min(x, 15)): instant-ngp's density activation, whose
    clamped backward keeps a few huge densities from blowing up the update."""
    return _TruncExp.apply(x)
