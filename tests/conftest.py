"""Test configuration: the simulator unless a GPU is explicitly requested.

On a machine without a GPU the backend is Numba's CUDA simulator. Set
``DEFTNUMBA_BACKEND=cuda`` to run the same suite on a real GPU.
"""

import json
import os
import secrets
import subprocess
import sys
import time
import zlib

os.environ.setdefault("DEFTNUMBA_QUIET", "1")
# One thread per BLAS/OpenMP pool (NumPy, torch, the notebooks' kernels and every
# subprocess inherit it): the tests use tiny arrays, and pytest-xdist already runs one
# worker per core. With the default (one thread per core in every worker) the pools
# oversubscribe the cores and spin: one torch gradcheck took 80 s of CPU instead of 12.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One random seed per test session, inherited by pytest-xdist workers through the
# environment; DEFTNUMBA_TEST_SEED=<n> replays a session's data exactly.
os.environ.setdefault("DEFTNUMBA_TEST_SEED", str(secrets.randbelow(2**31)))
SESSION_SEED = int(os.environ["DEFTNUMBA_TEST_SEED"])

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import deftnumba  # noqa: E402,F401  (selects the backend before anything imports numba.cuda)


def pytest_report_header(config):
    return f"deftnumba: backend={deftnumba.backend.NAME}; test data seed DEFTNUMBA_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def rng(request):
    """Fresh random data for every test and every session; replayable from the seed
    in the pytest header (``DEFTNUMBA_TEST_SEED``) plus the test's id."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


def _compile_audit() -> list:
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-m", "deftnumba", "ptx", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and ("libnvvm" in proc.stderr or "nvrtc" in proc.stderr.lower()
                                 and "not found" in proc.stderr.lower()):
        pytest.skip("NVVM/NVRTC not installed: pip install 'numba-cuda[cu13]'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def audit_reports(tmp_path_factory, request):
    """``python -m deftnumba ptx --json``'s reports: every registered kernel compiled for
    sm_90 once per test run, shared by every audit test. Under pytest-xdist the first
    worker to ask compiles and the others read its result (a lock file in the run's
    shared temporary folder), so the ~2 minutes of compilation are paid once, not per worker."""
    if not hasattr(request.config, "workerinput"):  # no xdist worker: this process compiles
        return _compile_audit()
    shared = tmp_path_factory.getbasetemp().parent
    result, lock = shared / "audit_reports.json", shared / "audit_reports.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another worker is compiling: wait for its result
            while lock.exists() and not result.exists():
                time.sleep(1)
            if result.exists():
                return json.loads(result.read_text())
            continue  # it failed (lock gone, no result): try ourselves
        try:
            if not result.exists():
                reports = _compile_audit()
                result.write_text(json.dumps(reports))
            return json.loads(result.read_text())
        finally:
            os.close(fd)
            if not result.exists():
                lock.unlink(missing_ok=True)
