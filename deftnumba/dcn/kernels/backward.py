"""The backward of deformable convolution: gradients of input, offset, mask, weight, bias.

Notation, per chunk of ``Nc`` images: ``C`` input channels, ``Cout`` outputs,
``Gw`` weight groups (``Cg = C/Gw`` inputs and ``Og = Cout/Gw`` outputs each),
``G`` offset groups (``C/G`` channels each), ``K = kh*kw`` taps, ``P = Ho*Wo``
output pixels, ``HW = H*W`` input pixels, ``s`` the itemsize. A *sample* is one
(image, offset group, tap, output pixel): it has one position ``(y, x)``, one
mask value ``m`` and four corners, shared by the ``C/G`` channels of its group.

Given ``grad_out = dL/d out``, the chain rule through ``out = W (x) cols + b``
and ``cols[c, k, p] = m * bilinear(I[c], y, x)`` gives

* ``grad_cols[c*K + k, n*P + p] = sum_o W[o, c mod Cg, k] * grad_out[n, o, p]``
  (``o`` over the outputs of ``c``'s weight group): one GEMM ``W^T @ grad_out``
  per weight group;
* ``grad_input[n, c, corner] += grad_cols * m * w_corner(y, x)`` (col2im: a
  scatter, because any sample may land on any pixel);
* ``grad_offset_y = m * sum_{c in group} grad_cols * sum_corners dw/dy * I[c, corner]``
  (and ``x`` alike), ``grad_mask = sum_{c in group} grad_cols * bilinear(I[c], y, x)``;
* ``grad_weight = grad_out @ cols^T`` per weight group, with ``cols`` recomputed
  (never stored by the forward): by the forward's ``im2col`` kernels for the
  ``im2col`` method, by the sample pass itself for the fused methods;
* ``grad_bias = sum of grad_out over N, Ho, Wo``.

The bilinear rule, its corners and their derivatives come from
``sampling.py`` (``bilinear_corners``, ``bilinear_corner_gradients``): samples
outside the band ``-1 < y < H, -1 < x < W`` (or non-finite) give zero value,
zero input and mask gradient, and zero offset gradient except exactly on
``y = -1`` or ``x = -1``, where the offset gradient is the one-sided derivative
from inside, as in torchvision (see ``sampling.py``); corners outside the image count zero.

Methods (``ops`` keeps the registry)
------------------------------------
``im2col``         torchvision's design. GEMM -> ``grad_cols`` in device memory ->
                   ``col2im_kernel`` (one thread per column element, atomics) ->
                   ``sample_kernel`` for offset and mask gradients (one thread per
                   sample looping over its group's channels; torchvision uses one
                   thread per offset *element*, i.e. twice the work and a second
                   pass for the mask). Positions are computed twice and
                   ``grad_cols`` is read twice.
``fused_columns``  GEMM -> ``grad_cols`` -> one ``sample_kernel`` pass: position,
                   corners and derivative weights once per sample, then per
                   channel one read of ``grad_cols`` and of the four corners
                   feeds the input scatter, the offset and the mask gradients,
                   and the same four corners give the forward's column, stored
                   for the weight-gradient GEMM (no separate recompute pass).
``fused_gemm``     (retired from ``ops.BACKWARD_METHODS`` in favour of ``backward_fused.py``'s
                   column-free ``fused``; kept here for comparison) no ``grad_cols`` buffer at all: ``sample_kernel`` computes each
                   ``grad_cols`` element as the dot product over ``Og`` outputs
                   from ``W`` and ``grad_out`` (read through L1/L2), so the
                   ``C*K*P`` column matrix is never written nor read back. The
                   same FLOPs, but on CUDA cores in a plain loop rather than in
                   cuBLAS: it saves traffic, not time, unless the layer is
                   memory-bound (small ``Og``).

Determinism
-----------
The atomic scatter sums into ``grad_input`` in whatever order threads arrive, so
float results vary from run to run. ``deterministic=True`` replaces it with a
sort-then-segment reduction whose order is fixed:

1. ``entries_kernel``: each sample writes its four (destination, coefficient,
   source) entries, destination = ``(image, offset group, y, x)`` flattened,
   coefficient = ``m * w_corner``, source = ``tap*P + p``. The key is *per
   offset group*, not per channel: every channel of a group has the same
   destinations, so one sort of ``4*Nc*G*K*P`` entries serves all ``C/G``
   channels (torchvision-style per-element keys would sort ``C/G`` times more).
   Corners of zero weight get a sentinel key past the last segment.
2. ``argsort(kind="stable")`` of the keys (NumPy and CuPy's stable sorts are
   deterministic: equal keys keep their entry order), then ``searchsorted`` gives
   each destination's segment ``[start, end)``.
3. ``gather_kernel``: one thread per ``(image, channel, y, x)`` sums its segment
   in sorted order and writes ``grad_input`` once (no atomics, no zero fill).
   It reads ``grad_cols``; with ``fused_gemm``, which has no ``grad_cols``, it
   recomputes each element per corner (4x the column-gradient GEMM's work on
   CUDA cores: the price of keeping that method buffer-free).

Why sort rather than e.g. a per-pixel search over all samples: any sample can
land on any pixel, so a gather without an index costs ``O(K*P)`` per pixel; a
sort builds that index in ``O(entries)`` device-wide passes, and the segment
sums keep a fixed order without any atomics or per-thread scratch.

Offset and mask gradients never need atomics here: one thread owns each
sample and loops over the channels in a fixed order. The weight and bias
gradients are GEMMs and sums over fixed shapes (cuBLAS is bit-reproducible
for a given GPU and shape unless atomics mode is enabled). So with
``deterministic=True`` two runs are bit-identical.

Images go in chunks of at most ``im2col.CHUNK_IMAGES`` so every temporary
(``grad_cols``, recomputed ``cols``, sort entries) is bounded.

Precision: kernel factories take the layer's storage dtype. ``grad_output``, input,
offset and mask are read through ``load`` (``runtime.precision``: float16/bfloat16 stay
half in memory); the weights, the gradients, ``grad_cols``, the columns and the sort
coefficients are in the compute dtype (float32 for the halves; ``ops`` rounds the
gradients to the storage dtype once at the end). The GEMMs run in the compute dtype,
on per-chunk compute copies of ``grad_output`` (``_grad_out_by_group`` copies anyway).
"""

