"""Building blocks of adaptive radial basis functions (NeuRBF): the exact k-nearest-kernel lookup and
weighted k-means.

`NearestKernels` answers "which k kernel centres are nearest to x" on the device the centres live on:
on a CPU with scipy's KD-tree (NeuRBF itself queries a KD-tree); on a GPU with a uniform grid of
candidate lists in torch: a cell C (centre c, half-diagonal h) lists every centre within d_k(c) + 2h of
c, where d_k(c) is the distance from c to its k-th nearest centre. For x in C, d_k(x) <= d_k(c) + h
(the k-th nearest distance is 1-Lipschitz), so each of x's k nearest lies within d_k(x) + h <= d_k(c) +
2h of c: the list holds them all and the answer is exact. Clustered centres make long lists, which a GPU
absorbs and a CPU would not; recon.cuda's kernel scans a point's list in one thread. `nearest_brute_force` is
the test oracle of all three.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recon.cuda import ops

CHUNK = 2**24  # distances computed at once (bounds memory)


def nearest_brute_force(points: Tensor, centres: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices [N, k] int64, squared distances [N, k]) of each point's k nearest centres, nearest first."""
    k = min(k, len(centres))
    index, distance = [], []
    for part in points.split(max(1, CHUNK // max(len(centres), 1))):
        d2 = torch.cdist(part, centres).square()
        values, idx = d2.topk(k, dim=1, largest=False)
        index.append(idx)
        distance.append(values)
    if not index:
        return points.new_zeros(0, k, dtype=torch.long), points.new_zeros(0, k)
    return torch.cat(index), torch.cat(distance)


class NearestKernels:
    """Exact k nearest centres [K, D] of points in [0, 1]^D: a KD-tree for CPU centres, candidate lists on a
    uniform grid for GPU ones (`method` forces one: "tree" or "grid"). Built once per set of centres."""

    def __init__(self, centres: Tensor, k: int, method: str | None = None):
        method = method or ("grid" if centres.is_cuda else "tree")
        self.k = min(k, len(centres))
        self.index = CellLists(centres, self.k) if method == "grid" else KDTree(centres, self.k)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(indices [N, k] int64, squared distances [N, k]), nearest first: equal to `nearest_brute_force`."""
        return self.index.query(points)


class KDTree:
    def __init__(self, centres: Tensor, k: int):
        from scipy.spatial import cKDTree

        self.centres, self.k = centres, k
        self.tree = cKDTree(centres.detach().double().cpu().numpy())

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        _, index = self.tree.query(points.detach().double().cpu().numpy(), k=self.k, workers=-1)
        index = torch.from_numpy(index.reshape(len(points), self.k)).to(points.device)
        # Distances recomputed in the points' precision, as the grid and the brute force compute them.
        return index, (points[:, None] - self.centres[index]).square().sum(-1)


class CellLists:
    """The uniform grid of candidate lists (module docstring), about one centre per cell."""

    def __init__(self, centres: Tensor, k: int, resolution: int | None = None):
        self.centres, self.k = centres, k
        dims = centres.shape[1]
        self.resolution = resolution or max(1, round(len(centres) ** (1 / dims)))
        r = self.resolution
        ticks = (torch.arange(r, device=centres.device, dtype=centres.dtype) + 0.5) / r
        cell_centres = torch.stack(torch.meshgrid(*[ticks] * dims, indexing="ij"), -1).reshape(-1, dims)
        half_diagonal = math.sqrt(dims) / (2 * r)
        kth = nearest_brute_force(cell_centres, centres, self.k)[1][:, -1].sqrt()
        radius = kth + 2 * half_diagonal + 1e-6  # the margin absorbs rounding in the distances
        lists = []
        for cells, reach in zip(cell_centres.split(max(1, CHUNK // len(centres))),
                                radius.split(max(1, CHUNK // len(centres)))):
            within = torch.cdist(cells, centres) <= reach[:, None]
            lists.append(within)
        within = torch.cat(lists)  # [cells, K] bool
        counts = within.sum(1)
        self.width = int(counts.max())
        # Each row: its centres first (ascending), then padding with -1.
        order = torch.argsort((~within).to(torch.int8), dim=1, stable=True)[:, : self.width]
        self.candidates = torch.where(torch.arange(self.width, device=centres.device) < counts[:, None], order, -1)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(indices [N, k] int64, squared distances [N, k]), nearest first: equal to `nearest_brute_force`.
        Each point's cell's list is scanned for its k nearest (recon.cuda.ops.nearest)."""
        return ops.nearest(points, self.centres, self.candidates, self.resolution, self.k)


def weighted_kmeans(points: Tensor, weights: Tensor, clusters: int, iterations: int = 10,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lloyd's algorithm with point weights, as NeuRBF's initialisation: centres seeded by sampling points
    with probability proportional to their weight, then `iterations` rounds of nearest-centre assignment
    and weighted means; a cluster left empty keeps its centre. Returns (centres [clusters, D], and the
    points, weights and final assignment that took part)."""
    weights = weights.to(points.dtype)
    if int((weights > 0).sum()) >= clusters:  # as NeuRBF, only points of positive weight take part
        keep = weights > 0
        points, weights = points[keep], weights[keep]
    else:  # too few to seed from: let every point count a little
        weights = weights + 1e-12 * weights.max().clamp(min=1)
    # Weighted sampling without replacement (Efraimidis & Spirakis: the largest log(u) / w), for any count.
    keys = torch.rand(len(points), generator=generator, dtype=torch.float64).log().to(points.device) / weights.double()
    seeds = keys.topk(min(clusters, len(points))).indices
    if len(seeds) < clusters:  # fewer points than clusters: the rest start on points again (and stay empty)
        seeds = seeds[torch.arange(clusters, device=seeds.device) % len(seeds)]
    centres = points[seeds].clone()
    assignment = torch.zeros(len(points), dtype=torch.long, device=points.device)
    for _ in range(iterations + 1):
        assignment = NearestKernels(centres, 1).query(points)[0][:, 0]
        if _ == iterations:
            break
        mass = torch.zeros(clusters, device=points.device, dtype=points.dtype).index_add_(0, assignment, weights)
        moment = torch.zeros_like(centres).index_add_(0, assignment, weights[:, None] * points)
        centres = torch.where(mass[:, None] > 0, moment / mass.clamp(min=1e-30)[:, None], centres)
    return centres, points, weights, assignment
