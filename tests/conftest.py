"""Shared fixtures. The backend under test comes from DEQREF_BACKEND (numpy by default;
on a GPU machine run the suite with DEQREF_BACKEND=cupy)."""
import numpy as np
import pytest

from deqref.backend import get_backend, set_backend, to_numpy


@pytest.fixture(autouse=True)
def _backend_unchanged():
    """A test must leave the active backend as it found it: one that switched it for good would
    run every later test on another backend and hide failures of the DEQREF_BACKEND run."""
    before = get_backend().name
    yield
    after = get_backend().name
    if after != before:
        set_backend(before)
        pytest.fail(f"the test left the backend {after!r}; it was {before!r}")


@pytest.fixture
def be():
    return get_backend()


@pytest.fixture
def arr(be):
    """Move a NumPy array to the backend under test (float64 unless told)."""
    return lambda a, dtype="float64": be.asarray(np.asarray(a), dtype)


def host(a):
    return np.asarray(to_numpy(a), dtype=np.float64)
