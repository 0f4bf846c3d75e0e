"""NeuRBF (Chen et al., "NeuRBF: A Neural Fields Representation with Adaptive Radial Basis Functions",
ICCV 2023), following its official code's choices.

Adaptive radial basis functions, each with a free centre c, a shape and a feature vector w, placed by
weighted k-means where the signal needs them, their centres and shapes then frozen. A query x takes
its k nearest kernels (by centre) and aggregates f(x) = sum_k w_k * g(phi_k(x)):

- kernels: the anisotropic inverse quadric phi = 1 / (1 + (x - c)^T S (x - c)), S a full symmetric
  matrix per kernel (images, radiance), or the separable tent phi = prod_j max(0, 1 - |x_j - c_j| s)
  the SDF setting uses; k = 4 (image), 8 (SDF), 5 (radiance);
- normalised by sum_k phi_k, the denominator detached (image, SDF; not radiance);
- multi-frequency sinusoidal composition g(phi) = sin(phi * m), m log-spaced over the feature channels
  (image: 32 in [2^-3, 2^12]; SDF: 16 in [1, 8]); radiance keeps g(phi) = phi (the paper found the
  gain small there);
- hybrid with a grid: the RBF features are concatenated with a hash grid's (image: 2 levels x 2
  features up to half the image; SDF: 16 levels x 1 feature up to 2048, 2^15 table), plus a learnable
  bias, and decoded by 3 x 64 layers whose first is sinusoidal, h + sin(h * m0) (image m0 in [10, 100];
  SDF [30, 300] on request, see `decoder_defaults`); for radiance they join TensoRF's appearance features
  (the `vm` backbone);
- initialisation: weighted k-means (10 Lloyd rounds, seeds drawn in proportion to weight) on
  points weighted by the image's Sobel gradient norm, by 1 / |SDF| at the SDF training points, or (for
  radiance, after a short grid-only pre-training) by alpha * |grad appearance feature| on a grid; each
  shape from its cluster's weighted covariance divided by 0.5 (0.3 for radiance), clipped, inverted;
- the kernel count fills a parameter budget: by default the parameters of the reference model the
  paper compares with (an instant-ngp grid, TensoRF's VM 16/48) minus the backbone's, at
  (features + D + shape values) per kernel; `kernels=N` sets it, and `--params` sets the kernel count
  (images, SDFs) or, for radiance, the resolution at which backbone plus kernels meet the budget.

Deviations, because recon has one renderer and one loop: the radiance backbone is recon's single-level
VM-split (NeuRBF: a 2-level VM with NRFF's ASG shading), the learning-rate schedule is recon's (NeuRBF:
cosine), and radiance pre-training lasts 1/30 of the run (NeuRBF: 1000 of 30k steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recon.fields import final_parameters, register
from recon.fields.encodings import Encoding, HashGridEncoding
from recon.fields.rbf import NearestKernels, weighted_kmeans
from recon.fields.vm import VectorMatrixField

KERNELS = ("ivq", "tent")
FEATURE_INIT = 1e-4  # features, bias and grid start uniform in +-1e-4 (NeuRBF's image and SDF code)
KMEANS_ITERATIONS = 10


def log_spaced(lo: float, hi: float, n: int) -> Tensor:
    return torch.exp2(torch.linspace(math.log2(lo), math.log2(hi), n))


class AdaptiveRBF(nn.Module):
    """`kernels` RBFs in D dimensions, each with a `features`-channel vector, over the box [0, size]^D.

    Centres [K, D] and shapes (the inverse covariance's upper triangle [K, D(D+1)/2] for "ivq", a
    scalar 1/width [K] for "tent") are parameters that never train (NeuRBF freezes them), so checkpoints
    and parameter counts include them. `frequencies`: the sinusoidal composition's m (None: phi itself).
    `cells`: the finest resolution along the longest side, which bounds the shapes (NeuRBF's clip).
    """

    def __init__(self, size: list[float], kernels: int, features: int, kernel: str = "ivq", neighbours: int = 4,
                 normalize: bool = True, frequencies: Tensor | None = None, shape_divisor: float = 0.5,
                 cells: float = 512, feature_init: float = FEATURE_INIT):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
        if frequencies is not None and len(frequencies) != features:
            raise ValueError("the sinusoidal composition needs one frequency per feature channel")
        dims = len(size)
        self.kernel, self.neighbours, self.normalize = kernel, neighbours, normalize
        self.shape_divisor, self.cells, self.feature_init = shape_divisor, cells, feature_init
        self.register_buffer("size", torch.tensor(size, dtype=torch.float32), persistent=False)
        self.register_buffer("frequencies", frequencies, persistent=False)
        rows, cols = torch.triu_indices(dims, dims)
        self.register_buffer("_tri", torch.stack([rows, cols]), persistent=False)
        # Until `adapt` places them: uniform centres, round kernels as wide as their spacing.
        centres = torch.rand(kernels, dims) * self.size
        spacing = (float(self.size.prod()) / max(kernels, 1)) ** (1 / dims)
        self.centres = nn.Parameter(centres, requires_grad=False)
        self.shapes = nn.Parameter(self._shapes_from_variance(torch.full((kernels, dims), spacing**2)),
                                   requires_grad=False)
        self.features = nn.Parameter(torch.empty(kernels, features).uniform_(-feature_init, feature_init))
        self._index: NearestKernels | None = None
        self._attached: Tensor | None = None  # a fixed point set (pixels, SDF samples) ...
        self._attached_neighbours: Tensor | None = None  # ... and its kernels, found once

    @property
    def out_dim(self) -> int:
        return self.features.shape[1]

    def _shapes_from_variance(self, variance: Tensor, covariance: Tensor | None = None) -> Tensor:
        """Shapes from per-axis variances [K, D] (and, for "ivq", full covariances [K, D, D]), clipped as
        NeuRBF clips them: each axis's width within [1/200 of a finest cell, 1/10 of the box]."""
        lo, hi = (self.size / self.cells / 2 / 100) ** 2, (self.size / 10) ** 2
        if self.kernel == "tent":
            # A tent of half-width r has variance r^2 / 6 per axis; NeuRBF takes 4 x the mean squared
            # distance summed over axes as its squared width.
            width2 = (4 * variance.sum(-1)).clamp(float(lo.max()), float(hi.min()))
            return 1 / width2.sqrt()
        dims = variance.shape[1]
        if covariance is None:
            covariance = torch.diag_embed(variance)
        diagonal = covariance.diagonal(dim1=-2, dim2=-1).clamp(lo, hi)
        bound = 0.999 * (diagonal[:, :, None] * diagonal[:, None, :]).sqrt()
        covariance = torch.maximum(torch.minimum(covariance, bound), -bound)
        covariance = covariance * (1 - torch.eye(dims, device=covariance.device)) + torch.diag_embed(diagonal)
        inverse = torch.linalg.inv(covariance.double()).float()
        return inverse[:, self._tri[0], self._tri[1]]

    def inverse_covariance(self, shapes: Tensor) -> Tensor:
        """[..., D(D+1)/2] upper triangles -> [..., D, D] symmetric matrices."""
        dims = self.centres.shape[1]
        full = shapes.new_zeros(*shapes.shape[:-1], dims, dims)
        full[..., self._tri[0], self._tri[1]] = shapes
        full[..., self._tri[1], self._tri[0]] = shapes
        return full

    @torch.no_grad()
    def adapt(self, points: Tensor, weights: Tensor, generator: torch.Generator | None = None) -> None:
        """Place the kernels: weighted k-means on `points` [N, D] (in [0, size]), shapes from each cluster's
        weighted covariance / shape_divisor; features reset."""
        kernels = len(self.centres)
        centres, points, weights, label = weighted_kmeans(points, weights, kernels, KMEANS_ITERATIONS, generator)
        offset = points - centres[label]
        mass = torch.zeros(kernels, device=points.device).index_add_(0, label, weights).clamp(min=1e-30)[:, None]
        variance = torch.zeros_like(centres).index_add_(0, label, weights[:, None] * offset**2) / mass
        covariance = None
        if self.kernel == "ivq":
            outer = (offset[:, :, None] * offset[:, None, :]).flatten(1)
            covariance = (torch.zeros(kernels, outer.shape[1], device=points.device)
                          .index_add_(0, label, weights[:, None] * outer) / mass).view(kernels, *offset.shape[1:] * 2)
            covariance = covariance / self.shape_divisor
        self.centres.copy_(centres)
        self.shapes.copy_(self._shapes_from_variance(variance / self.shape_divisor, covariance))
        self.features.uniform_(-self.feature_init, self.feature_init)
        self._index = self._attached_neighbours = None

    def attach(self, points: Tensor | None) -> None:
        """Remember a fixed point set, so `forward(point_ids=...)` looks its kernels up once (NeuRBF's
        per-pixel / per-sample kernel index)."""
        self._attached, self._attached_neighbours = points, None

    def nearest(self, points: Tensor, point_ids: Tensor | None = None) -> Tensor:
        """[N, k] indices of each point's nearest kernels."""
        if self._index is None:
            self._index = NearestKernels(self.centres.detach(), self.neighbours)
        if point_ids is None:
            return self._index.query(points)[0]
        if self._attached_neighbours is None:
            self._attached_neighbours = self._index.query(self._attached)[0]
        return self._attached_neighbours[point_ids]

    def phi(self, points: Tensor, index: Tensor) -> Tensor:
        """Kernel values [N, k] at points [N, D] of kernels `index` [N, k]."""
        offset = points[:, None] - self.centres[index]  # [N, k, D]
        if self.kernel == "tent":
            return (1 - offset.abs() * self.shapes[index][..., None]).clamp(min=0).prod(-1)
        quadratic = torch.einsum("nkd,nkde,nke->nk", offset, self.inverse_covariance(self.shapes[index]), offset)
        return 1 / (1 + quadratic)

    def forward(self, points: Tensor, point_ids: Tensor | None = None) -> Tensor:
        """RBF features [N, features] of points [N, D] in [0, size] (point_ids: rows of the attached set)."""
        index = self.nearest(points, point_ids)
        phi = self.phi(points, index)
        if self.normalize:
            phi = phi / (phi.detach().sum(-1, keepdim=True) + 1e-8)
        basis = phi[..., None] if self.frequencies is None else torch.sin(phi[..., None] * self.frequencies)
        return (self.features[index] * basis).sum(1)

    def _apply(self, fn, recurse=True):  # moving devices invalidates the lookups built for the old one
        self._index = self._attached_neighbours = None
        if self._attached is not None:
            self._attached = fn(self._attached)
        return super()._apply(fn, recurse)


# The official image and SDF settings, by dimension count.
SETTINGS = {
    2: dict(kernel="ivq", neighbours=4, features=32, frequencies=(2**-3, 2**12), grid_levels=2, grid_features=2,
            log2_table=24, lr_scale=0.5),
    3: dict(kernel="tent", neighbours=8, features=16, frequencies=(1.0, 8.0), grid_levels=16, grid_features=1,
            log2_table=15, lr_scale=1.0),
}


class NeuRBFEncoding(Encoding):
    """Adaptive RBF features concatenated with a hash grid's, plus a learnable bias (image and SDF tasks).

    Kernels live in isotropic coordinates (the box's longest side 1), so a pixel is square to them.
    """

    adaptive = True

    def __init__(self, extent: list[float], finest: float, kernels: int, kernel: str, neighbours: int,
                 features: int, frequencies: tuple[float, float] | None, grid_levels: int, grid_features: int,
                 log2_table: int, grid_resolution: float, lr_scale: float, normalize: bool = True):
        super().__init__()
        self.dims, self.lr_scale = len(extent), lr_scale
        longest = max(extent)
        self.register_buffer("aspect", torch.tensor([e / longest for e in extent]), persistent=False)
        self.grid = HashGridEncoding(grid_levels, grid_features, log2_table, 16, grid_resolution, dims=self.dims)
        with torch.no_grad():
            self.grid.table.uniform_(-FEATURE_INIT, FEATURE_INIT)
        m = None if frequencies is None else log_spaced(*frequencies, features)
        self.rbf = AdaptiveRBF(self.aspect.tolist(), kernels, features, kernel, neighbours, normalize, m,
                               shape_divisor=0.5, cells=finest)
        self.bias = nn.Parameter(torch.empty(self.grid.out_dim + features).uniform_(-FEATURE_INIT, FEATURE_INIT))

    @property
    def out_dim(self) -> int:
        return self.grid.out_dim + self.rbf.out_dim

    def forward(self, u: Tensor, point_ids: Tensor | None = None) -> Tensor:
        return torch.cat([self.grid(u), self.rbf(u.clamp(0, 1) * self.aspect, point_ids)], -1) + self.bias

    def adapt(self, u: Tensor, weights: Tensor, generator: torch.Generator | None = None) -> None:
        self.rbf.adapt(u.clamp(0, 1) * self.aspect, weights, generator)

    def attach(self, u: Tensor | None) -> None:
        self.rbf.attach(None if u is None else u.clamp(0, 1) * self.aspect)


def reference_grid_parameters(dims: int, log2_table: int, resolution: float) -> int:
    """The instant-ngp grid NeuRBF sizes itself against: 16 levels x 2 features, the same table and finest level."""
    return HashGridEncoding(16, 2, log2_table, 16, resolution, dims=dims).table.numel()


def mlp_parameters(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


@register("neurbf")
class NeuRBFField(VectorMatrixField):
    """Radiance: TensoRF's VM-split with adaptive RBF features joining its appearance features.

    kernels: None fills the budget of TensoRF's VM with 16/48 components at the same resolution, so a
    parameter budget (`--params`, through num_voxels) keeps NeuRBF's split of backbone and kernels. The
    RBFs stay off (their features zero, no gradient) until progress `init_at`, when they are placed by
    weighted k-means on an `init_grid`^3 lattice weighted by alpha * |grad appearance| (the optimiser is
    then rebuilt, as at TensoRF's upscales).
    """

    presets = {"cpu": {"num_voxels_init": 64**3, "num_voxels": 128**3, "init_grid": 128}}
    # Radiance: the resolution, with the kernels filling TensoRF's budget at it (sizing by the kernel count
    # alone left one kernel once the CPU preset's backbone exceeded a 2M budget).
    size_option = {"radiance": "num_voxels", "image": "kernels", "sdf": "kernels"}
    coordinate_decoder = {"hidden": 64, "layers": 2}

    def __init__(self, aabb: Tensor, kernels: int | None = None, rbf_features: int = 32, neighbours: int = 5,
                 init_at: float = 1 / 30, init_grid: int = 512, density_components: int = 16,
                 appearance_components: int = 32, **vm_options: Any):
        backbone = {"density_components": density_components, "appearance_components": appearance_components,
                    **vm_options}
        super().__init__(aabb, extra_appearance=rbf_features, **backbone)
        if kernels is None:
            # TensoRF's 16 / 48 components at this resolution, minus this backbone (its own MLP included).
            reference = final_parameters("vm", aabb, num_voxels=self.density_factors.upscaling.final)
            kernels = max(1, (reference - final_parameters("vm", aabb, **backbone)) // (rbf_features + 3 + 6))
        self.init_at, self.init_grid = init_at, init_grid
        extent = (self.aabb[1] - self.aabb[0])
        self.register_buffer("aspect", extent / extent.max(), persistent=False)
        self.rbf = AdaptiveRBF(self.aspect.tolist(), kernels, rbf_features, "ivq", neighbours, normalize=False,
                               shape_divisor=0.3, cells=init_grid, feature_init=1e-6)
        self.register_buffer("rbf_ready", torch.zeros((), dtype=torch.bool))

    def _appearance(self, u: Tensor) -> Tensor:
        features = super()._appearance(u)
        if not bool(self.rbf_ready):
            return torch.cat([features, features.new_zeros(len(u), self.rbf.out_dim)], -1)
        return torch.cat([features, self.rbf(u * self.aspect)], -1)

    def update(self, progress: float) -> bool:
        changed = self.grow(progress)
        if not bool(self.rbf_ready) and progress >= self.init_at:
            self.place_kernels()
            changed = True
        return changed

    @torch.no_grad()
    def place_kernels(self, chunk: int = 2**16) -> None:
        """NeuRBF's radiance initialisation from the grid-only model trained so far."""
        r = self.init_grid
        shape = [max(2, round(r * float(a))) for a in self.aspect]
        ticks = [torch.linspace(0, 1, n, device=self.aabb.device) for n in shape]
        u = torch.stack(torch.meshgrid(*ticks, indexing="ij"), -1).reshape(-1, 3)
        sigma = torch.cat([self._density(p, torch.ones(len(p), dtype=torch.bool, device=p.device))
                           for p in u.split(chunk)])
        features = torch.cat([self.basis(self.appearance_factors(p)) for p in u.split(chunk)]).view(*shape, -1)
        lo, hi = features.amin((0, 1, 2)), features.amax((0, 1, 2))
        features = (features - lo) / (hi - lo).clamp(min=1e-12)  # min-max per channel over the volume
        gradient = torch.stack(torch.gradient(features, dim=(0, 1, 2)), -1)
        weights = (1 - torch.exp(-sigma)) * gradient.square().sum((-1, -2)).sqrt().view(-1)
        self.rbf.adapt(u * self.aspect, weights)
        self.rbf_ready.fill_(True)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, kernels: int | None = None,
                            kernel: str | None = None, neighbours: int | None = None, features: int | None = None,
                            frequencies: tuple[float, float] | None = None, grid_resolution: float | None = None,
                            normalize: bool = True) -> Encoding:
        dims = len(extent)
        s = dict(SETTINGS[dims])
        s.update({k: v for k, v in dict(kernel=kernel, neighbours=neighbours, features=features,
                                        frequencies=frequencies).items() if v is not None})
        grid_resolution = grid_resolution or (finest / 2 if dims == 2 else finest)
        if kernels is None:
            # Fill the reference: an instant-ngp grid (16 x 2 features, same table and finest level) and its
            # 3 x 64 MLP, minus this backbone, its bias and its MLP.
            out = 3 if dims == 2 else 1
            grid = HashGridEncoding(s["grid_levels"], s["grid_features"], s["log2_table"], 16, grid_resolution,
                                    dims=dims)
            width = grid.out_dim + s["features"]
            reference = (reference_grid_parameters(dims, s["log2_table"], grid_resolution)
                         + mlp_parameters([32, 64, 64, out]))
            own = grid.table.numel() + width + mlp_parameters([width, 64, 64, out])
            per_kernel = s["features"] + dims + (dims * (dims + 1) // 2 if s["kernel"] == "ivq" else 1)
            kernels = max(1, (reference - own) // per_kernel)
        lr_scale = s.pop("lr_scale")
        return NeuRBFEncoding(extent, finest, kernels, s.pop("kernel"), s.pop("neighbours"), s.pop("features"),
                              s.pop("frequencies"), grid_levels=s["grid_levels"], grid_features=s["grid_features"],
                              log2_table=s["log2_table"], grid_resolution=grid_resolution, lr_scale=lr_scale,
                              normalize=normalize)

    @classmethod
    def decoder_defaults(cls, task: str) -> dict[str, Any]:
        """Images: NeuRBF's 3 x 64 layers, the first sinusoidal, h + sin(h * m0), m0 log-spaced over [10, 100].
        SDFs: recon's sphere-initialised decoder, as every backend's. NeuRBF's own (`-o sine=[30,300]`, its
        first layer over [30, 300]) starts blind to inside and outside and learns them from the eighth of
        uniform points, which takes its 20k steps at lr 1e-4; in CPU-length runs it stays near IoU 0.5
        (BENCHMARKS.md), where geometric initialisation has the sign right from the first step."""
        return {**cls.coordinate_decoder, "sine": [10.0, 100.0] if task == "image" else None}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = super().param_groups(lr)
        # NeuRBF: 2e-2 for the RBF features, TensoRF's factor rate.
        groups.append({"name": "rbf", "params": [self.rbf.features], "lr": 2 * lr, "weight_decay": 0.0})
        return groups
