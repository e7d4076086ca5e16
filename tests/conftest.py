"""Shared fixtures. The backend under test comes from DEQREF_BACKEND (numpy by default;
on a GPU machine run the suite with DEQREF_BACKEND=cupy)."""
import numpy as np
import pytest

from deqref.backend import get_backend, to_numpy


@pytest.fixture
def be():
    return get_backend()


@pytest.fixture
def arr(be):
    """Move a NumPy array to the backend under test (float64 unless told)."""
    return lambda a, dtype="float64": be.asarray(np.asarray(a), dtype)


def host(a):
    return np.asarray(to_numpy(a), dtype=np.float64)
