"""`python -m recon`, as torchrun starts each rank (`torchrun --nproc-per-node N -m recon fit SCENE`)."""

from recon.app.cli import main

main()
