"""Numba's CUDA simulator, made trustworthy: a thread-safe shared-array factory
and ``bounds_checked`` (NaN-filled shared/local memory, index checks).

Nothing here is used on a GPU. ``backend`` installs the shared-array fix when it
chooses the simulator; this module imports nothing of deftnumba (``backend`` imports it).
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np


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


def install_thread_safe_shared_arrays() -> None:
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    dynamic = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0:  # dynamic shared memory
            return dynamic(self, shape, dtype, alignment)
        # alignment (a GPU hint for wide shared loads, e.g. LDS.128) is accepted and ignored:
        # NumPy's buffers are at least 16-byte aligned and the simulator loads element by element
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


# numba-cuda's simulator (0.30) runs a block as one Python thread per CUDA thread and a
# manager that *polls* them in a busy loop (``is_alive`` and the barrier flags of every
# thread, over and over) to find when all have reached ``syncthreads``. Under the GIL
# the polling loop takes most of the CPU from the threads doing the work: profiling a
# small DCN training step showed two thirds of its time in that loop. The replacement
# below keeps the simulator's threads, barriers and abort rules but sleeps on a
# condition variable: a thread notifies the manager when it arrives at a barrier or
# ends, and the manager wakes only then, so the same kernels run 2-3x faster.
def install_event_driven_block_scheduler() -> None:
    from numba.cuda.simulator import kernel as sim

    block_thread, manager = sim.BlockThread, sim.BlockManager
    if getattr(manager.run, "event_driven", False):
        return
    thread_run = block_thread.run

    def run_thread(self):
        try:
            thread_run(self)  # the simulator's run: records an exception in self.exception
        finally:
            with self._manager.wakeup:
                self.finished = True
                self._manager.wakeup.notify()

    def syncthreads(self):
        if self.abort:
            raise RuntimeError("abort flag set on syncthreads call")
        with self._manager.wakeup:  # arrive at the barrier and tell the manager
            self.syncthreads_blocked = True
            self._manager.wakeup.notify()
        self.syncthreads_event.wait()  # until the manager releases the whole block
        self.syncthreads_event.clear()
        if self.abort:
            raise RuntimeError("abort flag set on syncthreads clear")

    def run_block(self, grid_point, *args):
        self.wakeup = threading.Condition()
        threads = []
        # sim.np, not np: backend.order_varying swaps the module's np to shuffle thread order
        for block_point in sim.np.ndindex(*self._block_dim):
            t = block_thread(lambda: self._f(*args), self, grid_point, block_point, self._debug)
            t.finished = False
            threads.append(t)
        with self.wakeup:
            for t in threads:
                t.start()
            while True:
                failed = next((t for t in threads if t.exception), None)
                if failed is not None:  # abort every other thread, as the simulator does
                    for other in threads:
                        other.abort = True
                        other.syncthreads_blocked = False
                        other.syncthreads_event.set()
                    raise failed.exception[0].with_traceback(failed.exception[1])
                live = [t for t in threads if not t.finished]
                if not live:
                    return
                if all(t.syncthreads_blocked for t in live):  # every live thread is at the barrier
                    for t in live:
                        t.syncthreads_blocked = False
                        t.syncthreads_event.set()
                self.wakeup.wait()  # releases the lock; a thread's notify wakes us

    run_block.event_driven = True
    block_thread.run, block_thread.syncthreads, manager.run = run_thread, syncthreads, run_block



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
    from numba.core import config

    if not config.ENABLE_CUDASIM:
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

    def local_array(self, shape, dtype, alignment=None):  # alignment: ignored, as for shared arrays
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
