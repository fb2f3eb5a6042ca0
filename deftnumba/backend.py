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
import threading
import time

import numpy as np

ENV_VAR = "DEFTNUMBA_BACKEND"
_CHOICES = ("auto", "cuda", "simulator")


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports, without importing Numba."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def _choose() -> tuple[str, str]:
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={wanted!r}: expected one of {', '.join(_CHOICES)}")
    if wanted != "auto":
        return wanted, f"forced by {ENV_VAR}={wanted}"
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "simulator", "NUMBA_ENABLE_CUDASIM is set"
    count = _cuda_device_count()
    if count > 0:
        return "cuda", f"the CUDA driver reports {count} device(s)"
    return "simulator", f"no CUDA GPU found; set {ENV_VAR}=cuda to force the GPU"


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

# --------------------------------------------------------------------------- simulator fix
# numba-cuda's simulator (0.30) gives each block one dict of shared arrays keyed by the
# source line of ``cuda.shared.array``, filled check-then-insert without a lock. Two
# threads of a block that reach the line together can each create an array: the block
# then runs on two different "shared" arrays and readers see the other copy's garbage.
# (Seen here: a tiled kernel with correct barriers gave wrong values about 1 run in 20.)
# The replacement below is the same factory under a lock; ``bounds_checked`` swaps only
# how a new array is filled.
_SHARED_LOCK = threading.Lock()
_new_shared = np.empty  # how a new simulated shared array is made (bounds_checked poisons it)


def _install_thread_safe_shared_arrays() -> None:
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    dynamic = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0:  # dynamic shared memory
            return dynamic(self, shape, dtype, alignment)
        # ``alignment`` is a GPU layout hint (LDS.128 needs 16-byte alignment); a NumPy
        # array has no use for it, so it is accepted and ignored here.
        if not isinstance(dtype, (np.dtype, type)):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)  # the kernel line that asked: the simulator's key
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with _SHARED_LOCK:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = _new_shared(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array


if IS_SIMULATOR:
    _install_thread_safe_shared_arrays()

if os.environ.get("DEFTNUMBA_QUIET", "0") in ("", "0"):
    print(f"deftnumba: backend={NAME} ({REASON})", file=sys.stderr)


# --------------------------------------------------------------------------- arrays
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
    stream = _STREAM.get()
    if stream is None:
        kernel[grid, block, 0, shared_bytes](*args)
    else:
        kernel[grid, block, stream, shared_bytes](*args)


def launch_config(total: int, threads: int = 256) -> tuple[int, int]:
    """Blocks and threads for a grid-stride loop over ``total`` items.

    The block count is capped, so any problem size launches within the device's
    grid limits; kernels loop ``for i in range(cuda.grid(1), total, cuda.gridsize(1))``.
    In the simulator, where every thread is a Python thread, the cap is small.
    """
    cap = 8 if IS_SIMULATOR else 65536
    threads = min(threads, 64) if IS_SIMULATOR else threads
    blocks = max(1, min(cap, -(-int(total) // threads)))
    return blocks, threads


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


# --------------------------------------------------------------------------- timing
class Stopwatch:
    """Times named sections: CUDA events on the GPU, the host clock in the simulator.

    >>> sw = Stopwatch()
    >>> with sw.section("gemm"):
    ...     pass
    >>> sw.milliseconds()   # {'gemm': [...]}   (call after the work is done)

    ``sw.unit`` says which clock was used, so simulator times are never taken
    for GPU times.
    """

    def __init__(self):
        self.unit = "simulator wall-clock ms" if IS_SIMULATOR else "GPU ms (CUDA events)"
        self._records: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def section(self, name: str):
        if IS_SIMULATOR:
            start = time.perf_counter()
            yield
            self._records.append((name, start, time.perf_counter()))
            return
        cp = cupy()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        yield
        stop.record()
        self._records.append((name, start, stop))

    def milliseconds(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name, start, stop in self._records:
            if IS_SIMULATOR:
                ms = (stop - start) * 1e3
            else:
                stop.synchronize()
                ms = cupy().cuda.get_elapsed_time(start, stop)
            out.setdefault(name, []).append(ms)
        return out


class _NoStopwatch:
    """Stand-in used when the caller does not time anything."""

    @contextlib.contextmanager
    def section(self, name: str):
        yield


NO_STOPWATCH = _NoStopwatch()


# --------------------------------------------------------------------------- simulator checks
def _check_index(shape, index) -> None:
    """``IndexError`` unless every integer in ``index`` lies in ``[0, dim)``."""
    if not isinstance(index, tuple):
        index = (index,)
    for axis, i in enumerate(index):
        if i is Ellipsis:
            return
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            if axis >= len(shape) or not 0 <= int(i) < shape[axis]:
                raise IndexError(f"kernel index {tuple(int(v) if isinstance(v, (int, np.integer)) else v for v in index)}"
                                 f" outside an array of shape {tuple(shape)}")


class _CheckedArray(np.ndarray):
    """A shared or local array whose integer indices are bounds-checked (see ``bounds_checked``)."""

    def __getitem__(self, index):
        _check_index(self.shape, index)
        return np.ndarray.__getitem__(self, index)

    def __setitem__(self, index, value):
        _check_index(self.shape, index)
        np.ndarray.__setitem__(self, index, value)


def _poisoned(shape, dtype):
    a = np.empty(shape, dtype)
    a.fill(np.nan if a.dtype.kind == "f" else -(2**30) if a.dtype.kind == "i" else 0)
    return a.view(_CheckedArray)


@contextlib.contextmanager
def bounds_checked():
    """Simulator only: a poor man's ``compute-sanitizer`` for the kernels run inside.

    NumPy, and so the simulator, silently wraps a negative index (``a[-1]`` is the
    last element) where a GPU would read outside the array. Inside this context:

    * every integer index into a kernel argument, a shared or a local array must
      satisfy ``0 <= i < dim``, or the kernel raises ``IndexError``;
    * shared and local arrays start filled with NaN (integers with ``-2**30``), so
      a read of memory no thread wrote shows up as NaN in the results.

    Not thread-safe with other simulator launches; slower. Races are not detected.
    """
    if not IS_SIMULATOR:
        raise RuntimeError("bounds_checked() needs the simulator backend; use compute-sanitizer on a GPU")
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.cudadrv import devicearray

    global _new_shared
    within = devicearray.FakeWithinKernelCUDAArray
    saved = (within.__getitem__, within.__setitem__, _new_shared, kernelapi.FakeCUDALocal.array)
    get_item, set_item = saved[0], saved[1]

    def checked_get(self, index):
        if not isinstance(index, str):
            _check_index(self._item.shape, index)
        return get_item(self, index)

    def checked_set(self, index, value):
        if not isinstance(index, str):
            _check_index(self._item.shape, index)
        set_item(self, index, value)

    def local_array(self, shape, dtype, alignment=None):
        if alignment is not None:
            return saved[3](self, shape, dtype, alignment)
        if not isinstance(dtype, np.dtype) and not isinstance(dtype, type):
            from numba.np import numpy_support
            dtype = numpy_support.as_dtype(dtype)
        return _poisoned(shape, dtype)

    within.__getitem__, within.__setitem__ = checked_get, checked_set
    _new_shared, kernelapi.FakeCUDALocal.array = _poisoned, local_array
    try:
        yield
    finally:
        within.__getitem__, within.__setitem__, _new_shared, kernelapi.FakeCUDALocal.array = saved
