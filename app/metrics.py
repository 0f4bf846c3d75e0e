"""Image metrics under recon's evaluation protocol (documented in the README).

Ground truth is composited on white and quantised to 8-bit sRGB; predictions are clipped
to [0, 1]. PSNR is computed per full image and averaged over images. SSIM uses an 11x11
Gaussian window with sigma 1.5 over each channel (valid region), as the NeRF literature.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recon.app.run import UserError

PROTOCOL = {
    "ground_truth": "RGBA composited on white, quantised to 8-bit sRGB",
    "prediction": "clipped to [0, 1], rendered on white",
    "psnr": "per full image, then the mean over images",
    "ssim": "11x11 Gaussian window, sigma 1.5, per channel, valid region, mean",
    "pixel_centres": "+0.5",
}


def ground_truth_on_white(image: torch.Tensor) -> torch.Tensor:
    """[H, W, 3|4] in [0, 1] -> [H, W, 3] composited on white and quantised to 8 bits."""
    rgb = image[..., :3]
    if image.shape[-1] == 4:
        alpha = image[..., 3:]
        rgb = rgb * alpha + (1.0 - alpha)
    return torch.round(rgb * 255.0) / 255.0


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    mse = torch.mean((pred.clamp(0, 1).double() - gt.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def ssim(pred: torch.Tensor, gt: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [H, W, C] images in [0, 1]; an image smaller than the window is scored with a window
    that fits it (the whole image, at a 1-pixel image)."""
    window = min(window, *pred.shape[:2])
    x = pred.clamp(0, 1).double().permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = gt.double().permute(2, 0, 1)[:, None]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(img: torch.Tensor) -> torch.Tensor:
        return F.conv2d(img, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


class Lpips:
    """LPIPS (AlexNet) where its weights are already on disk; recon never downloads them.

    `reason` says why it is unavailable; `__call__` takes [H, W, 3] images in [0, 1].
    """

    def __init__(self) -> None:
        self.model, self.reason = None, None
        if not any((Path(torch.hub.get_dir()) / "checkpoints").glob("alexnet-*.pth")):
            self.reason = "not computed: the AlexNet weights LPIPS needs are not on disk"
            return
        try:
            import lpips  # optional; its linear heads ship with the package

            self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as error:  # a missing package or a torchvision mismatch: record, never fail an eval
            self.reason = f"not computed: {type(error).__name__}: {error}".splitlines()[0]

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> float | None:
        if self.model is None:
            return None
        to_net = lambda img: img.clamp(0, 1).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
        with torch.no_grad():
            return self.model(to_net(pred).cpu(), to_net(gt).cpu()).item()


def mesh_distances(pred: Path, gt: Path, samples: int = 200_000, tau_fraction: float = 0.01, seed: int = 0) -> dict:
    """Chamfer distance and F-score of mesh `pred` against `gt` (files trimesh reads).

    Both surfaces are sampled area-weighted (`samples` points each, fixed seed); accuracy is the mean
    distance from pred's samples to gt's, completeness the reverse; Chamfer is their mean (unsquared).
    F-score at tau = tau_fraction x the ground truth's bounding-box diagonal: the harmonic mean of the
    fractions of each sample set within tau of the other.
    """
    # Imported here: every command loads this module, only eval-mesh needs these (~0.5 s).
    import trimesh
    from scipy.spatial import cKDTree

    meshes = []
    for path in (pred, gt):
        try:
            mesh = trimesh.load(path, force="mesh", process=False)
        except Exception as error:
            raise UserError(f"{path}: cannot read a mesh ({type(error).__name__}: {error})".splitlines()[0]) from None
        if len(mesh.faces) == 0:
            raise UserError(f"{path}: the mesh has no faces")
        meshes.append(mesh)
    points = [np.asarray(trimesh.sample.sample_surface(m, samples, seed=seed)[0]) for m in meshes]
    to_gt = cKDTree(points[1]).query(points[0])[0]
    to_pred = cKDTree(points[0]).query(points[1])[0]
    tau = tau_fraction * float(np.linalg.norm(meshes[1].bounds[1] - meshes[1].bounds[0]))
    precision, recall = float((to_gt < tau).mean()), float((to_pred < tau).mean())
    return {
        "pred": str(pred), "gt": str(gt), "samples": samples, "seed": seed,
        "accuracy": float(to_gt.mean()), "completeness": float(to_pred.mean()),
        "chamfer": float((to_gt.mean() + to_pred.mean()) / 2),
        "tau": tau, "tau_fraction": tau_fraction, "precision": precision, "recall": recall,
        "fscore": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
    }
