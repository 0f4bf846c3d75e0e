"""Benchmark: the hash grid over instant-ngp's cascaded box (recon's default) or reading contracted space
(nerfacto's L-infinity contraction, as recon's bounded backends do), on an unbounded scene.

Runs `recon fit` with the given arguments once, the hash grid contracted: the class's `bounded` flag is what
makes a pipeline contract a backend (app.pipeline.Pipeline.build), so this flips it for the run. Compare with
the same command run plainly.

    python bench/contraction.py ../shared/data/fox --downscale 4 --max-time 240 --eval-stride 3 --no-viewer \
        --out runs/fox-contracted
"""

from __future__ import annotations

import sys

from recon.app.cli import main
from recon.fields.hashgrid import HashGridField

if __name__ == "__main__":
    HashGridField.bounded = True
    sys.exit(main(["fit", *sys.argv[1:]]))
