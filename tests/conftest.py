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
from pathlib import Path
from typing import NamedTuple

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


@pytest.fixture
def poison_allocations(monkeypatch):
    """``poison_allocations(ops_module)``: every array that module's ``_empty`` seam
    allocates (outputs, gradients, intermediates) starts NaN, so an element no kernel
    writes shows up in the result. Undone at the end of the test."""
    def poison(module):
        monkeypatch.setattr(module, "_empty", lambda xp, shape, dtype: xp.full(shape, np.nan, dtype=dtype))
    return poison


# --------------------------------------------------------------------------- compile jobs
# Some tests read what numba-cuda's real compiler makes of the kernels (no GPU needed:
# NVVM, nvJitLink and nvdisasm run on the CPU). Each such reading is one subprocess with
# the cuda backend, a "compile job". Compiling is minutes of CPU, so a test run starts
# every job it needs in the background as soon as the tests are collected, and runs the
# tests that read a job last: the workers keep running simulator tests while the jobs
# compile, and no worker sits idle waiting. Under pytest-xdist the first worker to ask
# starts a job and every worker reads its result from the run's shared temporary folder.
ROOT = Path(__file__).resolve().parents[1]
COMPILE_JOBS = {  # fixture name: command (the last line of its stdout is the JSON result)
    "job_audit_reports": [sys.executable, "-m", "deftnumba", "ptx", "--json"],
    "job_audit_targets": [sys.executable, "-c", "import json; from deftnumba.dcn import audit; "
                          "print(json.dumps(audit.target_figures()))"],
    "job_sass_kernels": [sys.executable, "-m", "tests.sass_kernels"],
    "job_lean_targets": [sys.executable, "-c", "import json; from deftnumba.lean import audit; "
                         "print(json.dumps(audit.target_figures()))"],
    "job_tucker_targets": [sys.executable, "-c", "import json; from deftnumba.tucker import audit; "
                           "print(json.dumps(audit.target_figures(audit.TARGET_SHAPES)))"],
}
_RUNNER = ("import os, subprocess, sys\n"
           "out, rc = sys.argv[1], sys.argv[2]\n"
           "with open(out, 'w') as o, open(out + '.err', 'w') as e:\n"
           "    code = subprocess.run(sys.argv[3:], stdout=o, stderr=e).returncode\n"
           "open(rc + '.tmp', 'w').write(str(code))\n"
           "os.replace(rc + '.tmp', rc)\n")


class JobResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        """The job's result: the last line of its stdout, as JSON."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    def figures(self):
        """The JSON of a job that compiles for sm_90: skipped where NVVM, nvJitLink or nvdisasm
        is missing, a failure (with the job's stderr) on any other error."""
        if self.returncode != 0 and any(s in self.stderr for s in ("libnvvm", "nvdisasm", "nvjitlink",
                                                                       "No module named 'cuda")):
            pytest.skip("needs NVVM, nvJitLink and nvdisasm: pip install 'numba-cuda[cu13]' nvidia-cuda-nvdisasm")
        assert self.returncode == 0, self.stderr[-3000:]
        return self.json()


def compiler_env() -> dict:
    """Environment of a compiling child: the cuda backend, this checkout on the path."""
    env = dict(os.environ, DEFTNUMBA_BACKEND="cuda", DEFTNUMBA_QUIET="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _job_folder(config) -> Path:
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base  # xdist: the run's shared folder


def start_job(config, name: str) -> None:
    """Start compile job ``name`` in the background unless this run already has."""
    folder = _job_folder(config)
    try:
        os.close(os.open(folder / f"{name}.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    subprocess.Popen([sys.executable, "-c", _RUNNER, str(folder / f"{name}.out"), str(folder / f"{name}.rc"),
                      *COMPILE_JOBS[name]], env=compiler_env(), cwd=ROOT, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_job(config, name: str, timeout: float = 1800) -> JobResult:
    start_job(config, name)
    folder, deadline = _job_folder(config), time.monotonic() + timeout
    rc = folder / f"{name}.rc"
    while not rc.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"compile job {name} did not finish in {timeout:.0f} s")
        time.sleep(0.5)
    out = folder / f"{name}.out"
    return JobResult(int(rc.read_text()), out.read_text(), Path(f"{out}.err").read_text())


def pytest_collection_modifyitems(config, items):
    needed = [name for name in COMPILE_JOBS if any(name in getattr(i, "fixturenames", ()) for i in items)]
    if not config.option.collectonly:
        for name in needed:
            start_job(config, name)
    # stable: the job readers keep their order, after everything else
    items.sort(key=lambda i: any(name in getattr(i, "fixturenames", ()) for name in needed))


def _job_fixture(name):
    @pytest.fixture(scope="session", name=name)
    def job(request):
        return wait_for_job(request.config, name)
    return job


job_audit_reports = _job_fixture("job_audit_reports")
job_audit_targets = _job_fixture("job_audit_targets")
job_sass_kernels = _job_fixture("job_sass_kernels")
job_lean_targets = _job_fixture("job_lean_targets")
job_tucker_targets = _job_fixture("job_tucker_targets")


@pytest.fixture(scope="session")
def audit_reports(job_audit_reports):
    """``python -m deftnumba ptx --json``'s reports: every registered kernel compiled for
    sm_90 once per test run (a compile job), shared by every audit test."""
    rc, _, stderr = job_audit_reports
    if rc != 0 and ("libnvvm" in stderr or "nvrtc" in stderr.lower() and "not found" in stderr.lower()):
        pytest.skip("NVVM/NVRTC not installed: pip install 'numba-cuda[cu13]'")
    assert rc == 0, stderr[-3000:]
    return job_audit_reports.json()
