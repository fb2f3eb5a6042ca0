"""Test configuration: the simulator unless a GPU is explicitly requested.

On a machine without a GPU the backend is Numba's CUDA simulator. Set
``DEFTNUMBA_BACKEND=cuda`` to run the same suite on a real GPU.
"""

import os

os.environ.setdefault("DEFTNUMBA_QUIET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import deftnumba  # noqa: E402,F401  (selects the backend before anything imports numba.cuda)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures replay."""
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
