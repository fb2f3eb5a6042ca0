"""The backend choice: made once at import, forced by an environment variable, said once."""

import os
import subprocess
import sys

import numpy as np
import pytest

from deftnumba.runtime import backend


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("DEFTNUMBA_QUIET", "NUMBA_ENABLE_CUDASIM")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_import_says_once_which_backend_it_picked():
    proc = _python("import deftnumba, deftnumba.ops, deftnumba.backend; print(deftnumba.backend.NAME)",
                   DEFTNUMBA_BACKEND="simulator")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "simulator"
    assert proc.stderr.count("deftnumba: backend=simulator") == 1


def test_quiet_silences_the_message():
    proc = _python("import deftnumba", DEFTNUMBA_BACKEND="simulator", DEFTNUMBA_QUIET="1")
    assert proc.returncode == 0 and "backend=" not in proc.stderr


def test_unknown_backend_name_is_a_clear_error():
    proc = _python("import deftnumba", DEFTNUMBA_BACKEND="tpu")
    assert proc.returncode != 0
    assert "DEFTNUMBA_BACKEND='tpu'" in proc.stderr and "auto, cuda, simulator" in proc.stderr


def test_numba_imported_first_is_switched_to_the_simulator():
    proc = _python("import numba; import deftnumba; from numba import cuda; print(cuda.simulator_init is not None)",
                   DEFTNUMBA_BACKEND="simulator")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="checks the simulator's machine")
def test_auto_picks_the_simulator_without_a_gpu():
    proc = _python("import deftnumba.backend as b; print(b.NAME, '|', b.REASON)")
    if backend._cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    assert proc.stdout.startswith("simulator |")


def test_launch_config_stays_within_grid_limits():
    for total in (1, 255, 256, 10**6, 2**31 + 7, 2**40):
        blocks, threads = backend.launch_config(total)
        assert 1 <= blocks <= 2**31 - 1 and 1 <= threads <= 1024
    assert backend.launch_config(0)[0] == 1


def test_stopwatch_labels_its_clock():
    sw = backend.Stopwatch()
    with sw.section("work"):
        np.ones(1000).sum()
    assert list(sw.milliseconds()) == ["work"]
    assert ("simulator" in sw.unit) == backend.IS_SIMULATOR


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the simulator's shared-array factory")
def test_simulated_shared_array_is_one_array_per_block_under_contention():
    """Threads of one block that reach ``cuda.shared.array`` together must share one array.

    numba-cuda's simulator (0.30) allocates check-then-insert without a lock; under this
    harness its factory handed out two arrays in about 27% of rounds (measured here
    2026-11-22), which made a correct tiled kernel read garbage about 1 run in 20.
    ``backend`` installs a locked factory; this test fails if that fix is lost.
    """
    import sys
    import threading

    from numba.cuda.simulator import kernelapi

    threads, rounds, split = 32, 30, 0
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # preempt often, so the race window is actually hit
    try:
        for _ in range(rounds):
            shared = kernelapi.FakeCUDAShared(0)
            got = [None] * threads
            gate = threading.Barrier(threads)

            def body(i):
                gate.wait()
                got[i] = shared.array((16,), np.float32)  # one source line: one shared array

            workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            split += len({id(a) for a in got}) > 1
    finally:
        sys.setswitchinterval(old)
    assert split == 0, f"{split}/{rounds} rounds gave one block several 'shared' arrays"


def test_backend_hint_only_where_a_gpu_could_be_used(monkeypatch):
    """A CPU-only machine gets no dead-end hint; a machine whose driver answers without a
    device is told what is missing and how to insist on the GPU."""
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    monkeypatch.setattr(backend, "_cuda_devices", lambda: (0, ""))
    name, reason = backend._choose()
    assert name == "simulator" and "no CUDA driver" in reason and backend.ENV_VAR not in reason
    monkeypatch.setattr(backend, "_cuda_devices",
                        lambda: (0, "the CUDA driver (libcuda.so.1) is installed but cuInit failed with error 100"))
    name, reason = backend._choose()
    assert name == "simulator" and "cuInit failed" in reason and f"{backend.ENV_VAR}=cuda" in reason
    monkeypatch.setattr(backend, "_cuda_devices", lambda: (2, "the CUDA driver (libcuda.so.1) reports 2 device(s)"))
    assert backend._choose() == ("cuda", "the CUDA driver (libcuda.so.1) reports 2 device(s)")
