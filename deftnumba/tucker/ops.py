"""``tucker_conv2d``: validate once, pick a method, allocate, launch.

Methods (``METHODS``):

* ``three_pass``: the first 1x1 convolution as one batched GEMM (cuBLAS through
  CuPy's ``matmul`` on the GPU; NumPy in the simulator), our core-conv kernel
  (``kernels/core_conv.py``), the last 1x1 as a second batched GEMM, then the
  bias. The two intermediates ``[N, r_in, H, W]`` and ``[N, r_out, Ho, Wo]``
  round-trip through device memory. On small images the core conv's tile may
  split its input ranks over several blocks (``CoreTile.splits``), whose sums
  the last block to finish adds in split order: still a fixed order.
* ``winograd``: ``three_pass`` with the core conv by Winograd's F(2x2, 3x3)
  (``kernels/winograd.py``): 2.25x fewer multiplies in the core, for 3x3 cores with
  stride 1 and dilation 1 only (any padding, batch and ranks); other layers raise
  ``ValueError``. Its splits meet in a fixed order, as ``three_pass``'s.
* ``fused``: one launch (``kernels/fused.py``): the first 1x1 is computed while
  staging the core convolution's input tile in shared memory, the last 1x1 (and
  the bias) in its epilogue; only the input and the output touch device memory.
* ``fused_winograd``: ``fused``'s one launch with the core conv by F(2x2, 3x3)
  (``kernels/fused_winograd.py``): the hidden tile is transformed in shared memory and
  multiplied as ``winograd`` does; 3x3 cores with stride 1 and dilation 1 only.

All reduce every output in a fixed order (no atomics): results are
bit-identical run to run. ``groups > 1`` applies to the core convolution; every
method runs it as a dense block-diagonal core (zeros between groups), which
costs ``groups`` times the core's FLOPs (the reference and the roofline count
the grouped work).
"""

from __future__ import annotations

import numpy as np

from ..runtime import backend
from .geometry import check_tucker
from .kernels import core_conv, fused, fused_winograd, winograd
from .reference import dense_core

METHODS: tuple[str, ...] = ("three_pass", "fused", "winograd", "fused_winograd")


def _empty(xp, shape, dtype):
    """Allocation of outputs and intermediates (a seam for tests that poison them)."""
    return xp.empty(shape, dtype=dtype)


def pick_method(geometry) -> tuple[str, object]:
    """``"auto"``: ``(method, tile)``. On a GPU, the method and tile with the lowest time
    *predicted* by ``tucker.model`` (unmeasured; ``model.autotune`` measures); in the
    simulator, ``fused`` with its small tile when it fits, else ``three_pass``."""
    if not backend.IS_SIMULATOR:
        from . import model

        return model.best(geometry)
    return ("fused", None) if fused.default_config(geometry) is not None else ("three_pass", None)


def tucker_conv2d(input, first, core, last, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  *, method: str = "auto", config=None, stopwatch=None):
    """A Tucker-format convolution: ``conv2d(input, W, bias, stride, padding, dilation)``
    with ``W[o, c] = sum_ab last[o, a] core[a, b] first[b, c]``.

    input: ``[N, C, H, W]``;  first: ``[r_in, C, 1, 1]``;  core: ``[r_out, r_in/groups, kh, kw]``;
    last: ``[Cout, r_out, 1, 1]``;  bias: ``[Cout]`` or None; stride, padding, dilation: int
    or pair; groups: groups of the core convolution.

    All arrays share one dtype (float32 or float64) and one kind (NumPy or CuPy), as
    ``deftnumba.deform_conv2d``: CuPy in gives CuPy out on the ``cuda`` backend.

    method: ``"auto"`` or one of ``METHODS``; config: an optional tile for the method
    (``core_conv.CoreTile``, ``fused.FusedTile``, ``winograd.WinogradTile`` or
    ``fused_winograd.FusedWinogradTile``); stopwatch: optional
    ``backend.Stopwatch``. Returns ``[N, Cout, Ho, Wo]``.
    """
    g = check_tucker(input, first, core, last, bias, stride, padding, dilation, groups)
    if method == "auto":
        if config is None:
            method, config = pick_method(g)
        else:
            method = ("fused" if isinstance(config, fused.FusedTile)
                      else "winograd" if isinstance(config, winograd.WinogradTile)
                      else "fused_winograd" if isinstance(config, fused_winograd.FusedWinogradTile)
                      else "three_pass")
    if method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if method in ("winograd", "fused_winograd") and not winograd.eligible(g):
        raise ValueError(f"method={method!r} takes a 3x3 core with stride 1 and dilation 1, got "
                         f"{g.kernel_h}x{g.kernel_w}, stride ({g.stride_h}, {g.stride_w}), dilation "
                         f"({g.dil_h}, {g.dil_w}): use method='three_pass' or 'fused'")
    stopwatch = stopwatch or backend.NO_STOPWATCH
    host_result = not backend.is_cupy_array(input)
    xp = backend.array_module(input)
    dtype = np.dtype(g.dtype)
    x = xp.ascontiguousarray(backend.to_device(input))
    f = xp.ascontiguousarray(backend.to_device(first)).reshape(g.rank_in, g.in_channels)
    l = xp.ascontiguousarray(backend.to_device(last)).reshape(g.out_channels, g.rank_out)
    k = backend.to_device(core)
    if g.groups > 1:
        k = xp.asarray(dense_core(backend.to_host(k), g.groups))
    b = backend.to_device(bias) if bias is not None else None
    out = _empty(xp, g.shapes["output"], dtype)
    if method in ("three_pass", "winograd"):
        _three_pass(g, x, f, k, l, b, out, config, xp, stopwatch, method)
    elif method == "fused_winograd":
        if config is None:
            from . import model

            pick = None if backend.IS_SIMULATOR else model.AUDITED_PICKS.get(model.pick_key(g), {}).get(method)
        cfg = config if config is not None else fused_winograd.default_config(g, pick)
        if cfg is not None and not isinstance(cfg, fused_winograd.FusedWinogradTile):
            raise TypeError(f"config for fused_winograd must be a FusedWinogradTile, got {type(cfg).__name__}")
        if cfg is None:
            raise ValueError(f"no fused_winograd tile fits this layer ({g.rank_in}x{g.rank_out} ranks): "
                             "use method='winograd' or 'fused'")
        with stopwatch.section("fused_winograd"):
            fused_winograd.forward(g, cfg, x, f, k, l, b, out, xp)
    else:
        cfg = config if config is not None else fused.default_config(g)
        if cfg is not None and not isinstance(cfg, fused.FusedTile):
            raise TypeError(f"config for fused must be a FusedTile, got {type(cfg).__name__}")
        if cfg is None:
            raise ValueError(f"no fused tile fits this layer ({g.rank_in}x{g.rank_out} ranks, "
                             f"{g.kernel_h}x{g.kernel_w} kernel): use method='three_pass'")
        with stopwatch.section("fused"):
            fused.forward(g, cfg, x, f, k, l, b, out, xp)
    return backend.to_host(out) if host_result and not backend.IS_SIMULATOR else out


