"""recon: neural-field 3D reconstruction (radiance and SDF fields from posed images)."""

__version__ = "0.1.0"
