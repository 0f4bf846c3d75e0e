import pytest

from recon.data.synthetic import make_scene


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory):
    """A small scene rendered by the independent numpy sphere tracer (not by recon)."""
    return make_scene(tmp_path_factory.mktemp("scene"), resolution=48, n_train=40, n_test=4, seed=0)
