"""CUDA kernels and their loader (issue 8).

Each kernel will sit beside its pure-torch twin in `renderers/` or `fields/`, share its
signature, and be tested against it. Until then every operation runs on its torch twin,
which is also what runs on CPU.
"""
