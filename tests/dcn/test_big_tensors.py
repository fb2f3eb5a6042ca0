"""Big tensors: 64-bit indexing, launch grids within device limits, clear errors for what
the kernels cannot do.

Host-side tests (run everywhere, allocate nothing big): launch configurations and
grids for huge geometries, the column-buffer chunking, the size limits of
``arguments.check_limits``, and an audit gate on 32-bit integer casts in the kernels.

GPU tests (skipped in the simulator): a layer whose input has more than 2**31
elements (N=1, C=8, 16400 x 16400, a 1x1 deformable kernel), checked on *every*
output element against a vectorised CuPy evaluation of the same formula, for every
forward and backward method; and a batch past the 65535 limit of gridDim.y/z. Run
them on a GPU with::

    DEFTNUMBA_BACKEND=cuda python -m pytest tests/test_big_tensors.py -v
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import reference
from deftnumba.dcn import geometry as arguments
from deftnumba.dcn.geometry import Geometry
from deftnumba.dcn.kernels import im2col

from .test_fuzz import backward_methods

GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535
BLOCK_MAX = 1024
INT32_MAX = 2**31 - 1


def geometry(n=1, c=8, h=16400, w=16400, c_out=1, k=1, pad=0, stride=1, dil=1, groups=1, offset_groups=1,
             mask=True, bias=True, dtype="float32") -> Geometry:
    return Geometry(batch=n, in_channels=c, height=h, width=w, out_channels=c_out, kernel_h=k, kernel_w=k,
                    stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad, dil_h=dil, dil_w=dil, groups=groups,
                    offset_groups=offset_groups, has_mask=mask, has_bias=bias, dtype=dtype)


HUGE = {
    "input-past-2**31": geometry(),
    "deft64-batch-4096": geometry(n=4096, c=64, h=64, w=64, c_out=64, k=3, pad=1),
    "batch-70000": geometry(n=70000, c=4, h=8, w=8, c_out=4, k=3, pad=1),
    "batch-1e6-1px": geometry(n=10**6, c=1, h=1, w=1, c_out=1, k=1),
    "wide-4096ch-3x3": geometry(n=8, c=4096, h=32, w=32, c_out=4096, k=3, pad=1),
    "depthwise-100k": geometry(n=2, c=100_000, h=4, w=4, c_out=100_000, groups=100_000, k=3, pad=1),
    "5x5-dilated-det": geometry(n=16, c=256, h=200, w=272, c_out=256, k=5, pad=4, dil=2),
    "7x7-groups": geometry(n=4, c=256, h=100, w=100, c_out=256, k=7, pad=3, groups=4, offset_groups=4),
}


# --------------------------------------------------------------------------- host side
@pytest.fixture
def gpu_rules(monkeypatch):
    """Compute launch configurations as the cuda backend would, without a GPU."""
    monkeypatch.setattr(backend, "IS_SIMULATOR", False)


@pytest.mark.parametrize("threads", [32, 128, 256, 1024])
def test_launch_config_is_within_device_limits_for_any_size(gpu_rules, threads):
    for total in (0, 1, threads - 1, threads + 1, INT32_MAX, 2**31, 2**32 + 3, 2**40, 2**62):
        blocks, per_block = backend.launch_config(total, threads)
        assert 1 <= blocks <= GRID_X_MAX and 1 <= per_block <= BLOCK_MAX
        assert blocks <= 65536  # grid-stride loops cover the rest
        if total <= blocks * per_block:
            assert blocks == max(1, -(-total // per_block))


def test_kernel_indices_come_from_64_bit_grid_stride_loops():
    """Every 1-D kernel loops ``for idx in range(cuda.grid(1), total, cuda.gridsize(1))``:
    ``cuda.grid`` and ``cuda.gridsize`` are int64 in numba-cuda, and ``total`` is a product
    of array shapes (intp). Kernels indexing from ``cuda.blockIdx`` / ``threadIdx`` instead
    (int32 registers) must be listed here after an audit."""
    audited_block_indexing = {
        "fused_tiled.py",  # blockIdx.{x,y,z} < 2**31, used in int64 products
        # 2-D grid-stride loops (x over pixels, y over rows, each capped at 65535 blocks); indices
        # are uint32 only in the narrow variant, launched for index spaces below 2**31 (needs_wide)
        "im2col.py",
        "fused_columns.py",  # as im2col.py
        # uint32 in-image offsets (backward_fused.supported: < 2**32 elements per image, else
        # fused_columns runs), uint64 image bases
        "backward_fused.py",
        # gather_staged_kernel: uint32 in-image offsets as backward_fused.py (it is fused's
        # deterministic gather); the segment index and grad_out bases uint64; launched in
        # slices of <= 65535 channel blocks (y) and images (z) from block0 and image0
        "backward.py",
    }
    for path in sorted((Path(dn.__file__).parent / "dcn" / "kernels").glob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if re.search(r"cuda\.(blockIdx|threadIdx|blockDim)", code):
            assert path.name in audited_block_indexing, (
                f"{path.name} indexes from cuda.blockIdx/threadIdx: audit it for int32 overflow and grid "
                f"limits (y, z <= 65535), then add it to audited_block_indexing")


# Every 32-bit cast inside the kernel modules, audited. Key: (file, source text of the cast).
AUDITED_INT32 = {
    ("sampling.py", "np.int32(f)"): "bilinear_axis runs only inside the band -1 < v < size (in_band), "
                                    "so |floor(v)| <= max(H, W) < 2**31 (check_limits)",
    ("sampling.py", "np.int32(v)"): "stride/padding/dilation/kernel size < 2**31 (check_limits)",
    ("sampling.py", "np.int32(lo + 1)"): "lo = floor(v) < size <= 2**31 - 1 inside the band",
    ("sampling.py", "np.int32(0)"): "a constant",
    ("sampling.py", "np.int32(size - 1)"): "size is H or W, 1 <= size < 2**31 (check_limits)",
    ("im2col.py", "np.int32(g.offset_groups * g.taps)"): "one offset channel count, 2*G*K < 2**31 (an array dim)",
    ("im2col.py", "np.int32(g.out_h)"): "Ho*Wo < 2**31 (check_limits)",
    ("im2col.py", "np.int32(g.out_w)"): "Ho*Wo < 2**31 (check_limits)",
    ("im2col.py", "np.int32(v)"): "C, H, W, G (array dims) and Ho*Wo < 2**31 (check_limits)",
    ("fused_columns.py", "np.int32(oy)"): "as im2col.py's",
    ("fused_columns.py", "np.int32(ox)"): "as im2col.py's",
    ("fused_columns.py", "np.int32(i)"): "as im2col.py's",
    ("fused_columns.py", "np.int32(j)"): "as im2col.py's",
    ("fused_columns.py", "np.int32(v)"): "C, H, W, G (array dims), Ho, Wo < 2**31 (check_limits)",
    ("im2col.py", "np.int32(oy)"): "oy < Ho < 2**31; the products with stride and dilation stay within "
                                   "the extent check_limits bounds (< 2**24 in float32, < 2**31 in float64)",
    ("im2col.py", "np.int32(ox)"): "as np.int32(oy)",
    ("im2col.py", "np.int32(i)"): "i < kernel_h < 2**31 (check_limits)",
    ("im2col.py", "np.int32(j)"): "j < kernel_w < 2**31 (check_limits)",
    ("sampling.py", "np.int32(np.uint32(tap) // np.uint32(kw))"): "tap < kh*kw < 2**31 (check_limits)",
    ("sampling.py", "np.int32(tap)"): "tap < kh*kw < 2**31 (check_limits)",
    ("backward_fused.py", "np.int32(v)"): "_dims: C, H, W, Co, Cg, the span, N, C/G, Ho, Wo, each < 2**31 "
                                          "(check_limits); in-kernel products are wrapped in uint32 and "
                                          "bounded by backward_fused.supported (< 2**32 per image)",
    ("backward.py", "np.int32(first)"): "the first image of a gather call, < N < 2**31",
    ("backward.py", "np.int32(g.offset_groups)"): "G <= C < 2**31",
    ("backward.py", "np.int32(g.out_channels)"): "Co < 2**31; gather_staged multiplies it with an image index in uint64",
    ("backward.py", "np.int32(g.in_channels // g.groups)"): "Cg <= C < 2**31",
    ("backward.py", "np.int32(block0)"): "a launch's first channel block, < C/CB < 2**31",
    ("backward.py", "np.int32(image0)"): "a launch's first image within the sort part, < N < 2**31",
    ("backward.py", "np.int32(row0)"): "a sort part's first output row, < Ho, and Ho*Wo < 2**31 (check_limits)",
    ("backward.py", "np.int32(part_rows)"): "output rows of a sort part, <= Ho < 2**31 (check_limits)",
    ("backward.py", "np.int32(id_bits)"): "a key's id bits, <= 64 (sort_key_layout raises beyond)",
    ("backward.py", "np.int32(g.height)"): "H < 2**31; products with it are int64 in numba",
    ("backward.py", "np.int32(g.width)"): "W < 2**31; products with it are int64 in numba",
    ("fused_tiled.py", "np.int32(v)"): "kernel_dims: C, H, W, Cout, Ho, Wo and 2*G*K < 2**31 (check_limits)",
    # tap_position_at's integer part of a sampling position, oy*sh + i*dh - ph (and the same in x):
    # each term and sum within the input extent that check_limits bounds (< 2**24 in float32,
    # < 2**31 in float64), as im2col.py's np.int32(oy) products
    **{("sampling.py", text): "tap_position_at: a sampling position's integer part and its terms, within the "
                              "extent check_limits bounds (< 2**31)"
       for text in ("np.int32(oy * np.uint32(sh))", "np.int32(i * np.uint32(dh))",
                    "np.int32(ox * np.uint32(sw))", "np.int32(j * np.uint32(dw))",
                    "np.int32(np.int32(oy * np.uint32(sh)) + np.int32(i * np.uint32(dh)))",
                    "np.int32(np.int32(ox * np.uint32(sw)) + np.int32(j * np.uint32(dw)))",
                    "np.int32(np.int32(np.int32(oy * np.uint32(sh)) + np.int32(i * np.uint32(dh))) - ph)",
                    "np.int32(np.int32(np.int32(ox * np.uint32(sw)) + np.int32(j * np.uint32(dw))) - pw)")},
    ("fused_tiled.py", "np.int32(y0)"): "first block index in y < groups * oc_blocks <= Cout < 2**31",
}

# Module-level aliases of np.int32 / np.uint32 (``I32 = np.int32``): every call through them
# is a 32-bit cast, audited here as a whole with the bound that holds for all of them.
AUDITED_INT32_ALIASES = {
    ("backward.py", "u32"): "grid-stride counters and their 32-bit divisions (only in the narrow variant: "
                            "index_is_narrow) and offsets inside one input plane (H*W < 2**32: "
                            "check_backward); image bases are u64",
    ("fused_tiled.py", "I32"): "indices inside one image plane or tile (|v| <= H*W, Ho*Wo, output "
                               "coordinates < 2**24): planes past 2**30 elements get the wide_index "
                               "variant (PLANE = int64; needs_wide_index); image bases stay int64",
    ("fused_tiled.py", "U32"): "thread, tile, channel-block and shared-memory indices (< 2**31: "
                               "grid and shared-memory limits), in-image indices as for I32, and "
                               "offsets from a channel's plane across the chunk's channels (IMG: "
                               "< C*H*W < 2**31, else the wide_index variant makes them int64; "
                               "needs_wide_index)",
}


def _int32_casts(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "int32"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "np"):
            yield node.lineno, ast.unparse(node)


def _int32_aliases(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
                and node.value.attr in ("int32", "uint32") and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "np"):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    yield node.lineno, target.id


def test_every_int32_cast_in_the_kernels_is_audited():
    """A cast to int32 of a product of sizes is how a kernel indexes memory from an
    overflowed integer. New casts fail here until audited (add them to AUDITED_INT32)."""
    unaudited = []
    for path in sorted((Path(dn.__file__).parent / "dcn" / "kernels").glob("*.py")):
        for line, text in _int32_casts(path):
            if (path.name, text) not in AUDITED_INT32:
                unaudited.append(f"{path.name}:{line}: {text}")
        for line, alias in _int32_aliases(path):
            if (path.name, alias) not in AUDITED_INT32_ALIASES:
                unaudited.append(f"{path.name}:{line}: {alias} = a 32-bit type (list it in AUDITED_INT32_ALIASES)")
    assert not unaudited, ("32-bit casts to audit for overflow (then list them in AUDITED_INT32 with "
                           "the bound that makes them safe): " + "; ".join(unaudited))


class _NoMemory:
    """An array module whose arrays take no memory (zero strides): for host-side planning."""

    @staticmethod
    def empty(shape, dtype):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


@pytest.mark.parametrize("name", list(HUGE))
def test_column_chunks_bound_the_buffer_and_cover_every_image(name):
    g = HUGE[name]
    pixels, rows = g.out_h * g.out_w, g.in_channels * g.taps
    firsts = []
    for first, cols in im2col.column_chunks(g, _NoMemory, np.float32):
        n_chunk = cols.shape[1] // pixels
        assert cols.shape == (rows, n_chunk * pixels) and 1 <= n_chunk <= im2col.CHUNK_IMAGES
        assert n_chunk == 1 or cols.size <= INT32_MAX  # one image alone may be bigger
        assert cols.shape[1] <= INT32_MAX  # the GEMM's n
        firsts.append((first, n_chunk))
        if len(firsts) > 3:
            break
    assert firsts[0][0] == 0 and all(b[0] == a[0] + a[1] for a, b in zip(firsts, firsts[1:]))


def _fused_tiled():
    return pytest.importorskip("deftnumba.kernels.fused_tiled")


def _grid_ok(grid, threads):
    x, y, z = (tuple(grid) + (1, 1))[:3]
    return 1 <= x <= GRID_X_MAX and 1 <= y <= GRID_YZ_MAX and 1 <= z <= GRID_YZ_MAX and 1 <= threads <= BLOCK_MAX


def _fused_configs(g):
    """The fused kernel's tile configs for ``g``: ``default_config`` and the plan ops runs."""
    ft = _fused_tiled()
    configs = {"default_config": ft.default_config(g)}
    if g.batch * g.out_h * g.out_w < 10**8:  # the planner takes ~20 s on a 16400^2 image
        tiling = pytest.importorskip("deftnumba.tiling")
        configs["plan_for(fused)"] = tiling.plan_for(g, methods=("fused",), device=tiling.H200).tile
    return configs