def _three_pass(g, x, f, k, l, b, out, config, xp, stopwatch, method="three_pass") -> None:
    dtype = np.dtype(g.dtype)
    n = g.batch
    kernel = winograd if method == "winograd" else core_conv
    tile_type = winograd.WinogradTile if method == "winograd" else core_conv.CoreTile
    cfg = config if config is not None else (default_winograd_tile(g) if method == "winograd"
                                             else default_core_tile(g))
    if not isinstance(cfg, tile_type):
        raise TypeError(f"config for {method} must be a {tile_type.__name__}, got {type(cfg).__name__}")
    hidden_in = _empty(xp, g.shapes["hidden_in"], dtype)
    hidden_out = _empty(xp, g.shapes["hidden_out"], dtype)
    with stopwatch.section("first 1x1 (GEMM)"):
        # [r_in, C] @ [N, C, H*W] -> [N, r_in, H*W]: one strided-batched GEMM
        xp.matmul(f, x.reshape(n, g.in_channels, g.height * g.width),
                  out=hidden_in.reshape(n, g.rank_in, g.height * g.width))
    with stopwatch.section("core conv"):
        packed = kernel.pack_core(k, cfg, xp)
        kernel.launch(g, cfg, hidden_in.reshape(-1), packed, hidden_out.reshape(-1))
    with stopwatch.section("last 1x1 (GEMM)"):
        p = g.out_h * g.out_w
        xp.matmul(l, hidden_out.reshape(n, g.rank_out, p), out=out.reshape(n, g.out_channels, p))
        if b is not None:
            out += b.reshape(1, -1, 1, 1)


def default_core_tile(g) -> core_conv.CoreTile:
    """``GPU_TILE`` shrunk to the layer (ranks per block, tile) on the GPU; the small
    ``SIMULATOR_TILE`` in the simulator."""
    if backend.IS_SIMULATOR:
        return core_conv.SIMULATOR_TILE
    t = core_conv.GPU_TILE
    ocb = min(t.oc_block, -(-g.rank_out // t.reg_oc) * t.reg_oc)
    return core_conv.CoreTile(t.tile_h, t.tile_w, t.chunk, ocb, t.reg_oc, t.reg_px)


def default_winograd_tile(g) -> winograd.WinogradTile:
    """The Winograd core conv's tile: the audit's pick for the suite layers
    (``tucker.model.AUDITED_PICKS``), else ``GPU_TILE`` with rank splits while a split keeps
    a chunk, on the GPU; the small ``SIMULATOR_TILE`` in the simulator."""
    if backend.IS_SIMULATOR:
        return winograd.SIMULATOR_TILE
    from . import model

    pick = model.AUDITED_PICKS.get(model.pick_key(g), {}).get("winograd")
    if pick is not None:
        return pick
    t = winograd.GPU_TILE
    chunks = -(-g.rank_in // t.chunk)
    return winograd.WinogradTile(t.tiles, t.oc_block, t.chunk, t.reg_oc, t.reg_tile, min(t.splits, chunks))
