"""Why CAM on a grid's decoder lost 2.3 dB on a photo: the hash grid + plane CAM with the grids' learning-rate
factor and normalisation set by hand (fields.cam.LR_FACTOR / NORMALIZED, which the CLI does not expose).

    python bench/cam_diagnosis.py FACTOR on|off RUN [IMAGE]

FACTOR 10 gives the grids 0.1 beside the decoder's 1e-2 (before the cap at the base rate), 1 gives 1e-2.
"""

import sys

import recon.fields.cam as cam
from recon.app.cli import main

factor, normalize, run = float(sys.argv[1]), sys.argv[2] == "on", sys.argv[3]
image = sys.argv[4] if len(sys.argv) > 4 else "../shared/data/fox/images/0001.jpg"
cam.LR_FACTOR["plane"], cam.NORMALIZED["plane"] = factor, normalize
if factor > 1:  # undo the cap at the base rate, to reproduce the uncapped rate
    from recon.fields import base
    base.min = lambda rate, _cap: rate
sys.argv = ["recon", "fit", image, "--field", "hashgrid", "--params", "250000", "--quantize", "0", "--downscale", "2",
            "--steps", "1000", "--cam", "--out", run, "--overwrite", "--no-viewer"]
main()
