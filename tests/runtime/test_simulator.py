"""The simulator's event-driven block scheduler (``runtime.simulator``): barriers, order,
errors and threads that leave early behave as in numba-cuda's polling scheduler."""

import threading

import numpy as np
import pytest

from deftnumba.runtime import backend

pytestmark = pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the simulator's block scheduler")
cuda = backend.cuda


@cuda.jit
def rotate_rounds(out, rounds):
    """Each round every thread reads its right neighbour's value from the last round: wrong
    unless every barrier waits for the whole block."""
    buf = cuda.shared.array(2 * 37, dtype=np.float64)
    t = cuda.threadIdx.x
    n = cuda.blockDim.x
    buf[t] = t + 100.0 * cuda.blockIdx.x
    cuda.syncthreads()  # round 0 written
    for r in range(rounds):
        src, dst = (r % 2) * n, ((r + 1) % 2) * n
        buf[dst + t] = buf[src + (t + 1) % n] + 1.0
        cuda.syncthreads()  # round r+1 written before anyone reads it
    out[cuda.blockIdx.x, t] = buf[(rounds % 2) * n + t]


@cuda.jit
def early_exit_then_barrier(out):
    t = cuda.threadIdx.x
    if t >= 5:  # these threads leave before the barrier the others wait at
        return
    cuda.syncthreads()
    out[t] = t


@cuda.jit
def one_thread_fails(out):
    t = cuda.threadIdx.x
    if t == 3:
        out[100] = 1.0  # out of range on a NumPy array: IndexError in the simulator
    cuda.syncthreads()  # the other threads wait here for a thread that has died
    out[t] = t


def test_the_scheduler_is_installed():
    from numba.cuda.simulator import kernel as sim

    assert getattr(sim.BlockManager.run, "event_driven", False)


def test_barriers_hold_over_many_rounds_and_blocks(rng):
    rounds, threads, blocks = int(rng.integers(5, 9)), 37, 3
    out = np.full((blocks, threads), np.nan)
    rotate_rounds[blocks, threads](out, rounds)
    t = np.arange(threads)
    expected = np.stack([(t + rounds) % threads + 100.0 * b + rounds for b in range(blocks)])
    np.testing.assert_array_equal(out, expected)


def test_barriers_hold_under_a_shuffled_thread_order(rng):
    out = np.full((2, 37), np.nan)
    with backend.order_varying(int(rng.integers(1 << 30))):
        rotate_rounds[2, 37](out, 6)
    t = np.arange(37)
    np.testing.assert_array_equal(out, np.stack([(t + 6) % 37 + 100.0 * b + 6 for b in range(2)]))


def test_threads_that_return_early_do_not_hold_the_barrier():
    out = np.full(8, -1.0)
    early_exit_then_barrier[1, 8](out)
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 4, -1, -1, -1])


def test_an_error_in_one_thread_raises_and_frees_the_others():
    before = threading.active_count()
    with pytest.raises(IndexError, match="tid=\\[3, 0, 0\\]"):
        one_thread_fails[1, 8](np.zeros(8))
    for t in threading.enumerate():  # the aborted threads end; none is left waiting forever
        if t is not threading.current_thread() and t.daemon:
            t.join(timeout=5)
    assert threading.active_count() <= before
