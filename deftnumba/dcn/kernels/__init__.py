"""Numba CUDA kernels, one module per kernel family.

Nothing here imports ``deftnumba.ops``, the benchmarks or the notebooks: data
flows ``ops -> kernels``. Every module imports ``cuda`` from
``deftnumba.backend``, the single ``from numba import cuda`` site.
"""
