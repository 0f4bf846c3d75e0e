"""The field interface every backend implements.

A field answers point queries in the scene's unit frame. It declares what it outputs
(`outputs`), so renderers, the viewer and exporters ask instead of assuming. Renderers
never see the field itself: the app hands them `density_fn` / `field_fn` closures, as
nerfacc does, so one renderer serves density and SDF fields alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recon.fields.cam import Modulation
from recon.fields.encodings import MLP

if TYPE_CHECKING:
    from recon.fields.encodings import Encoding


def inside_unit_box(u: torch.Tensor) -> torch.Tensor:
    """[N] whether each normalised position u [N, D] (`Field.normalize`) lies in the field's box, [0, 1]^D."""
    return ((u >= 0) & (u <= 1)).all(-1)


class Field(nn.Module):
    """Base class of all fields.

    Subclasses set `outputs` and implement `forward`, plus `density` (radiance fields) or
    `sdf` (SDF fields). `fields.build_field` records the options that rebuild a field (`options`),
    which the run folder stores next to its weights.
    """

    name: str = "field"
    outputs: frozenset[str] = frozenset()
    options: dict[str, Any] = {}  # what rebuilds it with fields.build_field (set there)
    # Option defaults per machine preset ("cpu", "gpu"), under what the user sets (FitConfig.resolved).
    presets: dict[str, dict[str, Any]] = {}
    # The integer option that sets the backend's size, per task (fields.options_for_budget).
    size_option: dict[str, str] = {}
    # The MLP that decodes this backend's encoding in the coordinate tasks (images, SDFs): instant-ngp's.
    coordinate_decoder: dict[str, Any] = {"hidden": 64, "layers": 2}

    # What the backend can do, declared for the callers that depend on it:
    # - bounded: of finite extent at uniform resolution (dense grids, planes): in an unbounded scene it reads
    #   contracted space (set_contraction); the hash grid instead spans instant-ngp's cascaded box.
    bounded: bool = False
    # - smooth_gradient: autograd's d/dx is smooth (an MLP of the coordinates), so a surface takes its normals
    #   and eikonal term that way; grids interpolate, piecewise constant gradients: central differences instead.
    smooth_gradient: bool = False
    # - grows: its parameters change shape while training (`grow`: DVGO's, TensoRF's upscales), so parameter
    #   counts are taken grown and the trainer rebuilds its optimiser.
    grows: bool = False

    def __init__(self, aabb: torch.Tensor):
        super().__init__()
        # The box, in the unit frame, that the field's encoding covers ([2, D]: min, max; D = 3 but for images).
        self.register_buffer("aabb", torch.as_tensor(aabb, dtype=torch.float32).reshape(2, -1).clone())
        self.quantize_relative = 0.0  # CQ-NIR cell size / object radius; 0: positions used as they are
        self.quantize_cell = 0.0  # the same cell in the unit frame
        # The inner box [2, D] outside which space is contracted (None: not contracted). Not state: the
        # pipeline records it with the field's options.
        self.register_buffer("contraction", None, persistent=False)
        self.cam: dict[str, Any] | None = None  # CAM's settings once enable_cam added its grids

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query positions x [N, 3] with unit view directions d [N, 3].

        Returns a dict with (at least) every name in `outputs`: "density" [N] (>= 0) or
        "sdf" [N], and "rgb" [N, 3] in [0, 1].
        """
        raise NotImplementedError

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density [N] at positions x [N, 3], without the colour branch (occupancy, export)."""
        raise NotImplementedError(f"{type(self).__name__} has no density output")

    def intervals(self, x: torch.Tensor, d: torch.Tensor, dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a renderer asks of intervals with midpoints x [S, 3], unit directions d [S, 3] and lengths dt [S]:
        "tau", their optical depth [S], and "rgb" [S, 3], plus whatever else the field computes on the way that
        its losses need (a surface's gradients). A density field's optical depth is sigma * dt."""
        out = self(x, d)
        return {"tau": out["density"].float() * dt, "rgb": out["rgb"].float()}

    def occupancy_density(self, x: torch.Tensor, step: float) -> torch.Tensor:
        """A density [N] whose product with `step` is the optical depth the occupancy grid weighs at x [N, 3]."""
        return self.density(x).float()

    def gradient(self, x: torch.Tensor, output: str = "density") -> torch.Tensor:
        """d output / d x [N, 3] by autograd; works under torch.no_grad() too.

        Backends whose interpolation gradient is poor (piecewise constant per cell) may
        override this with finite differences.
        """
        create_graph = torch.is_grad_enabled() and self.training  # the caller's mode, before enable_grad
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = getattr(self, output)(x)
            (grad,) = torch.autograd.grad(y.sum(), x, create_graph=create_graph)
        return grad

    def set_quantization(self, relative_cell: float) -> None:
        """Quantized coordinates (CQ-NIR, ICCV 2023): every position snaps to the centre of its cell in a
        fine grid before it is encoded, with cells `relative_cell` times the object radius, taken as half
        the box's longest side (the paper: 25,600 cells over NeuS's [-2.5, 2.5] for a unit-radius object,
        about 2e-4). 0 turns it off."""
        self.quantize_relative = float(relative_cell)
        self.quantize_cell = self.quantize_relative * float((self.aabb[1] - self.aabb[0]).max()) / 2

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x snapped to its cell's centre, floor(x / cell) * cell + cell / 2. The snap passes the gradient
        straight through, so d/dx of a field is its analytic gradient at the snapped point, as CQ-NIR takes
        it (autograd of the un-quantized function, evaluated at the lattice point)."""
        if not self.quantize_cell:
            return x
        snapped = (torch.floor(x / self.quantize_cell) + 0.5) * self.quantize_cell
        return x + (snapped - x).detach()

    @classmethod
    def decoder_defaults(cls, task: str) -> dict[str, Any]:
        """The coordinate decoder's options for `task` ("image" or "sdf")."""
        return dict(cls.coordinate_decoder)

    @classmethod
    def coordinate_encoding(cls, extent: list[float], finest: float, **options: Any) -> "Encoding":
        """This backend's encoding for the coordinate tasks, over a box of side lengths `extent` (2 or 3 of
        them) whose finest detail is `finest` cells along its longest side (fields.coordinate)."""
        raise NotImplementedError(f"{cls.name} has no coordinate encoding")

    @classmethod
    def has_coordinate_encoding(cls) -> bool:
        """Whether the backend serves the coordinate tasks (images, SDFs, surfaces): it defines its encoding."""
        return cls.coordinate_encoding.__func__ is not Field.coordinate_encoding.__func__

    def set_contraction(self, inner: torch.Tensor | None) -> None:
        """Contract space outside the box `inner` [2, D] (unbounded scenes): nerfacto's L-infinity form of
        mip-NeRF 360's contraction, y -> (2 - 1 / |y|_inf) y / |y|_inf for |y|_inf > 1 in coordinates where
        `inner` is [-1, 1]^D, so all of space lands in twice the inner box, which the encoding then covers."""
        self.contraction = None if inner is None else torch.as_tensor(inner, dtype=torch.float32).to(self.aabb.device)  # type: ignore[assignment]

    def _contract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x in the contracted frame, and the box (lo, hi) it lies in."""
        if self.contraction is None:
            return x, self.aabb[0], self.aabb[1]
        inner = self.contraction
        centre, half = inner.mean(0), (inner[1] - inner[0]) / 2
        y = (x - centre) / half
        norm = y.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        y = torch.where(norm > 1, (2 - 1 / norm) * y / norm, y)
        return centre + y * half, centre - 2 * half, centre + 2 * half

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Positions in the unit frame -> [0, 1]^D over the field's box (quantized first, then contracted in
        an unbounded scene): every backend reads positions through here, so both apply to all of them."""
        x, lo, hi = self._contract(self.quantize(x))
        return (x - lo) / (hi - lo)

    def cam_targets(self) -> list[MLP]:
        """The MLPs CAM modulates: all of the field's (a backend may keep some out, as NeRF's colour branch)."""
        return [m for m in self.modules() if isinstance(m, MLP)]

    def enable_cam(self, kind: str, resolution: int | None = None, bits: int | None = None,
                   normalize: bool | None = None) -> None:
        """Coordinate-aware modulation (fields.cam) on every hidden layer of `cam_targets()`; normalize None:
        as the paper's variant for that coordinate."""
        for mlp in self.cam_targets():
            mlp.modulation = Modulation(kind, len(mlp.hidden), resolution, bits, normalize).to(self.aabb.device)
        self.cam = {"kind": kind, "resolution": resolution, "bits": bits, "normalize": normalize}

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """`param_groups`, with CAM's grids split out at their factor (fields.cam.LR_FACTOR) times the rate
        of the MLP they modulate, at most Modulation.lr_cap times the base rate `lr`."""
        groups = self.param_groups(lr)
        factor = {id(p): m.lr_factor for m in self.modules() if isinstance(m, Modulation) for p in m.parameters()}
        if not factor:
            return groups
        out = []
        for group in groups:
            own = [p for p in group["params"] if id(p) not in factor]
            grids = [p for p in group["params"] if id(p) in factor]
            out += [{**group, "params": own}] if own else []
            if grids:
                out.append({**group, "name": f"{group['name']}-cam", "params": grids,
                            "lr": min(factor[id(grids[0])] * group["lr"], Modulation.lr_cap * lr), "weight_decay": 0.0})
        return out

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups, each with a "name", its own "lr" and "weight_decay".

        The default puts everything in one group; backends separate grids (no weight decay,
        often a higher lr) from MLPs (weight decay, as instant-ngp).
        """
        return [{"name": "all", "params": list(self.parameters()), "lr": lr, "weight_decay": 0.0}]

    def grow(self, progress: float) -> bool:
        """Change the parameters' shapes as progress in [0, 1] passes milestones (DVGO's and TensoRF's
        upscaling); True when they were replaced."""
        return False

    def update(self, progress: float) -> bool:
        """Called before every training step: `grow`, and whatever else a field does at a point of progress
        (NeuRBF places its kernels). True when parameters changed; the trainer then rebuilds its optimiser."""
        return self.grow(progress)

    def regularization(self) -> torch.Tensor | None:
        """A loss term the field adds to the photometric loss (total variation, L1), or None."""
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
