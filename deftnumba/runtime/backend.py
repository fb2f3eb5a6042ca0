"""The one place that knows whether deftnumba runs on a real GPU or in Numba's
CUDA simulator.

The decision is made once, at import, before Numba is imported:

* ``DEFTNUMBA_BACKEND=cuda``      real CUDA through numba-cuda, arrays in CuPy;
* ``DEFTNUMBA_BACKEND=simulator`` Numba's CUDA simulator (every GPU thread is a
  Python thread), arrays in NumPy; slow but exact, for machines without a GPU;
* ``DEFTNUMBA_BACKEND=auto`` (default) ``cuda`` if the CUDA driver reports a
  device, else ``simulator``. ``NUMBA_ENABLE_CUDASIM=1`` also selects the simulator.

The choice is printed once to stderr (``DEFTNUMBA_QUIET=1`` silences it).
Everything else in the package imports ``cuda`` from here: this is the single
``from numba import cuda`` site.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import sys

import numpy as np

ENV_VAR = "DEFTNUMBA_BACKEND"
_CHOICES = ("auto", "cuda", "simulator")


def _cuda_devices() -> tuple[int, str]:
    """Number of CUDA devices the driver reports, without importing Numba, and what was
    found on the way: ``""`` when no CUDA driver library loads at all (a CPU-only machine),
    else what the driver said."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        status = lib.cuInit(0)
        if status != 0:
            return 0, f"the CUDA driver ({name}) is installed but cuInit failed with error {status}"
        count = ctypes.c_int(0)
        status = lib.cuDeviceGetCount(ctypes.byref(count))
        if status != 0:
            return 0, f"the CUDA driver ({name}) is installed but cuDeviceGetCount failed with error {status}"
        return count.value, f"the CUDA driver ({name}) reports {count.value} device(s)"
    return 0, ""


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports, without importing Numba."""
    return _cuda_devices()[0]


def _choose() -> tuple[str, str]:
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={wanted!r}: expected one of {', '.join(_CHOICES)}")
    if wanted != "auto":
        return wanted, f"forced by {ENV_VAR}={wanted}"
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "simulator", "NUMBA_ENABLE_CUDASIM is set"
    count, found = _cuda_devices()
    if count > 0:
        return "cuda", found
    if not found:  # a CPU-only machine: nothing to force, so no hint
        return "simulator", "no CUDA driver on this machine; kernels run on the CPU"
    # A driver is there but no device answered: the one case where a GPU may be near.
    return "simulator", (f"{found}, so no GPU can be used; check the driver and "
                         f"CUDA_VISIBLE_DEVICES, then set {ENV_VAR}=cuda to insist on the GPU")


NAME, REASON = _choose()
IS_SIMULATOR = NAME == "simulator"

if IS_SIMULATOR:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
else:
    # Numba otherwise synchronizes the host on the stream a CuPy/torch array exports
    # (its __cuda_array_interface__) at every kernel launch: a host stall per array per
    # launch. deftnumba orders all its work on one stream (see external_stream), so
    # that sync buys nothing. A user's explicit setting wins.
    os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
if "numba" in sys.modules:  # numba read its config before us: make it look again
    from numba.core import config as _numba_config

    _numba_config.reload_config()

from numba import cuda  # noqa: E402  (the single import site; must follow the env setup)

if IS_SIMULATOR != (getattr(cuda, "simulator_init", None) is not None):
    # numba.cuda was imported in the other mode before deftnumba; it cannot be switched now.
    _actual = "simulator" if not IS_SIMULATOR else "cuda"
    raise ImportError(
        f"deftnumba chose the {NAME} backend ({REASON}), but numba.cuda was already imported "
        f"in {_actual} mode. Import deftnumba before numba.cuda, or set {ENV_VAR}."
    )

if IS_SIMULATOR:
    from . import simulator as _simulator

    _simulator.install_thread_safe_shared_arrays()
    _simulator.install_event_driven_block_scheduler()

if NAME == "cuda":
    try:
        import importlib.util as _importlib_util

        if _importlib_util.find_spec("cupy") is None:
            REASON += ("; CuPy is not installed, so NumPy arrays are copied to the GPU and back "
                       "at each call (pip install -e \".[cu13]\", or \".[cu12]\" for a CUDA 12 driver)")
    except (ImportError, ValueError):
        pass

if os.environ.get("DEFTNUMBA_QUIET", "0") in ("", "0"):
    print(f"deftnumba: backend={NAME} ({REASON})", file=sys.stderr)


# --------------------------------------------------------------------------- arrays
def torch_or_none():
    """PyTorch if it is installed, else None (it is optional: baselines, the layer, training)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def cupy():
    """The CuPy module; a clear error if the GPU backend runs without it."""
    try:
        import cupy as cp
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the cuda backend needs CuPy: pip install 'deftnumba[cu13]' (or [cu12])"
        ) from err
    return cp


