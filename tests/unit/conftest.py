"""Fixtures of the unit tests (the session fixtures are in tests/conftest.py)."""
import pytest


@pytest.fixture(scope="module")
def backend(tiny_model_set, tiny_estimator):
    """recycle_router's in-process backend: the tiny model set's stages and estimator."""
    from comrecycle.router.inprocess import InProcessBackend

    return InProcessBackend.load(tiny_model_set, tiny_estimator)
