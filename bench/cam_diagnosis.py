"""CAM's image grids at a learning-rate factor set by hand (fields.cam.LR_FACTOR, which the CLI does not
expose); everything after it goes to `recon fit` as it is (the layer norm: `--cam-norm / --no-cam-norm`).

    python bench/cam_diagnosis.py FACTOR IMAGE --field hashgrid --cam [--no-cam-norm] --out RUN [recon fit options]

FACTOR is the grids' rate over the modulated MLP's; above 1 the cap at the base rate is lifted too, to
reproduce the uncapped rate (10 beside a grid's decoder at 1e-2: 0.1).
"""

import sys

import recon.fields.cam as cam
from recon.app.cli import main

factor, fit_args = float(sys.argv[1]), sys.argv[2:]
cam.LR_FACTOR["plane"] = factor
if factor > 1:
    cam.Modulation.lr_cap = float("inf")
sys.argv = ["recon", "fit", *fit_args, "--overwrite", "--no-viewer"]
main()
