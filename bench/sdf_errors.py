"""Where a fitted SDF gets the inside wrong: the sign of fresh uniform points against the mesh's exact distance.

    python bench/sdf_errors.py ../shared/data/meshes/armadillo.obj runs/bench/armadillo-vm-q0 [more runs]

Prints, per run, the fraction of points on the wrong side, how far from the surface those lie, and whether
they are outside points called inside or the reverse. IoU says how much is wrong; this says where.
"""

from __future__ import annotations

import argparse

import torch

from recon.app.cli_shared import load_run
from recon.data.targets import load_input, signed_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mesh")
    parser.add_argument("runs", nargs="+", help="runs of `recon fit MESH`")
    parser.add_argument("--points", type=int, default=2**18)
    parser.add_argument("--near", type=float, default=0.05, help="distance that counts as at the surface (unit box)")
    args = parser.parse_args()
    mesh = load_input(args.mesh)
    x = torch.rand(args.points, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1  # not the eval seed
    truth = signed_distance(mesh.vertices, mesh.faces, x)
    for run in args.runs:
        field = load_run(run)[2].field.eval()
        with torch.no_grad():
            sdf = torch.cat([field.sdf(p) for p in x.split(2**16)])
        wrong = (sdf < 0) != (truth < 0)
        far = (truth.abs()[wrong] > args.near).float().mean().item() if wrong.any() else 0.0
        print(f"{run}: {wrong.float().mean().item():.2%} wrong, {far:.0%} of them farther than {args.near:g}; "
              f"outside called inside {((sdf < 0) & (truth >= 0)).float().mean().item():.2%}, "
              f"inside called outside {((sdf >= 0) & (truth < 0)).float().mean().item():.2%}")


if __name__ == "__main__":
    main()
