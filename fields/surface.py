"""Surfaces from posed images (NeuS, Wang et al. 2021): an SDF field rendered by volume rendering, on any
backend.

- Geometry: the backend's 3D coordinate encoding and the sphere-initialised SDF decoder of
  `fields.coordinate` (so an untrained field is the SDF of a sphere of radius 0.5, grid features
  starting blind), which also outputs a 15-channel geometry feature (NeuS2's size).
- Colour: NeuS's rendering network, from the position, the normal, the view direction (degree-4 SH) and
  the geometry feature.
- Opacity: NeuS's unbiased estimate. For an interval of length dt whose midpoint has distance f and whose
  direction meets the gradient at cosine c, the distances at its ends are f -+ c' dt / 2 (c' = c annealed
  from -relu(-(c - 1) / 2)... as NeuS: -(relu(-c/2 + 1/2) (1 - a) + relu(-c) a), a the anneal ratio going
  0 -> 1 over the first sixth of training), and alpha = clip((Phi(s f_prev) - Phi(s f_next)) / Phi(s f_prev)),
  Phi the logistic CDF, s = exp(10 v) the learnable sharpness (v starts at 0.3, NeuS's init).
- Normals and the eikonal term need grad f at every sample. NeRF's MLP (`pe`) is smooth: autograd. The grid
  backbones interpolate, so their gradient is piecewise constant per cell and their Hessian is zero:
  central differences over the finest active cell instead (Neuralangelo), six more evaluations per sample.
  `gradient="analytic"|"numerical"` overrides. With quantized coordinates (CQ-NIR) both are taken at the
  snapped point: autograd through the straight-through snap, differences with a step of at least a cell.
- Coarse to fine (NeuS2, Neuralangelo): a hash grid starts with its 4 coarsest levels and opens one more
  every 5% of progress; the difference step follows its finest open level.
- Learning rates: the encoding trains at most at the base rate, as NeuS2's and Neuralangelo's grids do.
  DVGO's 10x rate for a dense grid, right for its radiance, collapsed the SDF from images to one sign
  everywhere (a fog, and no surface to mesh; at the base rate it trains: BENCHMARKS.md); TensoRF's
  factors (2x) come down with it.
- A data-adaptive encoding (NeuRBF) has no distances to place its kernels by, as it has when fitting a mesh:
  at 10% of progress they are placed once by 1 / |SDF| of the field learnt so far, at uniform points of the
  box (the radiance setting's pre-training, with the SDF setting's weights), then frozen.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon.fields.base import Field
from recon.fields.cam import CamQuery
from recon.fields.coordinate import CoordinateField
from recon.fields.encodings import MLP, SHEncoding

GEO_FEATURES = 15
VARIANCE_INIT = 0.3  # NeuS: s = exp(10 * 0.3) ~ 20 at the start
COS_ANNEAL_END = 1 / 6  # NeuS: 50k of 300k iterations
FIRST_LEVELS, LEVEL_EVERY = 4, 0.05
PLACE_KERNELS_AT, PLACEMENT_POINTS = 0.1, 2**18


def optical_depth(alpha: Tensor) -> Tensor:
    """tau = -log(1 - alpha), the optical depth of an interval of opacity alpha: what the renderer sums. alpha is
    clipped to [0, 1 - 1e-6], so an opaque interval keeps a finite depth (~13.8) and gradient."""
    return -torch.log1p(-alpha.clamp(0.0, 1.0 - 1e-6))


class SurfaceField(Field):
    """A NeuS SDF field over `aabb` from backend `backend`'s encoding; options as CoordinateField's (the
    encoding's and the SDF decoder's), plus the colour network's size and the gradient mode."""

    outputs = frozenset({"sdf", "rgb"})

    def __init__(self, aabb: Tensor, backend: str, color_hidden: int | None = None, color_layers: int | None = None,
                 gradient: str | None = None, **sdf_options: Any):
        super().__init__(aabb)
        self.name = backend
        self.geometry = CoordinateField(aabb, backend, "sdf", geo_features=GEO_FEATURES, **sdf_options)
        decoder = self.geometry.decoder_options
        color_hidden, color_layers = color_hidden or decoder["hidden"], color_layers or decoder["layers"]
        self.dir_encoding = SHEncoding(4)
        self.color_net = MLP(3 + 3 + self.dir_encoding.out_dim + GEO_FEATURES, 3, color_hidden, color_layers)
        self.variance = nn.Parameter(torch.tensor(VARIANCE_INIT))
        from recon.fields import REGISTRY

        self.gradient_mode = gradient or ("analytic" if REGISTRY[backend].smooth_gradient else "numerical")
        if self.gradient_mode not in ("analytic", "numerical"):
            raise ValueError(f"gradient must be 'analytic' or 'numerical', got {self.gradient_mode!r}")
        self.register_buffer("progress", torch.zeros(()))
        if self.encoding.adaptive:  # saved, so a resumed or reloaded run keeps its placement
            self.register_buffer("kernels_placed", torch.zeros((), dtype=torch.bool))
        self.bounded = self.geometry.bounded_backend

    # Quantization and contraction live on the geometry, which reads the positions.
    def set_quantization(self, relative_cell: float) -> None:
        super().set_quantization(relative_cell)
        self.geometry.set_quantization(relative_cell)

    def set_contraction(self, inner: Tensor | None) -> None:
        super().set_contraction(inner)
        self.geometry.set_contraction(inner)

    def _open_levels(self) -> None:
        """Coarse to fine: the hash grid's open levels follow the progress (a buffer, so reloads agree)."""
        encoding = self.encoding
        if encoding.coarse_to_fine:
            encoding.active_levels = min(encoding.levels, FIRST_LEVELS + int(float(self.progress) / LEVEL_EVERY))

    @property
    def sharpness(self) -> Tensor:
        return torch.exp(10 * self.variance).clamp(1e-6, 1e6)

    @property
    def encoding(self):
        return self.geometry.encoding

    def sdf(self, x: Tensor) -> Tensor:
        self._open_levels()
        return self.geometry.sdf(x)

    def difference_step(self) -> float:
        """The central-difference step: the finest open level's cell (a hash grid), else one in 2048 of the box."""
        extent = float((self.aabb[1] - self.aabb[0]).max())
        encoding = self.encoding
        if encoding.coarse_to_fine:
            level = encoding.active_levels - 1
            resolution = float(encoding.base_resolution * encoding.growth**level)
        else:
            resolution = 2048.0
        return max(extent / resolution, 2 * self.quantize_cell)

    def sdf_gradient(self, x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(sdf [N], geometry feature [N, 15], d sdf / d x [N, 3])."""
        self._open_levels()
        if self.gradient_mode == "numerical":
            sdf, features = self.geometry.sdf_and_features(x)
            h = self.difference_step()
            offsets = torch.eye(3, device=x.device) * h
            probes = torch.cat([x[:, None] + offsets, x[:, None] - offsets], 1).reshape(-1, 3)
            values = self.geometry.sdf(probes).view(len(x), 2, 3)
            return sdf, features, (values[:, 0] - values[:, 1]) / (2 * h)
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            sdf, features = self.geometry.sdf_and_features(x)
            (gradient,) = torch.autograd.grad(sdf.sum(), x, create_graph=create_graph)
        return sdf, features, gradient

    def gradient(self, x: Tensor, output: str = "sdf") -> Tensor:
        return self.sdf_gradient(x, create_graph=False)[2].detach()

    def color(self, x: Tensor, d: Tensor, normal: Tensor, features: Tensor) -> Tensor:
        u = self.geometry.normalize(x)
        inputs = torch.cat([u * 2 - 1, normal, self.dir_encoding(d), features], -1)
        return torch.sigmoid(self.color_net(inputs, CamQuery(u, d)))

    def forward(self, x: Tensor, d: Tensor) -> dict[str, Tensor]:
        sdf, features, gradient = self.sdf_gradient(x, create_graph=self.training and torch.is_grad_enabled())
        return {"sdf": sdf, "rgb": self.color(x, d, F.normalize(gradient, dim=-1), features)}

    def intervals(self, x: Tensor, d: Tensor, dt: Tensor) -> dict[str, Tensor]:
        """NeuS: each interval's optical depth from its opacity alpha (below), its colour, and "sdf" [S] and
        "sdf_gradient" [S, 3] at its midpoint (the eikonal term's, and distillation's)."""
        sdf, features, gradient = self.sdf_gradient(x, create_graph=self.training and torch.is_grad_enabled())
        anneal = min(1.0, float(self.progress) / COS_ANNEAL_END)
        cos = (d * gradient).sum(-1)
        cos = -(F.relu(-cos * 0.5 + 0.5) * (1 - anneal) + F.relu(-cos) * anneal)  # never positive: unbiased
        s = self.sharpness
        prev_cdf = torch.sigmoid((sdf - cos * dt / 2) * s)
        next_cdf = torch.sigmoid((sdf + cos * dt / 2) * s)
        alpha = (prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)
        rgb = self.color(x, d, F.normalize(gradient, dim=-1), features)
        return {"tau": optical_depth(alpha.float()), "rgb": rgb.float(), "sdf": sdf, "sdf_gradient": gradient}

    def occupancy_density(self, x: Tensor, step: float) -> Tensor:
        """A density [N] whose product with `step` is NeuS's optical depth over `step` at the current sharpness,
        for a ray along the gradient (the most opaque case): what the occupancy grid keeps or skips."""
        sdf = self.sdf(x)
        s = self.sharpness
        prev_cdf, next_cdf = torch.sigmoid((sdf + step / 2) * s), torch.sigmoid((sdf - step / 2) * s)
        return optical_depth(((prev_cdf - next_cdf) / prev_cdf.clamp(min=1e-5)).float()) / step

    def update(self, progress: float) -> bool:
        self.progress.fill_(progress)
        changed = self.geometry.grow(progress)
        if self.encoding.adaptive and not bool(self.kernels_placed) and progress >= PLACE_KERNELS_AT:
            self.place_kernels()
            changed = True  # the kernel features were reset: a fresh optimiser state for them
        return changed

    @torch.no_grad()
    def place_kernels(self, sdf_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        """NeuRBF's SDF initialisation, weights 1 / |SDF|, with the SDF learnt so far in place of the exact one
        (or `sdf_fn`'s: a distillation's teacher)."""
        generator = torch.Generator().manual_seed(0)  # a function of the model, so a resumed run agrees
        lo, hi = self.aabb[0], self.aabb[1]
        x = lo + torch.rand(PLACEMENT_POINTS, 3, generator=generator).to(lo.device) * (hi - lo)
        sdf = torch.cat([(sdf_fn or self.sdf)(chunk) for chunk in x.split(2**16)])
        self.geometry.adapt(x, 1 / (sdf.abs() + 1e-9), generator)
        self.kernels_placed.fill_(True)

    @property
    def grows(self) -> bool:
        return self.geometry.grows

    def grow(self, progress: float) -> bool:
        return self.geometry.grow(progress)

    def regularization(self) -> Tensor | None:
        return self.geometry.regularization()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = self.geometry.param_groups(lr)
        for group in groups:  # NeuS2 and Neuralangelo train grid and MLP at one rate
            if group["name"] == "encoding":
                group["lr"] = min(group["lr"], lr)
        mlp = next(g for g in groups if g["name"] == "mlp")
        mlp["params"] = mlp["params"] + list(self.color_net.parameters())
        return groups + [{"name": "sharpness", "params": [self.variance], "lr": lr, "weight_decay": 0.0}]


class SurfaceInBackground:
    """A surface inside its box and a density field around it, as NeRF++ splits an unbounded scene: each sample
    is answered by the field whose space holds it, so the background is never carved into the surface. Answers
    the renderer's two queries as one field does (`intervals`, `occupancy_density`)."""

    def __init__(self, surface: SurfaceField, background: Field):
        self.surface, self.background = surface, background

    def owned_by_surface(self, x: Tensor) -> Tensor:
        box = self.surface.aabb
        return ((x >= box[0]) & (x <= box[1])).all(-1)

    def intervals(self, x: Tensor, d: Tensor, dt: Tensor) -> dict[str, Tensor]:
        """As SurfaceField.intervals; "sdf" and "sdf_gradient" hold the surface's samples only."""
        inside = self.owned_by_surface(x)
        near = self.surface.intervals(x[inside], d[inside], dt[inside])
        far = self.background.intervals(x[~inside], d[~inside], dt[~inside])
        tau, rgb = x.new_zeros(len(x)), x.new_zeros(len(x), 3)
        tau[inside], rgb[inside] = near["tau"], near["rgb"]
        tau[~inside], rgb[~inside] = far["tau"], far["rgb"]
        return {"tau": tau, "rgb": rgb, "sdf": near["sdf"], "sdf_gradient": near["sdf_gradient"]}

    def occupancy_density(self, x: Tensor, step: float) -> Tensor:
        inside = self.owned_by_surface(x)
        density = x.new_zeros(len(x))
        density[inside] = self.surface.occupancy_density(x[inside], step)
        density[~inside] = self.background.occupancy_density(x[~inside], step)
        return density
