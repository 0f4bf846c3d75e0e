"""CAM's image grids with their learning-rate factor and layer norm set by hand (fields.cam.LR_FACTOR and
NORMALIZED, which the CLI does not expose); everything after them goes to `recon fit` as it is.

    python bench/cam_diagnosis.py FACTOR on|off IMAGE --field hashgrid --cam --out RUN [recon fit options]

FACTOR is the grids' rate over the modulated MLP's; above 1 the cap at the base rate is lifted too, to
reproduce the uncapped rate (10 beside a grid's decoder at 1e-2: 0.1).
"""

import sys

import recon.fields.cam as cam
from recon.app.cli import main

factor, normalize, fit_args = float(sys.argv[1]), sys.argv[2] == "on", sys.argv[3:]
cam.LR_FACTOR["plane"], cam.NORMALIZED["plane"] = factor, normalize
if factor > 1:
    cam.Modulation.lr_cap = float("inf")
sys.argv = ["recon", "fit", *fit_args, "--overwrite", "--no-viewer"]
main()