def is_cupy_array(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(like):
    """NumPy on the simulator; CuPy on the GPU (also for NumPy inputs, which are copied)."""
    return np if IS_SIMULATOR else cupy()


def to_device(a):
    """Place a host or device array where the kernels can read it.

    Any strides and read-only arrays are accepted; the caller's array is never
    written. Copies are made only where needed:

    * simulator: a launch copies each NumPy argument in and back out, which needs
      a single contiguous buffer (C or F order) and a writeable array, so a strided
      view, a negative-stride view or a read-only array is copied first;
    * cuda: NumPy arrays are copied to the GPU (contiguous); a CuPy view with a
      negative stride is made contiguous, other CuPy strides are used as they are.
    """
    if is_cupy_array(a):
        if not IS_SIMULATOR and any(s < 0 for s in a.strides):
            return cupy().ascontiguousarray(a)
        return a
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)
    if IS_SIMULATOR:
        return a if a.flags.writeable else a.copy()
    return cupy().asarray(a)


def to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def synchronize() -> None:
    if not IS_SIMULATOR:
        cuda.synchronize()


_STREAM = contextvars.ContextVar("deftnumba_stream", default=None)


@contextlib.contextmanager
def external_stream(pointer: int):
    """Run deftnumba's kernels and CuPy work on an existing CUDA stream.

    ``pointer`` is a raw ``cudaStream_t`` (e.g. ``torch.cuda.current_stream().cuda_stream``).
    A no-op in the simulator or for the legacy default stream (0).
    """
    if IS_SIMULATOR or not pointer:
        yield
        return
    token = _STREAM.set(cuda.external_stream(pointer))
    try:
        with cupy().cuda.ExternalStream(pointer):
            yield
    finally:
        _STREAM.reset(token)


def launch(kernel, grid, block, *args, shared_bytes: int = 0) -> None:
    """Launch ``kernel[grid, block](*args)`` on the current stream (see ``external_stream``).

    Every kernel launch in the package goes through here.
    """
    if _LAUNCH_LOGS:
        name = getattr(getattr(kernel, "py_func", kernel), "__qualname__", repr(kernel))
        for log in _LAUNCH_LOGS:
            log.append(name)
    stream = _STREAM.get()
    if stream is None:
        kernel[grid, block, 0, shared_bytes](*args)
    else:
        kernel[grid, block, stream, shared_bytes](*args)


_LAUNCH_LOGS: list = []  # open ``launch_log`` lists


@contextlib.contextmanager
def launch_log():
    """Record the kernels launched inside the block: ``with launch_log() as names: ...``.

    ``names`` gets each launch's kernel ``__qualname__`` (e.g. ``input_grad_kernel.<locals>.kernel``),
    so a test can prove which path ran (e.g. that ``deterministic=True`` launched no atomic kernel).
    """
    log: list[str] = []
    _LAUNCH_LOGS.append(log)
    try:
        yield log
    finally:
        _LAUNCH_LOGS.remove(log)


@contextlib.contextmanager
def order_varying(seed: int):
    """Simulator only: run the blocks of every launch, and the threads of every block, in a
    shuffled order drawn from ``seed``.

    On a GPU, atomics from different blocks land in whatever order the hardware runs
    them; the simulator runs blocks in grid order, so its atomic sums are bit-identical
    from run to run and a determinism test could not fail. Inside this context two
    seeds give two accumulation orders, as two GPU runs would.
    """
    if not IS_SIMULATOR:
        yield
        return
    from numba.cuda.simulator import kernel as sim_kernel

    rng = np.random.default_rng(seed)

    class _ShuffledNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def ndindex(*shape):
            points = list(np.ndindex(*shape))
            rng.shuffle(points)
            return iter(points)

    saved = sim_kernel.np
    sim_kernel.np = _ShuffledNumpy()
    try:
        yield
    finally:
        sim_kernel.np = saved


# --------------------------------------------------------------------------- device facts
def device_info() -> dict:
    """Backend, device name, compute capability and library versions."""
    import numba

    info = {"backend": NAME, "reason": REASON, "numpy": np.__version__, "numba": numba.__version__}
    try:
        import numba_cuda

        info["numba_cuda"] = numba_cuda.__version__
    except ImportError:
        info["numba_cuda"] = "not installed (frozen numba.cuda)"
    if IS_SIMULATOR:
        info.update(device="Numba CUDA simulator (CPU)", compute_capability="n/a", driver="n/a")
        return info
    dev = cuda.get_current_device()
    info.update(device=dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
                compute_capability="%d.%d" % dev.compute_capability,
                multiprocessors=dev.MULTIPROCESSOR_COUNT)
    try:
        cp = cupy()
        info.update(cupy=cp.__version__,
                    driver=str(cp.cuda.runtime.driverGetVersion()),
                    cuda_runtime=str(cp.cuda.runtime.runtimeGetVersion()))
    except ImportError:
        info.update(cupy="not installed")
    return info


# --------------------------------------------------------------------------- moved, still reachable here
_MOVED = {"launch_config": "grid", "GRID_YZ_LIMIT": "grid", "bounds_checked": "simulator",
          "Stopwatch": "timing", "NO_STOPWATCH": "timing"}


def __getattr__(name: str):
    """``backend.launch_config``, ``backend.Stopwatch`` ... (older code and the kernels call
    them here): they live in ``runtime.grid``, ``runtime.timing`` and ``runtime.simulator``,
    which import this module, so they are looked up when first used."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