def _launch_grids(cfg, g):
    """``(grid, first_image, images, first_block_y, blocks_y)`` of every launch of the fused kernel."""
    tiles = cfg.blocks(g)[0] if hasattr(cfg, "blocks") else cfg.grid(g)[0]
    if not hasattr(cfg, "launches"):  # one launch of the whole grid
        x, y, z = cfg.grid(g)
        return [((x, y, z), 0, z, 0, y)]
    return [((tiles, blocks_y, images), first, images, y0, blocks_y)
            for first, images, y0, blocks_y in cfg.launches(g)]


@pytest.mark.parametrize("name", list(HUGE))
def test_fused_launches_are_within_device_limits(gpu_rules, name):
    """The fully fused kernel's 3-D grids (tiles, groups*oc_blocks, images) stay within CUDA's
    limits for any batch and group count, and together cover every block exactly once."""
    g = HUGE[name]
    for source, cfg in _fused_configs(g).items():
        launches = _launch_grids(cfg, g)
        for grid, *_ in launches:
            assert _grid_ok(grid, cfg.threads), (source, grid, cfg.threads)
        assert cfg.shared_bytes(g) <= 48 * 1024, source
        total_y = -(-(g.out_channels // g.groups) // cfg.oc_block) * g.groups
        covered = Counter()
        for _, first, images, y0, blocks_y in launches:
            covered[(first, images)] += blocks_y
            assert 0 <= y0 and y0 + blocks_y <= total_y
        assert sum(images for first, images in covered) == g.batch, source
        assert all(v == total_y for v in covered.values()), source
        firsts = sorted(covered)
        assert firsts[0][0] == 0 and all(b[0] == a[0] + a[1] for a, b in zip(firsts, firsts[1:]))


def test_fused_split_launches_are_exact(monkeypatch, rng):
    """Past 65535 blocks in y or z the fused kernel splits its launch; with the limit
    lowered to 2 the split path runs here on a tiny layer and must match the reference."""
    ft = _fused_tiled()
    if not hasattr(ft, "GRID_YZ_LIMIT"):
        pytest.skip("this fused_tiled has no launch splitting")
    monkeypatch.setattr(ft, "GRID_YZ_LIMIT", 2)
    g = geometry(n=3, c=4, h=3, w=4, c_out=4, k=3, pad=1, groups=2, offset_groups=2)
    s = g.shapes
    x = rng.standard_normal(s["input"]).astype(np.float32)
    off = (rng.standard_normal(s["offset"]) * 1.5).astype(np.float32)
    w = rng.standard_normal(s["weight"]).astype(np.float32)
    b = rng.standard_normal(s["bias"]).astype(np.float32)
    m = rng.uniform(0.1, 1, s["mask"]).astype(np.float32)
    cfg = ft.TileConfig(tile_h=2, tile_w=2, halo=1, chunk=1, oc_block=1, reg_oc=1, reg_px=1)
    assert len(list(cfg.launches(g))) == 4  # 2 batch slices x 2 slices of the 4 y-blocks
    out = backend.to_device(np.full(s["output"], np.nan, np.float32))
    with backend.bounds_checked() if backend.IS_SIMULATOR else contextlib.nullcontext():
        ft.forward(g, *[backend.to_device(a) for a in (x, off, w, b, m)], out, plan=cfg)
    expected = reference.deform_conv2d(x, off, w, b, padding=1, mask=m)
    np.testing.assert_allclose(backend.to_host(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, dil", [(7, 1), (9, 2), (11, 1), (15, 1)])
def test_fused_default_tile_fits_shared_memory_for_large_kernels(gpu_rules, k, dil):
    ft = _fused_tiled()
    g = geometry(n=2, c=64, h=64, w=64, c_out=64, k=k, pad=k // 2 * dil, dil=dil)
    cfg = ft.default_config(g)
    assert cfg.shared_bytes(g) <= 48 * 1024, (cfg, cfg.shared_bytes(g))


def test_sizes_the_kernels_cannot_index_are_rejected_before_any_launch():
    """``check_limits`` on zero-memory (broadcast) arrays: nothing is allocated."""
    def call(n, c, h, w, k=1, dtype=np.float32, **conv):
        z = np.zeros((), dtype)
        g = geometry(n=n, c=c, h=h, w=w, k=k, pad=conv.get("padding", 0), stride=conv.get("stride", 1),
                     dil=conv.get("dilation", 1), dtype=np.dtype(dtype).name)
        arrs = [np.broadcast_to(z, g.shapes[name]) for name in ("input", "offset", "weight")]
        return arguments.check_forward(arrs[0], arrs[1], arrs[2], None, conv.get("stride", 1),
                                       conv.get("padding", 0), conv.get("dilation", 1), None)

    assert call(1, 8, 16400, 16400).in_channels == 8  # 2.15e9 elements: fine
    assert call(2**16, 64, 64, 64).batch == 2**16
    with pytest.raises(ValueError, match="use float64"):
        call(1, 1, 2**24 + 8, 2)
    assert call(1, 1, 2**24 + 8, 2, dtype=np.float64).height == 2**24 + 8
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        call(1, 1, 46341, 46341, dtype=np.float64)
    with pytest.raises(ValueError, match="stride must be < 2"):
        call(1, 1, 4, 4, stride=2**31)


def test_batch_past_one_column_chunk(rng):
    """More images than one column chunk (32): every method, forward; chunk seams are exact."""
    g = geometry(n=im2col.CHUNK_IMAGES + 3, c=2, h=2, w=3, c_out=2, k=1)
    s = g.shapes
    x = rng.standard_normal(s["input"]).astype(np.float32)
    off = (rng.standard_normal(s["offset"]) * 0.7).astype(np.float32)
    w = rng.standard_normal(s["weight"]).astype(np.float32)
    b = rng.standard_normal(s["bias"]).astype(np.float32)
    m = rng.uniform(0.1, 1, s["mask"]).astype(np.float32)
    expected = reference.deform_conv2d(x, off, w, b, mask=m)
    for method in dn.METHODS:
        out = backend.to_host(dn.deform_conv2d(x, off, w, b, mask=m, method=method))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=method)


# --------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(backend.IS_SIMULATOR, reason="needs a GPU: DEFTNUMBA_BACKEND=cuda")


def _free_gib():
    cp = backend.cupy()
    cp.get_default_memory_pool().free_all_blocks()
    return cp.cuda.Device().mem_info[0] / 2**30


def _expected_1x1(xp, x, offset, mask, weight, bias, grad_out=None):
    """The 1x1 deformable layer (stride 1, no padding), vectorised in ``xp`` (CuPy on the GPU;
    NumPy in ``test_the_gpu_oracle_matches_the_reference``), channel by channel.

    Same formulas as ``reference`` (float64 arithmetic; the corner tables are stored in
    float32/int32 to halve their memory). Returns the output ``[1, Cout, H, W]`` and, with
    ``grad_out``, the gradients ``(input, offset, mask, weight[Cout, C])``.
    """
    n, c, h, w = x.shape
    iy = xp.arange(h, dtype=xp.float64)[:, None]
    ix = xp.arange(w, dtype=xp.float64)[None, :]
    y = iy + offset[0, 0].astype(xp.float64)
    xx = ix + offset[0, 1].astype(xp.float64)
    # the gradient band, closed at -1 (sampling.py's rule): there the weights vanish but the
    # one-sided derivative from inside does not
    inside = (y >= -1) & (y < h) & (xx >= -1) & (xx < w)
    y = xp.where(inside, y, 0)
    xx = xp.where(inside, xx, 0)
    y0 = xp.floor(y).astype(xp.int32)
    x0 = xp.floor(xx).astype(xp.int32)
    ly, lx = y - y0, xx - x0
    del y, xx
    m = mask[0, 0].astype(xp.float64)
    corners = []
    for cy, wy, dy in ((y0, 1 - ly, -1.0), (y0 + 1, ly, 1.0)):
        for cx, wx, dx in ((x0, 1 - lx, -1.0), (x0 + 1, lx, 1.0)):
            ok = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            flat = (xp.clip(cy, 0, h - 1) * w + xp.clip(cx, 0, w - 1)).astype(xp.int32)  # H*W < 2**31
            corners.append((flat, xp.where(ok, wy * wx, 0).astype(xp.float32),
                            xp.where(ok, dy * wx, 0).astype(xp.float32), xp.where(ok, wy * dx, 0).astype(xp.float32)))
    del y0, x0, ly, lx, inside
    wgt = weight[:, :, 0, 0].astype(xp.float64)
    out = xp.zeros((weight.shape[0], h, w), xp.float64)
    if grad_out is not None:
        go = grad_out[0].astype(xp.float64)  # [Cout, H, W]
        g_in = xp.zeros((c, h * w), xp.float32)
        g_y = xp.zeros((h, w), xp.float64)
        g_x = xp.zeros((h, w), xp.float64)
        g_m = xp.zeros((h, w), xp.float64)
        g_w = xp.zeros(weight.shape[:2], xp.float64)
    for ch in range(c):
        plane = x[0, ch].reshape(-1)
        sample = xp.zeros((h, w), xp.float64)
        for flat, wq, _, _ in corners:
            sample += wq * plane[flat]
        out += wgt[:, ch, None, None] * (m * sample)[None]
        if grad_out is not None:
            gcol = xp.tensordot(wgt[:, ch], go, axes=1)  # [H, W]
            for flat, wq, dyq, dxq in corners:
                v = plane[flat].astype(xp.float64)
                g_y += gcol * dyq * v
                g_x += gcol * dxq * v
                g_in[ch] += xp.bincount(flat.reshape(-1), weights=(gcol * m * wq).reshape(-1),
                                        minlength=h * w).astype(xp.float32)
            g_m += gcol * sample
            g_w[:, ch] = (go * (m * sample)[None]).sum(axis=(1, 2))
            del gcol
        del sample
    if bias is not None:
        out += bias.astype(xp.float64)[:, None, None]
    grads = None
    if grad_out is not None:
        grads = (g_in.reshape(1, c, h, w), xp.stack([g_y * m, g_x * m])[None], g_m[None, None], g_w)
    return out[None], grads


def test_the_gpu_oracle_matches_the_reference(rng):
    """``_expected_1x1`` (the GPU tests' oracle) run with NumPy against ``reference``."""
    x = rng.standard_normal((1, 3, 6, 7))
    offset = rng.integers(-20, 21, (1, 2, 6, 7)) / 8
    mask = rng.uniform(0.1, 1, (1, 1, 6, 7))
    weight = rng.standard_normal((2, 3, 1, 1))
    bias = rng.standard_normal(2)
    grad_out = rng.standard_normal((1, 2, 6, 7))
    out, (g_in, g_off, g_m, g_w) = _expected_1x1(np, x, offset, mask, weight, bias, grad_out)
    np.testing.assert_allclose(out, reference.deform_conv2d(x, offset, weight, bias, mask=mask), rtol=1e-6)
    ref = reference.deform_conv2d_backward(grad_out, x, offset, weight, bias, mask=mask)
    np.testing.assert_allclose(g_in, ref.input, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_off, ref.offset, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_m, ref.mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_w, ref.weight[:, :, 0, 0], rtol=1e-5, atol=1e-6)


def _big_layer(cp, seed=0):
    rs = cp.random.RandomState(seed)
    n, c, h, w = 1, 8, 16400, 16400
    assert n * c * h * w > 2**31
    x = rs.standard_normal((n, c, h, w), dtype=cp.float32)
    # multiples of 1/8 up to +-2.5 px: exact in float32 even at coordinate 16400
    offset = (rs.randint(-20, 21, (n, 2, h, w)).astype(cp.float32) / 8).astype(cp.float32)
    mask = rs.uniform(0.1, 1.0, (n, 1, h, w), dtype=cp.float32)
    weight = rs.standard_normal((2, c, 1, 1), dtype=cp.float32)
    bias = rs.standard_normal((2,), dtype=cp.float32)
    return x, offset, mask, weight, bias


def _assert_close(cp, got, want, what, rtol=2e-5):
    want = cp.asarray(want, cp.float64)
    err = float(cp.abs(got.astype(cp.float64) - want).max())
    scale = float(cp.abs(want).max())
    assert bool(cp.isfinite(got).all()), f"{what}: non-finite values"
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} (scale {scale:.3g})"


@gpu
@pytest.mark.parametrize("method", list(dn.METHODS))
def test_forward_on_an_input_past_2_31_elements(method):
    cp = backend.cupy()
    if _free_gib() < 60:
        pytest.skip("needs ~60 GiB of free GPU memory")
    x, offset, mask, weight, bias = _big_layer(cp)
    out = dn.deform_conv2d(x, offset, weight, bias, mask=mask, method=method)
    cp.cuda.runtime.deviceSynchronize()
    expected, _ = _expected_1x1(cp, x, offset, mask, weight, bias)
    _assert_close(cp, out, expected, f"forward[{method}]")
    # and a few pixels, including the last ones (past 2**31 in flat index), against the reference
    for oy, ox in ((0, 0), (16399, 16399), (16399, 0), (8191, 12345)):
        ys, xs = slice(max(0, oy - 3), oy + 4), slice(max(0, ox - 3), ox + 4)
        crop = reference.deform_conv2d(x[:, :, ys, xs].get(), offset[:, :, ys, xs].get(), weight.get(),
                                       bias.get(), mask=mask[:, :, ys, xs].get())
        np.testing.assert_allclose(out[0, :, oy, ox].get(), crop[0, :, oy - ys.start, ox - xs.start],
                                   rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("method", backward_methods() or ["none"])
def test_backward_on_an_input_past_2_31_elements(method, deterministic):
    if method == "none":
        pytest.skip("no backward")
    cp = backend.cupy()
    if _free_gib() < 110:
        pytest.skip("needs ~110 GiB of free GPU memory")
    x, offset, mask, weight, bias = _big_layer(cp)
    grad_out = cp.random.RandomState(1).standard_normal((1, 2, 16400, 16400), dtype=cp.float32)
    grads = dn.deform_conv2d_backward(grad_out, x, offset, weight, bias, mask=mask, method=method,
                                      deterministic=deterministic)
    cp.cuda.runtime.deviceSynchronize()
    got = {k: grads[i] for i, k in enumerate(("input", "offset", "weight", "bias", "mask"))}
    _, (g_in, g_off, g_m, g_w) = _expected_1x1(cp, x, offset, mask, weight, bias, grad_out)
    _assert_close(cp, got["input"], g_in, "grad input")
    _assert_close(cp, got["offset"], g_off, "grad offset", rtol=1e-4)
    _assert_close(cp, got["mask"], g_m, "grad mask", rtol=1e-4)
    _assert_close(cp, got["weight"].reshape(2, 8), g_w, "grad weight", rtol=1e-3)


@gpu
@pytest.mark.parametrize("method", list(dn.METHODS))
def test_batch_past_the_65535_grid_limit(method):
    cp = backend.cupy()
    rs = cp.random.RandomState(2)
    n = 65535 + 7
    x = rs.standard_normal((n, 2, 3, 3), dtype=cp.float32)
    offset = rs.standard_normal((n, 2, 3, 3), dtype=cp.float32)
    mask = rs.uniform(0.1, 1, (n, 1, 3, 3), dtype=cp.float32)
    weight = rs.standard_normal((4, 2, 1, 1), dtype=cp.float32)
    out = dn.deform_conv2d(x, offset, weight, None, mask=mask, method=method).get()
    expected = reference.deform_conv2d(x.get(), offset.get(), weight.get(), None, mask=mask.get())
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_backward_refuses_input_planes_of_2_to_the_32_pixels():
    """The column methods scatter inside one input plane with 32-bit offsets: a plane of 2**32
    pixels or more is a clear error before anything is allocated (zero-stride views here)."""
    h, w = 65536, 65537  # h*w > 2**32
    x = np.broadcast_to(np.float64(1.0), (1, 1, h, w))
    out_h, out_w = (h + 1) // 2, (w + 1) // 2  # stride 2: fewer than 2**31 output pixels
    offset = np.broadcast_to(np.float64(0.0), (1, 2, out_h, out_w))
    weight = np.ones((1, 1, 1, 1))
    grad_output = np.broadcast_to(np.float64(1.0), (1, 1, out_h, out_w))
    with pytest.raises(ValueError, match="planes below 2\\*\\*32"):
        dn.deform_conv2d_backward(grad_output, x, offset, weight, stride=2)
