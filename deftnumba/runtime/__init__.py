"""How a kernel runs: the backend (GPU or simulator), simulator checks, launch grids, the timer.

Nothing here imports anything above it in deftnumba. ``runtime.backend`` is the
one module in the package that imports numba's ``cuda``.
"""