from __future__ import annotations

import functools

import numpy as np

from ...runtime import backend, precision
from ...runtime.backend import cuda
from . import im2col
from .atomics import red_add
from .im2col import launch
from .sampling import conv_tuple, sampling_functions

u32 = np.uint32
u64 = np.uint64


@functools.cache
def _split_index_function(narrow: bool):
    """Device function ``split_index(idx, a, b, c) -> (idx % a, idx // a % b, idx // (a*b) % c,
    idx // (a*b*c))`` as int32 values, dividing in 32 bits when ``narrow`` (the launch's index
    space below 2**32: no 64-bit division calls) and in 64 bits otherwise."""
    IDX = np.uint32 if narrow else np.uint64
    i32 = np.int32

    @cuda.jit(device=True, inline=True)
    def split_index(idx, a, b, c):
        a_ = IDX(a)
        b_ = IDX(b)
        c_ = IDX(c)
        rest = IDX(idx // a_)
        first = IDX(idx - rest * a_)
        rest2 = IDX(rest // b_)
        second = IDX(rest - rest2 * b_)
        rest3 = IDX(rest2 // c_)
        third = IDX(rest2 - rest3 * c_)
        return i32(first), i32(second), i32(third), i32(rest3)

    return split_index


def index_is_narrow(total: int) -> bool:
    """Whether a grid-stride launch over ``total`` items can count in uint32 (the index plus one
    grid's worth of threads stays below 2**32)."""
    return int(total) + 65536 * 1024 < 2**32


@functools.cache
def _grad_column_function(dtype):
    """Device function: one element of ``grad_cols`` from ``W`` (compute dtype) and ``grad_out``
    (storage dtype, read through ``load``)."""
    fns = sampling_functions(dtype)
    ZERO = fns.ZERO
    load = fns.load

    @cuda.jit(device=True, inline=True)
    def grad_column(weight, grad_output, n, c, i, j, oy, ox, channels):
        """``sum_o W[o, c mod Cg, i, j] * grad_out[n, o, oy, ox]`` over ``c``'s weight group."""
        per_group = weight.shape[1]
        group = c // per_group
        outs = weight.shape[0] * per_group // channels
        c_local = c - group * per_group
        acc = ZERO
        for o in range(group * outs, (group + 1) * outs):
            acc += weight[o, c_local, i, j] * load(grad_output, (n, o, oy, ox))
        return acc

    return grad_column


# Traffic (per image, atomic col2im, one thread per column element):
#   reads grad_cols C*K*P*s (coalesced), offsets 2*G*K*P*s and the mask G*K*P*s once per
#   channel of the group (C*K*P*3*s through L1/L2); 4 atomic adds per element into
#   grad_input (C*K*P*4 read-modify-writes of s bytes, landing in L2; C*H*W*s to DRAM).
# FLOPs: ~20 per element for position and corners, 5 for the four products.
@functools.cache
def col2im_kernel(dtype, use_mask: bool, narrow: bool = True):
    """Kernel ``(grad_cols, offset, mask, grad_input, grad_input_flat, conv, first_image)``: atomic
    col2im (``red_add`` into ``grad_input_flat = grad_input.reshape(-1)``).

    ``grad_cols[c*K + tap, n_local*P + p]`` for images ``first_image ..`` is
    scattered into ``grad_input`` (``[N, C, H, W]``, zeroed by the caller).
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corners = fns.bilinear_corners
    ZERO = fns.ZERO
    load = fns.load

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    WIDE = np.int64
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(grad_cols, offset, mask, grad_input, grad_input_flat, conv, first_image):
        _, channels, height, width = grad_input.shape
        image_size = u64(channels * height * width)  # 64-bit: an image may pass 2**32 elements
        _, off_channels, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        groups = off_channels // (2 * taps)
        per_group = channels // groups
        pixels = out_h * out_w
        total = grad_cols.shape[1] * channels * taps  # (images in chunk) * P * C * K
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            p, tap, c, n_local = split_index(idx, pixels, taps, channels)
            n = first_image + n_local
            oy = i32(u32(p) // u32(out_w))
            ox = p - oy * out_w
            g = i32(u32(c) // u32(per_group))
            y, x = tap_position(offset, n, g, tap, oy, ox, conv)
            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
            value = grad_cols[c * taps + tap, n_local * pixels + p]
            if use_mask:
                value *= load(mask, (n, g * taps + tap, oy, ox))
            # RED (no returned value) into the flat view: 64-bit image base, 32-bit offsets
            base = u64(n) * image_size + u64(c * height * width)  # in-plane offsets below: u32 (H*W < 2**32)
            row0 = u32(y0 * width)
            row1 = u32(y1 * width)
            if w00 != ZERO:
                red_add(grad_input_flat, base + u64(u32(row0 + x0)), value * w00)
            if w01 != ZERO:
                red_add(grad_input_flat, base + u64(u32(row0 + x1)), value * w01)
            if w10 != ZERO:
                red_add(grad_input_flat, base + u64(u32(row1 + x0)), value * w10)
            if w11 != ZERO:
                red_add(grad_input_flat, base + u64(u32(row1 + x1)), value * w11)
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# Traffic (per image, one thread per sample = G*K*P threads, each looping over C/G channels):
#   reads offsets 2*G*K*P*s and mask G*K*P*s once; per channel 4 input corners
#   (C*K*P*4*s, mostly L1/L2 hits: neighbouring samples share corners) and
#   - grad_cols C*K*P*s (coalesced over p), unless fused_gemm, which instead reads
#     W (broadcast: a warp shares the tap) and grad_out (Og values per element, coalesced
#     over p; C/G*K reuses of each grad_out value, through L1/L2);
#   writes grad_offset 2*G*K*P*s and grad_mask G*K*P*s once (no atomics), with
#   scatter_input 4 atomic adds per (channel, sample) into grad_input as in col2im_kernel,
#   and with write_columns the recomputed forward columns C*K*P*s (coalesced over p).
# FLOPs: ~40 per sample for position, corners and derivative weights; per channel
#   24 for the three reductions (+8 scatter products, +1 column), + 2*Og with fused_gemm.
# Nothing in shared memory.
@functools.cache
def sample_kernel(dtype, use_mask: bool, scatter_input: bool, fused_gemm: bool, write_columns: bool,
                  narrow: bool = True):
    """Kernel ``(grad_cols, grad_output, weight, input, offset, mask, grad_input, grad_input_flat,
    grad_offset, grad_mask, columns, conv, first_image, n_images)``: one thread per sample.

    Always writes ``grad_offset`` (and ``grad_mask`` if ``use_mask``) for images
    ``first_image .. first_image + n_images - 1``. ``scatter_input`` also adds the
    input gradient into ``grad_input`` with atomics. ``fused_gemm`` computes the
    ``grad_cols`` elements on the fly from ``weight`` and ``grad_output``;
    otherwise they are read from ``grad_cols`` (``[C*K, n_images*P]``).
    ``write_columns`` also stores the forward's columns ``m * bilinear(I[c], y, x)``
    into ``columns`` (``[C*K, n_images*P]``) for the weight-gradient GEMM: the pass
    already holds the four corners and the sample, so the recompute costs one store.
    Unused array arguments may be 1-element dummies of the right rank and dtype.
    ``grad_input_flat`` is ``grad_input.reshape(-1)`` (C-contiguous), the target of the RED adds.
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corner_gradients = fns.bilinear_corner_gradients
    grad_column = _grad_column_function(dtype)
    ZERO = fns.ZERO
    ONE = fns.ONE
    load = fns.load

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    WIDE = np.int64
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(grad_cols, grad_output, weight, input, offset, mask, grad_input, grad_input_flat, grad_offset,
               grad_mask, columns, conv, first_image, n_images):
        _, channels, height, width = input.shape
        image_size = u64(channels * height * width)  # 64-bit: an image may pass 2**32 elements
        _, off_channels, out_h, out_w = offset.shape
        kw = conv[7]
        taps = conv[6] * kw
        groups = off_channels // (2 * taps)
        per_group = channels // groups
        pixels = out_h * out_w
        total = n_images * groups * taps * pixels
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            p, tap, g, n_local = split_index(idx, pixels, taps, groups)
            n = first_image + n_local
            oy = i32(u32(p) // u32(out_w))
            ox = p - oy * out_w
            i = i32(u32(tap) // u32(kw))
            j = tap - i * kw
            y, x = tap_position(offset, n, g, tap, oy, ox, conv)
            (y0, y1, x0, x1, w00, w01, w10, w11,
             gy00, gy01, gy10, gy11, gx00, gx01, gx10, gx11) = bilinear_corner_gradients(y, x, height, width)
            m = load(mask, (n, g * taps + tap, oy, ox)) if use_mask else ONE
            col = n_local * pixels + p
            acc_y = ZERO
            acc_x = ZERO
            acc_m = ZERO
            for c in range(g * per_group, (g + 1) * per_group):
                if fused_gemm:
                    gc = grad_column(weight, grad_output, n, c, i, j, oy, ox, channels)
                else:
                    gc = grad_cols[c * taps + tap, col]
                v00 = load(input, (n, c, y0, x0))
                v01 = load(input, (n, c, y0, x1))
                v10 = load(input, (n, c, y1, x0))
                v11 = load(input, (n, c, y1, x1))
                acc_y += gc * (gy00 * v00 + gy01 * v01 + gy10 * v10 + gy11 * v11)
                acc_x += gc * (gx00 * v00 + gx01 * v01 + gx10 * v10 + gx11 * v11)
                sample = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                acc_m += gc * sample
                if write_columns:
                    columns[c * taps + tap, col] = sample * m
                if scatter_input:  # RED into the flat view, 32-bit offsets inside the image
                    value = gc * m
                    base = u64(n) * image_size + u64(c * height * width)  # in-plane offsets below: u32 (H*W < 2**32)
                    row0 = u32(y0 * width)
                    row1 = u32(y1 * width)
                    if w00 != ZERO:
                        red_add(grad_input_flat, base + u64(u32(row0 + x0)), value * w00)
                    if w01 != ZERO:
                        red_add(grad_input_flat, base + u64(u32(row0 + x1)), value * w01)
                    if w10 != ZERO:
                        red_add(grad_input_flat, base + u64(u32(row1 + x0)), value * w10)
                    if w11 != ZERO:
                        red_add(grad_input_flat, base + u64(u32(row1 + x1)), value * w11)
            channel = 2 * (g * taps + tap)
            grad_offset[n, channel, oy, ox] = acc_y * m
            grad_offset[n, channel + 1, oy, ox] = acc_x * m
            if use_mask:
                grad_mask[n, g * taps + tap, oy, ox] = acc_m
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# Traffic (per image, one thread per sample): reads offsets 2*G*K*P*s and mask G*K*P*s;
#   writes 4*G*K*P entries of (int32 key, s-byte coefficient, int32 source); the host then
#   sorts them (stable argsort of the keys: a radix sort, ~4 passes reading and writing
#   key and index, ~4*G*K*P*12*2*4 bytes) and permutes coefficient and source.
#   (Keys and sources become int64 only when the chunk's sizes need it.)
# FLOPs: ~25 per sample (position, corners, 4 mask products).
@functools.cache
def entries_kernel(dtype, use_mask: bool, narrow: bool = True):
    """Kernel ``(offset, mask, key, coef, source, conv, first_image, n_images, height, width)``.

    For sample ``s = ((n_local*G + g)*K + tap)*P + p`` and corner ``q`` writes entry
    ``4*s + q``: ``key`` = destination ``((n_local*G + g)*H + cy)*W + cx`` (or the
    sentinel ``n_images*G*H*W`` for a corner of zero weight), ``coef = m * w_q``,
    ``source = tap*P + p``.
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corners = fns.bilinear_corners
    ONE = fns.ONE
    ZERO = fns.ZERO
    load = fns.load

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    WIDE = np.int64
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(offset, mask, key, coef, source, conv, first_image, n_images, height, width):
        _, off_channels, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        groups = off_channels // (2 * taps)
        pixels = out_h * out_w
        plane = height * width
        sentinel = n_images * groups * plane
        total = n_images * groups * taps * pixels
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            p, tap, g, n_local = split_index(idx, pixels, taps, groups)
            n = first_image + n_local
            oy = i32(u32(p) // u32(out_w))
            ox = p - oy * out_w
            y, x = tap_position(offset, n, g, tap, oy, ox, conv)
            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
            m = load(mask, (n, g * taps + tap, oy, ox)) if use_mask else ONE
            base = (n_local * groups + g) * plane
            src = tap * pixels + p  # stored as the source array's type (int32 unless K*P needs int64)
            e = WIDE(4) * WIDE(idx)
            key[e] = base + y0 * width + x0 if w00 != ZERO else sentinel
            key[e + 1] = base + y0 * width + x1 if w01 != ZERO else sentinel
            key[e + 2] = base + y1 * width + x0 if w10 != ZERO else sentinel
            key[e + 3] = base + y1 * width + x1 if w11 != ZERO else sentinel
            coef[e] = m * w00
            coef[e + 1] = m * w01
            coef[e + 2] = m * w10
            coef[e + 3] = m * w11
            source[e] = src
            source[e + 1] = src
            source[e + 2] = src
            source[e + 3] = src
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# Traffic (per image, one thread per (channel, input pixel)): reads the segment starts
#   (C*H*W*8 bytes) and, per channel, all 4*G*K*P sorted entries (C*K*P*4*(4+s) bytes,
#   coalesced across neighbouring pixels, mostly L2 hits across the C/G channels of a
#   group); reads grad_cols C*K*P*4*s gathered (each element once per corner), or with
#   fused_gemm recomputes it (2*Og FLOPs per entry: 4x the GEMM work); writes grad_input
#   C*H*W*s exactly once.
# FLOPs: 2 per entry and channel (+2*Og with fused_gemm).
@functools.cache
def gather_kernel(dtype, fused_gemm: bool, narrow: bool = True):
    """Kernel ``(grad_cols, grad_output, weight, starts, source, coef, grad_input, conv,
    first_image, n_images, offset_groups)``: deterministic col2im.

    Segment ``[starts[d], starts[d+1])`` of the sorted entries holds every
    contribution to destination ``d = (n_local*G + g)*H*W + y*W + x``; the thread of
    ``(n_local, c, y, x)`` sums it in order and writes ``grad_input[first_image + n_local, c, y, x]``.
    """
    grad_column = _grad_column_function(dtype)
    ZERO = sampling_functions(dtype).ZERO

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    WIDE = np.int64
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(grad_cols, grad_output, weight, starts, source, coef, grad_input, conv,
               first_image, n_images, offset_groups):
        _, channels, height, width = grad_input.shape
        _, _, out_h, out_w = grad_output.shape
        kw = conv[7]
        taps = conv[6] * kw
        pixels = out_h * out_w
        plane = height * width
        per_group = channels // offset_groups
        total = n_images * channels * plane
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            q, c, _zero, n_local = split_index(idx, plane, channels, 1)
            n = first_image + n_local
            segment = (n_local * offset_groups + i32(u32(c) // u32(per_group))) * plane + q
            acc = ZERO
            for e in range(starts[segment], starts[segment + 1]):
                src = source[e]
                tap = i32(u32(src) // u32(pixels))
                p = src - tap * pixels
                if fused_gemm:
                    oy = i32(u32(p) // u32(out_w))
                    i = i32(u32(tap) // u32(kw))
                    gc = grad_column(weight, grad_output, n, c, i, tap - i * kw, oy, p - oy * out_w, channels)
                else:
                    gc = grad_cols[c * taps + tap, n_local * pixels + p]
                acc += coef[e] * gc
            y = i32(u32(q) // u32(width))
            grad_input[n, c, y, q - y * width] = acc
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# --------------------------------------------------------------------------- host side
def _grad_out_by_group(geometry, grad_output, first, n_chunk, xp=np):
    """``grad_out`` of images ``first ..`` as ``[Gw, Og, n_chunk*P]`` (a copy, in the compute dtype)."""
    g = geometry
    groups = g.groups
    chunk = precision.to_compute(grad_output[first:first + n_chunk], g.dtype, xp)
    chunk = chunk.reshape(n_chunk, groups, g.out_channels // groups, g.out_h * g.out_w)
    return chunk.transpose(1, 2, 0, 3).reshape(groups, g.out_channels // groups, n_chunk * g.out_h * g.out_w)


def grad_columns(geometry, weight, grad_out_groups, xp):
    """``W^T @ grad_out`` per weight group: ``[C*K, n_chunk*P]`` (rows ``c*K + tap``)."""
    g = geometry
    w = weight.reshape(g.groups, g.out_channels // g.groups, (g.in_channels // g.groups) * g.taps)
    return xp.matmul(w.transpose(0, 2, 1), grad_out_groups).reshape(g.in_channels * g.taps, -1)


def _deterministic_input_grad(g, grad_cols, grad_output, weight, offset, mask_arg, grad_input,
                              first, n_chunk, fused_gemm, xp, conv):
    """Sort-then-segment col2im for one chunk (see the module docstring)."""
    samples = n_chunk * g.offset_groups * g.taps * g.out_h * g.out_w
    segments = n_chunk * g.offset_groups * g.height * g.width
    # 32-bit keys when the segment ids fit: a radix sort then makes half the passes.
    key = xp.empty(4 * samples, dtype=np.int32 if segments < 2**31 - 1 else np.int64)
    coef = xp.empty(4 * samples, dtype=grad_input.dtype)
    source = xp.empty(4 * samples, dtype=np.int32 if g.taps * g.out_h * g.out_w <= 2**31 - 1 else np.int64)
    launch(entries_kernel(g.dtype, g.has_mask, index_is_narrow(samples)), samples, offset, mask_arg, key, coef, source, conv,
           np.int64(first), np.int64(n_chunk), np.int32(g.height), np.int32(g.width))
    order = xp.argsort(key, kind="stable")
    key = key[order]
    source = xp.ascontiguousarray(source[order])
    coef = xp.ascontiguousarray(coef[order])
    starts = xp.searchsorted(key, xp.arange(segments + 1, dtype=key.dtype), side="left").astype(np.int64)
    launch(gather_kernel(g.dtype, fused_gemm, index_is_narrow(n_chunk * g.in_channels * g.height * g.width)),
           n_chunk * g.in_channels * g.height * g.width,
           grad_cols, grad_output, weight, starts, source, coef, grad_input, conv,
           np.int64(first), np.int64(n_chunk), np.int64(g.offset_groups))


def _run(method, geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset, grad_weight,
         grad_bias, grad_mask, deterministic, stopwatch):
    g = geometry
    xp = backend.array_module(input)
    conv = conv_tuple(g)
    dtype = precision.compute_dtype(g.dtype)  # of the gradients, columns and GEMMs
    pixels = g.out_h * g.out_w
    dummy4 = xp.zeros((1, 1, 1, 1), dtype=dtype)
    dummy2 = xp.zeros((1, 1), dtype=dtype)
    mask_arg = mask if mask is not None else xp.zeros((1, 1, 1, 1), dtype=input.dtype)
    grad_mask_arg = grad_mask if grad_mask is not None else dummy4
    fused_gemm = method == "fused_gemm"
    weight = precision.to_compute(weight, g.dtype, xp)  # float32 for half layers (small)

    with stopwatch.section("bias grad"):
        if grad_bias is not None:
            grad_bias[...] = precision.to_compute(grad_output, g.dtype, xp).sum(axis=(0, 2, 3))
    if not deterministic:
        grad_input[...] = 0
    grad_weight[...] = 0

    unfused = method == "im2col"
    if unfused:  # torchvision's design: recompute the columns with the forward's own kernels
        with stopwatch.section("offset sampling"):
            points = im2col.compute_points(g, offset, mask, xp)
        fill = im2col.column_filler(g, input, points, xp)
    # The fused methods' sample pass writes the columns for the weight gradient itself.
    narrow = index_is_narrow(g.batch * g.in_channels * g.taps * pixels)  # every chunk's index space
    samples_kernel = sample_kernel(g.dtype, mask is not None, not unfused and not deterministic, fused_gemm,
                                   not unfused, narrow)

    for first, cols in im2col.column_chunks(g, xp, dtype):
        n_chunk = cols.shape[1] // pixels
        go = _grad_out_by_group(g, grad_output, first, n_chunk, xp)
        if fused_gemm:
            gcols = dummy2
        else:
            with stopwatch.section("grad columns gemm"):
                gcols = grad_columns(g, weight, go, xp)
        if unfused and not deterministic:
            with stopwatch.section("col2im"):
                launch(col2im_kernel(g.dtype, mask is not None, narrow), g.in_channels * g.taps * n_chunk * pixels,
                       gcols, offset, mask_arg, grad_input, grad_input.reshape(-1), conv, np.int64(first))
        with stopwatch.section("offset and mask grad" if unfused else "fused sample grads"):
            launch(samples_kernel, n_chunk * g.offset_groups * g.taps * pixels,
                   gcols, grad_output, weight, input, offset, mask_arg, grad_input, grad_input.reshape(-1), grad_offset,
                   grad_mask_arg, cols if not unfused else dummy2, conv, np.int64(first), np.int64(n_chunk))
        if deterministic:
            with stopwatch.section("deterministic col2im"):
                _deterministic_input_grad(g, gcols, grad_output, weight, offset, mask_arg, grad_input,
                                          first, n_chunk, fused_gemm, xp, conv)
        if unfused:
            with stopwatch.section("bilinear columns"):
                fill(cols, first)
        with stopwatch.section("weight grad gemm"):
            c_per_group = g.in_channels // g.groups
            by_group = cols.reshape(g.groups, c_per_group * g.taps, n_chunk * pixels)
            grad_weight += xp.matmul(go, by_group.transpose(0, 2, 1)).reshape(grad_weight.shape)


def backward_im2col(geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset, grad_weight,
                    grad_bias, grad_mask, deterministic=False, stopwatch=backend.NO_STOPWATCH):
    """Unfused: GEMM -> ``grad_cols`` -> col2im -> offset/mask kernel; fills the preallocated grads."""
    _run("im2col", geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
         grad_weight, grad_bias, grad_mask, deterministic, stopwatch)


def backward_fused_columns(geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
                           grad_weight, grad_bias, grad_mask, deterministic=False,
                           stopwatch=backend.NO_STOPWATCH):
    """GEMM -> ``grad_cols`` -> one pass for input, offset and mask grads."""
    _run("fused_columns", geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
         grad_weight, grad_bias, grad_mask, deterministic, stopwatch)


def backward_fused_gemm(geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
                        grad_weight, grad_bias, grad_mask, deterministic=False,
                        stopwatch=backend.NO_STOPWATCH):
    """No ``grad_cols`` buffer: the sample pass computes it on the fly from ``W`` and ``grad_out``."""
    _run("fused_gemm", geometry, grad_output, input, offset, weight, mask, grad_input, grad_offset,
         grad_weight, grad_bias, grad_mask, deterministic, stopwatch)


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``): every variant in float32
    and float64, and one float16 and one bfloat16 case of each kernel."""
    from numba import types

    conv = types.UniTuple(types.int32, 8)
    i64 = types.int64
    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a4, a2, a1 = types.Array(t, 4, "A"), types.Array(t, 2, "A"), types.Array(t, 1, "C")
        flat = a1  # grad_input's flat view (RED targets)
        k1, s1 = types.Array(types.int64, 1, "C"), types.Array(types.int32, 1, "C")
        for use_mask in (True, False):
            yield (f"col2im[mask={use_mask}]", dtype, col2im_kernel(dtype, use_mask),
                   (a2, a4, a4, a4, flat, conv, i64))
            if use_mask:  # the 64-bit index variant, for index spaces of 2**32 items or more
                yield (f"col2im[mask={use_mask},wide]", dtype, col2im_kernel(dtype, use_mask, False),
                       (a2, a4, a4, a4, flat, conv, i64))
            # (scatter_input, fused_gemm, write_columns) of: im2col; fused_columns atomic and
            # deterministic; fused_gemm atomic and deterministic
            for scatter, fused, write in ((False, False, False), (True, False, True), (False, False, True),
                                          (True, True, True), (False, True, True)):
                yield (f"sample[mask={use_mask},scatter={scatter},fused_gemm={fused},columns={write}]", dtype,
                       sample_kernel(dtype, use_mask, scatter, fused, write),
                       (a2, a4, a4, a4, a4, a4, a4, flat, a4, a4, a2, conv, i64, i64))
            for keys in (s1, k1):
                yield (f"entries[mask={use_mask},key={keys.dtype}]", dtype, entries_kernel(dtype, use_mask),
                       (a4, a4, keys, a1, s1, conv, i64, i64, types.int32, types.int32))
        for fused in (False, True):
            yield (f"gather[fused_gemm={fused}]", dtype, gather_kernel(dtype, fused),
                   (a2, a4, a4, k1, s1, a1, a4, conv, i64, i64, i64))
    # float16 and bfloat16 (storage in half, arithmetic in float32), one case per kernel: mask
    # on, 32-bit grid index, the default methods' variants (atomic fused_columns sample pass,
    # gather from grad_cols). grad_output, input, offset and mask in the storage type (h4);
    # weight, grad_cols, columns, the gradients and the sort coefficients in float32 (_run)
    f4, f2, f1 = (types.Array(types.float32, 4, "A"), types.Array(types.float32, 2, "A"),
                  types.Array(types.float32, 1, "C"))
    k1, s1 = types.Array(types.int64, 1, "C"), types.Array(types.int32, 1, "C")
    for dtype in ("float16", "bfloat16"):
        h4 = types.Array(precision.numba_type(dtype), 4, "A")
        yield ("col2im[mask=True]", dtype, col2im_kernel(dtype, True), (f2, h4, h4, f4, f1, conv, i64))
        yield ("sample[mask=True,scatter=True,fused_gemm=False,columns=True]", dtype,
               sample_kernel(dtype, True, True, False, True),
               (f2, h4, f4, h4, h4, h4, f4, f1, f4, f4, f2, conv, i64, i64))
        yield ("entries[mask=True,key=int32]", dtype, entries_kernel(dtype, True),
               (h4, h4, s1, f1, s1, conv, i64, i64, types.int32, types.int32))
        yield ("gather[fused_gemm=False]", dtype, gather_kernel(dtype, False),
               (f2, h4, f4, k1, s1, f1, f4, conv, i64, i64, i64))
