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
(The column-free ``fused`` method is ``backward_fused.py``. A ``fused_gemm`` method that
computed each ``grad_cols`` element inside the sample pass, one FMA per scalar load of
``W`` and ``grad_out`` (9.1% FFMA), was retired in session 25, issue 11.)

Determinism
-----------
The atomic scatter sums into ``grad_input`` in whatever order threads arrive, so
float results vary from run to run. ``deterministic=True`` replaces it with a
sort-then-segment reduction whose order is fixed:

1. ``entries_kernel``: each sample writes one packed key per corner,
   ``(destination << id_bits) | id``: destination = ``(image, offset group, y, x)``
   flattened, id = ``(tap*P + p)*4 + corner``, unique within the image and offset
   group. The key is *per offset group*, not per channel: every channel of a group
   has the same destinations, so one sort serves all ``C/G`` channels
   (torchvision-style per-element keys would sort ``C/G`` times more). Corners of
   zero weight get a sentinel destination past the last segment.
2. The keys are sorted alone (32-bit keys when destination and id fit, else
   64-bit: ``sort_key_layout``). The keys are unique, so any sort gives the one
   order, which is the order of a stable sort by destination (ids ascend within a
   destination); ``searchsorted`` gives each destination's segment ``[start, end)``.
3. ``gather_kernel``: one thread per ``(image, CB channels, y, x)`` sums its
   segment in sorted order, recomputing each entry's coefficient ``m * w_corner``
   from its id with the same ``sampling`` functions as the entries kernel (once
   per ``CB`` channels), and writes ``grad_input`` (no atomics, no zero fill). It
   reads ``grad_cols``. The column-free method (``backward_fused``'s ``fused`` in
   deterministic mode) has no ``grad_cols``:
   ``gather_staged_kernel`` regroups the sum by tap instead: per input pixel and
   tap, the ``grad_out`` columns of the tap's entries weighted by their
   coefficients, then that sum times the tap's weights (staged in shared memory),
   once per tap rather than once per entry (a pixel has ~4 entries per tap). The
   sums go through shared memory, so that the product is a small GEMM per block
   (pixels x outputs times outputs x 16 channels) with 4x4 pixels x channels a
   thread, rather than one pixel's dot products.

The sort can go in parts of output rows (``sort_part_rows``, within a byte budget:
the ``fused`` method's deterministic mode keeps it under 2.5% of the arguments and
gradients): the first part writes ``grad_input``, the later ones add to it, always
in the same order. Carrying no payload, a part costs 8 bytes per corner entry (the
keys and the sort's scratch) instead of ~20 plus an argsort's index buffers.

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
from ...runtime.addresses import element_address
from ...runtime.atomics import red_add
from ...runtime.backend import cuda
from . import im2col
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
#   - grad_cols C*K*P*s (coalesced over p);
#   writes grad_offset 2*G*K*P*s and grad_mask G*K*P*s once (no atomics), with
#   scatter_input 4 atomic adds per (channel, sample) into grad_input as in col2im_kernel,
#   and with write_columns the recomputed forward columns C*K*P*s (coalesced over p).
# FLOPs: ~40 per sample for position, corners and derivative weights; per channel
#   24 for the three reductions (+8 scatter products, +1 column).
# Nothing in shared memory.
@functools.cache
def sample_kernel(dtype, use_mask: bool, scatter_input: bool, write_columns: bool,
                  narrow: bool = True):
    """Kernel ``(grad_cols, input, offset, mask, grad_input_flat, grad_offset, grad_mask, columns,
    conv, first_image, n_images)``: one thread per sample.

    Always writes ``grad_offset`` (and ``grad_mask`` if ``use_mask``) for images
    ``first_image .. first_image + n_images - 1``. ``scatter_input`` also adds the
    input gradient into ``grad_input`` with atomics. The column gradients are read from
    ``grad_cols`` (``[C*K, n_images*P]``).
    ``write_columns`` also stores the forward's columns ``m * bilinear(I[c], y, x)``
    into ``columns`` (``[C*K, n_images*P]``) for the weight-gradient GEMM: the pass
    already holds the four corners and the sample, so the recompute costs one store.
    Unused array arguments may be 1-element dummies of the right rank and dtype.
    ``grad_input_flat`` is ``grad_input.reshape(-1)`` (C-contiguous), the target of the RED adds.
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corner_gradients = fns.bilinear_corner_gradients
    ZERO = fns.ZERO
    ONE = fns.ONE
    load = fns.load

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(grad_cols, input, offset, mask, grad_input_flat, grad_offset, grad_mask, columns, conv, first_image,
               n_images):
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
            y, x = tap_position(offset, n, g, tap, oy, ox, conv)
            (y0, y1, x0, x1, w00, w01, w10, w11,
             gy00, gy01, gy10, gy11, gx00, gx01, gx10, gx11) = bilinear_corner_gradients(y, x, height, width)
            m = load(mask, (n, g * taps + tap, oy, ox)) if use_mask else ONE
            col = n_local * pixels + p
            acc_y = ZERO
            acc_x = ZERO
            acc_m = ZERO
            for c in range(g * per_group, (g + 1) * per_group):
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


# Traffic (per image and sort part, one thread per sample): reads offsets 2*G*K*P*s and mask
#   G*K*P*s; writes 4*G*K*P packed keys (4 bytes, 8 when the key needs more than 32 bits);
#   the host sorts them in place (a radix sort of the keys alone: no payload, no permutation).
# FLOPs: ~25 per sample (position, corners).
@functools.cache
def entries_kernel(dtype, wide_keys: bool = False, narrow: bool = True):
    """Kernel ``(offset, key, conv, first_image, n_images, height, width, row0, part_rows, id_bits)``.

    One sort *part* covers output rows ``row0 .. row0 + part_rows`` of ``n_images`` images.
    For sample ``s = ((n_local*G + g)*K + tap)*Pp + p_local`` (``Pp = part_rows*Wo``) and
    corner ``q`` writes entry ``4*s + q``: the packed key ``(destination << id_bits) | id``,
    destination = ``((n_local*G + g)*H + cy)*W + cx`` (the sentinel ``n_images*G*H*W`` for a
    corner of zero weight), id = ``(tap*Pp + p_local)*4 + q``, unique among the entries of
    the image and offset group. So sorting the keys alone orders the entries by destination,
    and within a destination by id: the order of a stable sort by destination, with no
    payload to carry (the gather recomputes each coefficient from its id).
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corners = fns.bilinear_corners
    ZERO = fns.ZERO

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    KEY = np.uint64 if wide_keys else np.uint32
    WIDE = np.int64
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(offset, key, conv, first_image, n_images, height, width, row0, part_rows, id_bits):
        _, off_channels, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        groups = off_channels // (2 * taps)
        part_pixels = part_rows * out_w
        plane = height * width
        sentinel = KEY(n_images * groups * plane)
        shift = KEY(id_bits)
        total = n_images * groups * taps * part_pixels
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            p_local, tap, g, n_local = split_index(idx, part_pixels, taps, groups)
            n = first_image + n_local
            row = i32(u32(p_local) // u32(out_w))
            oy = row0 + row
            ox = p_local - row * out_w
            y, x = tap_position(offset, n, g, tap, oy, ox, conv)
            y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
            base = (n_local * groups + g) * plane
            ident = KEY(4) * KEY(tap * part_pixels + p_local)
            e = WIDE(4) * WIDE(idx)
            # (each conditional its own statement: docs/contributing.md, "One value per join")
            k00 = KEY(base + y0 * width + x0) if w00 != ZERO else sentinel
            k01 = KEY(base + y0 * width + x1) if w01 != ZERO else sentinel
            k10 = KEY(base + y1 * width + x0) if w10 != ZERO else sentinel
            k11 = KEY(base + y1 * width + x1) if w11 != ZERO else sentinel
            key[e] = (k00 << shift) | ident
            key[e + 1] = (k01 << shift) | (ident + KEY(1))
            key[e + 2] = (k10 << shift) | (ident + KEY(2))
            key[e + 3] = (k11 << shift) | (ident + KEY(3))
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# Traffic (per image and sort part, one thread per (block of CB channels, input pixel)): reads
#   the segment starts (G*H*W*8 bytes) and, per channel block, the sorted keys of its segment
#   (C/CB*K*P*4*key bytes in all, mostly L2 hits across a group's blocks) with their offsets and
#   mask values (recomputing each coefficient once per block, not per channel); reads grad_cols
#   C*K*P*4*s gathered (each element once per corner); writes grad_input C*H*W*s (reads it
#   too after the first part).
# FLOPs: ~30 per entry and block (coefficient), 2 per entry and channel.
@functools.cache
def gather_kernel(dtype, use_mask: bool, block_channels: int = 1, wide_keys: bool = False, narrow: bool = True):
    """Kernel ``(grad_cols, offset, mask, starts, key, grad_input, conv, first_image, n_images,
    offset_groups, row0, part_rows, id_bits, accumulate)``: deterministic col2im of one sort
    part (``entries_kernel``) from the column gradient ``grad_cols`` in device memory (the
    column methods; the column-free ones use ``gather_staged_kernel``).

    Segment ``[starts[d], starts[d+1])`` of the sorted keys holds every contribution of the
    part to destination ``d = (n_local*G + g)*H*W + y*W + x``; the thread of ``(n_local, CB
    channels, y, x)`` decodes each key's id into (tap, pixel, corner), recomputes the
    coefficient ``m * w_corner`` exactly as ``entries_kernel`` weighed the corner, sums its
    segment in order for each of its ``block_channels`` channels and writes (``accumulate``:
    adds to) ``grad_input[first_image + n_local, c, y, x]``.
    """
    fns = sampling_functions(dtype)
    tap_position = fns.tap_position
    bilinear_corners = fns.bilinear_corners
    load = fns.load
    ZERO = fns.ZERO
    ONE = fns.ONE
    DT = fns.T
    CB = block_channels

    IDX = np.uint32 if narrow else np.uint64  # the grid-stride index (see index_is_narrow)
    KEY = np.uint64 if wide_keys else np.uint32
    i32 = np.int32
    split_index = _split_index_function(narrow)

    @cuda.jit
    def kernel(grad_cols, offset, mask, starts, key, grad_input, conv, first_image, n_images, offset_groups, row0,
               part_rows, id_bits, accumulate):
        _, channels, height, width = grad_input.shape
        _, _, out_h, out_w = offset.shape
        taps = conv[6] * conv[7]
        pixels = out_h * out_w
        part_pixels = part_rows * out_w
        plane = height * width
        per_group = channels // offset_groups
        blocks = channels // CB
        low = (KEY(1) << KEY(id_bits)) - KEY(1)
        total = n_images * blocks * plane
        acc = cuda.local.array(CB, dtype=DT)
        idx = IDX(cuda.grid(1))
        while idx < IDX(total):
            q, cb, _zero, n_local = split_index(idx, plane, blocks, 1)
            n = first_image + n_local
            c0 = cb * CB
            g = i32(u32(c0) // u32(per_group))  # CB divides per_group: one group per block
            segment = (n_local * offset_groups + g) * plane + q
            for j in range(CB):
                acc[j] = ZERO
            for e in range(starts[segment], starts[segment + 1]):
                ident = i32(key[e] & low)
                corner = ident & 3
                s = ident >> 2
                tap = i32(u32(s) // u32(part_pixels))
                p_local = s - tap * part_pixels
                row = i32(u32(p_local) // u32(out_w))
                oy = row0 + row
                ox = p_local - row * out_w
                y, x = tap_position(offset, n, g, tap, oy, ox, conv)
                _y0, _y1, _x0, _x1, w00, w01, w10, w11 = bilinear_corners(y, x, height, width)
                w = w00 if corner == 0 else (w01 if corner == 1 else (w10 if corner == 2 else w11))
                m = load(mask, (n, g * taps + tap, oy, ox)) if use_mask else ONE
                coef = m * w
                column = n_local * pixels + oy * out_w + ox
                for j in range(CB):
                    acc[j] += coef * grad_cols[(c0 + j) * taps + tap, column]
            y = i32(u32(q) // u32(width))
            x = q - y * width
            for j in range(CB):
                if accumulate:
                    grad_input[n, c0 + j, y, x] += acc[j]
                else:
                    grad_input[n, c0 + j, y, x] = acc[j]
            idx = IDX(idx + IDX(cuda.gridsize(1)))

    return kernel


# Traffic (per image and sort part; a block per (CB channels, GATHER_THREADS input pixels)): the
#   keys and coefficients as gather_kernel; the weights of the block's channels, Og*CB*K*s per
#   block and output chunk (C/CB*H*W/GATHER_THREADS blocks: L2 hits); per entry and output chunk
#   its outputs' grad_out values, one per output (L1/L2 hits: an output pixel's grad_out serves
#   its 4*K corners); writes grad_input C*H*W*s (reads it too after the first part).
# FLOPs: ~30 per entry and block (coefficient), 2*Og per entry (its weighted grad_out column
#   into the tap's sums), 2*Og per tap, pixel and channel (the sums times the tap's weights:
#   about the column-gradient GEMM's work; per entry and channel it was 4x that).
GATHER_THREADS = 128
"""Threads per block of ``gather_staged_kernel`` (input pixels of one image and channel block)."""
GRID_YZ_LIMIT = 65535
GATHER_SUMS_BYTES = 32 * 1024
"""Shared memory of ``gather_staged_kernel``'s tap sums: ``out_chunk`` sums of each of the block's
``GATHER_THREADS`` pixels (64 float32 outputs, 32 float64)."""


def gather_staged_channels(geometry) -> int:
    """Channels a block of ``gather_staged_kernel`` sums (its ``CB``): the largest of 16, 8, 4, 2, 1
    that divides both an offset group's and a weight group's channels. The entries of a pixel's
    segment (their coefficients and ``grad_out`` loads) are walked once per block, so once per
    ``CB`` channels; and ``CB`` sums per thread let the tap's product reuse each loaded weight
    and tap sum for 4 pixels and 4 channels (``gather_staged_kernel``)."""
    return _channels_dividing_groups(geometry, 16)


def _channels_dividing_groups(geometry, most: int) -> int:
    """The largest power of two up to ``most`` that divides both an offset group's and a weight
    group's channels (so a block of that many channels lies in one group of each)."""
    g = geometry
    per_offset_group, per_weight_group = g.in_channels // g.offset_groups, g.in_channels // g.groups
    cb = most
    while per_offset_group % cb or per_weight_group % cb:
        cb //= 2
    return cb


def gather_out_chunk(geometry) -> int:
    """Outputs per pass of ``gather_staged_kernel`` over a pixel's segment: all of a weight group's,
    up to 64 (a tap's sums take that many registers) and as many as ``GATHER_SUMS_BYTES`` hold
    for the block's pixels (32 in float64). Each further chunk re-walks the segment."""
    g = geometry
    itemsize = precision.compute_dtype(g.dtype).itemsize
    fit = GATHER_SUMS_BYTES // (GATHER_THREADS * itemsize)
    return min(g.out_channels // g.groups, 64, fit)


def gather_product_unroll(out_chunk: int) -> int:
    """Vectors of 4 outputs per trip of ``gather_staged_kernel``'s product loop: 4, 2 or 1,
    the most that divides the chunk's vectors (at 4, 256 FMAs per trip at ``CB = 16``)."""
    return next(u for u in (4, 2, 1) if (-(-out_chunk // 4)) % u == 0)


@functools.cache
def gather_staged_kernel(dtype, use_mask: bool, block_channels: int, wide_keys: bool, taps: int,
                         out_chunk: int, even: bool, out_plane: int, tap_geometry: tuple = (3, 1, 1, 1, 1),
                         out_width: int = 64):
    """Kernel ``(grad_flat, weight_flat, offset, mask, starts, key, grad_input, conv, first_image,
    offset_groups, row0, part_rows, id_bits, accumulate, out_channels, w_per_group, block0,
    image0)``: the
    deterministic col2im of one sort part (``entries_kernel``) for the column-free methods,
    from ``grad_output`` and the weights (``grad_flat``, ``weight_flat``, flattened) rather than
    a column gradient in device memory.

    Grid ``(ceil(H*W / GATHER_THREADS), C / CB, n_images)`` (in launches of at most 65535
    channel blocks and images, from ``block0`` and ``image0``): a block owns one image, one
    block of ``CB`` channels (``gather_staged_channels``) and ``GATHER_THREADS`` input pixels.
    Indices inside an image are ``uint32`` (``backward_fused.supported``: fewer than 2**32
    elements per image), the segment index and the ``grad_out`` image bases ``uint64``.

    The sum is regrouped by tap. ``grad_input[c, pixel] = sum_e coef_e * sum_o W[o, c, tap_e] *
    grad_out[o, p_e]`` over the pixel's entries ``e`` equals ``sum_tap sum_o W[o, c, tap] *
    h_tap[o]`` with ``h_tap[o] = sum_{e of that tap} coef_e * grad_out[o, p_e]``. Per tap, in
    two phases separated by barriers:

    1. **Entries.** Thread ``t`` owns pixel ``t`` of the block. A segment's keys are sorted by
       tap (the tap is the high part of an entry's id), so the thread walks its segment once,
       tap by tap: the tap's entries add their weighted ``grad_out`` columns into ``h`` (one
       load and one FMA per output, ``h`` in registers). It then stores ``h`` to shared memory
       as ``[o/4][pixel][o%4]`` (``STS.128``), and the block stages the tap's weights
       ``W[outputs, c0 .. c0+CB, tap]`` as ``[o][j]``.
    2. **Product.** The block's ``GATHER_THREADS x CB`` sums are re-dealt: a thread owns ``PX``
       pixels (``t mod PG + PG*i``, ``PG = GATHER_THREADS / PX``: a warp's lanes read
       neighbouring pixels) times ``CJ = min(4, CB)`` neighbouring channels (``PX*CJ = CB``).
       Per 4 outputs it loads ``PX`` vectors of sums and 4 vectors of weights (``LDS.128``,
       the weights a broadcast) for ``4*PX*CJ`` FMAs: at ``CB = 16``, 16 FMAs per 2 loads,
       where one pixel per thread allows 4 per load.

    The sums past the group's outputs (``out_chunk`` rounded up to 4) stay zero and their
    weights are staged as zeros. The output plane ``Ho*Wo`` (``out_plane``) is a compile-time
    constant, so the ``grad_out`` loads of an entry's outputs are one base address plus
    immediate offsets. Each entry's coefficient ``m * w_corner`` is recomputed from its id: the
    offsets and the mask flat and contiguous, read through handles in 32 bits
    (``sampling.tap_position_at``), with the tap geometry ``tap_geometry = (kw, sh, sw, dh,
    dw)`` and the output width ``out_width`` compile-time (a pixel's row and a tap's row are
    multiplies, not divisions). Each thread writes (``accumulate``: adds to) its ``CB`` sums to
    ``grad_input[first_image + n_local, c, y, x]``; the order of every sum is fixed by the
    sort and the kernel's loops, so the result is bit-identical run to run.
    """
    fns = sampling_functions(dtype)
    tap_position_at = fns.tap_position_at
    bilinear_corners = fns.bilinear_corners
    load_at = fns.precision.load_at
    ZERO = fns.ZERO
    ONE = fns.ONE
    DT = fns.T
    CB = block_channels
    K = taps
    KW, SH, SW, DH, DW = tap_geometry
    OUT_W = out_width
    OC = out_chunk
    OC4 = -(-OC // 4) * 4  # the sums, rounded up to whole vectors (the extra ones stay zero)
    # the tap sums h of OC4 outputs, in two register arrays of at most 32: LLVM unrolls a loop of
    # 32 of them (constant indices: registers) and keeps one of 64 rolled (local memory)
    H0 = min(OC4, 32)
    H1 = OC4 - H0
    H1_SIZE = max(1, H1)  # (a local array's size must be a plain constant)
    THREADS = GATHER_THREADS
    CJ = min(4, CB)  # the product's channels per thread (one LDS.128 of weights at CB >= 4) ...
    PX = CB // CJ  # ... and pixels per thread
    PG = THREADS // PX  # pixel groups: thread t takes pixels t % PG + PG*i, channels CJ*(t // PG) ..
    UNROLL = gather_product_unroll(OC)  # the product's trip: 4*UNROLL outputs, 4*UNROLL*CB FMAs
    HV = 4 * UNROLL * PX  # (local array sizes must be plain constants)
    SUMS = OC4 * THREADS  # the block's tap sums, [o/4][pixel][o%4]
    W_TILE = OC4 * CB  # a tap's weights, [o][j]
    W_REPS = -(-W_TILE // THREADS)  # weights staged per thread and tap (unrolled)
    EVEN = even  # the group's outputs are a multiple of out_chunk: no bounds test per output
    PLANE = out_plane  # Ho*Wo, compile-time: immediate load offsets (docstring)
    KEY = np.uint64 if wide_keys else np.uint32
    i32 = np.int32
    assert CB in (1, 2, 4, 8, 16) and THREADS % PX == 0

    @cuda.jit
    def kernel(grad_flat, weight_flat, offset, mask, starts, key, grad_input, conv, first_image, offset_groups,
               row0, part_rows, id_bits, accumulate, out_channels, w_per_group, block0, image0):
        tid = u32(cuda.threadIdx.x)
        _, channels, height, width = grad_input.shape
        out_w = u32(OUT_W)  # == Wo of the caller's geometry (compile-time)
        out_plane = u32(PLANE)  # == Ho * Wo of the caller's geometry
        height_i = i32(height)  # (the bilinear rule's clamps in int32)
        width_i = i32(width)
        pad_h = i32(conv[2])
        pad_w = i32(conv[3])
        plane = u32(u32(height) * u32(width))
        part_pixels = u32(u32(part_rows) * out_w)
        per_group = u32(u32(channels) // u32(offset_groups))
        outs = u32(u32(u32(out_channels) * u32(w_per_group)) // u32(channels))  # outputs per weight group
        low = (KEY(1) << KEY(id_bits)) - KEY(1)
        n_local = u32(u32(image0) + u32(cuda.blockIdx.z))  # (launches of <= 65535 images and ...
        n = u32(u32(first_image) + n_local)
        c0 = u32(u32(u32(block0) + u32(cuda.blockIdx.y)) * u32(CB))  # ... channel blocks each)
        g = u32(c0 // per_group)  # CB divides per_group and w_per_group: one group of each
        w_group = u32(c0 // w_per_group)
        c_local = u32(c0 - u32(w_group * w_per_group))
        o_first = u32(w_group * outs)
        pixel0 = u32(u32(cuda.blockIdx.x) * u32(THREADS))
        q = u32(pixel0 + tid)  # the pixel whose segment this thread walks
        valid = q < plane
        segment = u64(u32(u32(n_local * u32(offset_groups)) + g)) * u64(plane) + u64(q)
        # handles of offset[n, 2*g*K] and mask[n, g*K] (flat, contiguous)
        group_row = u64(u32(u32(n * u32(offset_groups)) + g)) * u64(u32(K))
        offset_group = element_address(offset, group_row * u64(u32(2 * out_plane)))
        mask_group = element_address(mask, group_row * u64(out_plane)) if use_mask else u64(0)
        sums = cuda.shared.array(SUMS, dtype=DT, alignment=16)  # [o/4][pixel][o%4]
        w_tap = cuda.shared.array(W_TILE, dtype=DT, alignment=16)  # [o][j]
        acc = cuda.local.array(CB, dtype=DT)  # [i][jj]: pixel pg + PG*i, channel jc + jj
        h0 = cuda.local.array(H0, dtype=DT)  # a tap's weighted grad_out sums, outputs 0 .. H0 ...
        h1 = cuda.local.array(H1_SIZE, dtype=DT)  # ... and H0 .. OC4 (registers: unrolled loops)
        hv = cuda.local.array(HV, dtype=DT)  # the product's sums of 4*UNROLL outputs and PX pixels ...
        wv = cuda.local.array(CJ, dtype=DT)  # ... and weights of one output and CJ channels
        pg = u32(tid % u32(PG))  # the product's pixels and channels (docstring)
        jc = u32(u32(tid // u32(PG)) * u32(CJ))
        for j in range(CB):
            acc[j] = ZERO
        o0 = u32(0)
        while o0 < outs:  # output chunks (one at deft64)
            # (a thread past the image gets an empty segment: no divergent branch around the loop)
            e = u64(starts[segment]) if valid else u64(0)
            end = u64(starts[segment + u64(1)]) if valid else u64(0)
            tap = u32(0)
            tap_first = u32(0)  # the tap's first id / 4 (ids are 4 * (tap * part_pixels + p) + corner)
            while tap < u32(K):
                # -- phase 1: this tap's entries. h[o] = sum over them of coef * grad_out[o, p_e]
                tap_end = u32(tap_first + part_pixels)
                for o in range(H0):
                    h0[o] = ZERO
                for o in range(H1):
                    h1[o] = ZERO
                while e < end:
                    ident = u32(key[e] & low)
                    s = u32(ident >> u32(2))
                    if s >= tap_end:  # (a comparison, not a division: the next tap's first entry)
                        break
                    corner = u32(ident & u32(3))
                    p_local = u32(s - tap_first)
                    row = u32(p_local // out_w)
                    oy = u32(u32(row0) + row)
                    ox = u32(p_local - u32(row * out_w))
                    y, x = tap_position_at(offset, offset_group, tap, oy, ox, out_w, out_plane, KW, SH, SW, DH, DW,
                                           pad_h, pad_w)
                    _y0, _y1, _x0, _x1, w00, w01, w10, w11 = bilinear_corners(y, x, height_i, width_i)
                    w = w00 if corner == u32(0) else (w01 if corner == u32(1) else (w10 if corner == u32(2) else w11))
                    m = load_at(mask, mask_group, u32(u32(tap * out_plane) + u32(u32(oy * out_w) + ox))) \
                        if use_mask else ONE
                    coef = m * w
                    # grad_out[n, o_first + o0 + o, oy, ox] through one handle, a plane per output
                    # (compile-time: immediate offsets)
                    at = element_address(grad_flat, (u64(n) * u64(out_channels) + u64(u32(o_first + o0)))
                                         * u64(out_plane) + u64(u32(u32(oy * out_w) + ox)))
                    for o in range(H0):
                        if o < OC and (EVEN or u32(o0 + u32(o)) < outs):
                            h0[o] += coef * load_at(grad_flat, at, u32(o * PLANE))
                    for o in range(H1):
                        if H0 + o < OC and (EVEN or u32(o0 + u32(H0 + o)) < outs):
                            h1[o] += coef * load_at(grad_flat, at, u32((H0 + o) * PLANE))
                    e = u64(e + u64(1))
                # the sums to shared memory, 4 outputs per vector: sums[o/4][tid][o%4] (the
                # previous tap's readers are done: the barrier at the end of the tap)
                for o in range(H0):
                    sums[u32(u32(u32(u32(o // 4) * u32(THREADS)) + tid) * u32(4)) + u32(o % 4)] = h0[o]
                for o in range(H1):
                    sums[u32(u32(u32(u32((H0 + o) // 4) * u32(THREADS)) + tid) * u32(4)) + u32(o % 4)] = h1[o]
                # the tap's weights W[o_first + o0 + o, c_local + j, tap] -> w_tap[o*CB + j] (zeros
                # past the chunk and the group's outputs)
                for r in range(W_REPS):
                    idx = u32(tid + u32(r * THREADS))
                    if (r + 1) * THREADS <= W_TILE or idx < u32(W_TILE):
                        o = u32(idx // u32(CB))
                        j = u32(idx % u32(CB))
                        v = ZERO
                        if o < u32(OC) and u32(o0 + o) < outs:
                            v = weight_flat[u32(u32(u32(u32(u32(u32(o_first + o0) + o) * u32(w_per_group))
                                                        + u32(c_local + j)) * u32(K)) + tap)]
                        w_tap[idx] = v
                cuda.syncthreads()  # every pixel's sums and the tap's weights are staged
                # -- phase 2: acc[i][jj] += sum_o W[o, jc + jj, tap] * h[o] of pixel pg + PG*i,
                # per 4 outputs PX LDS.128 of sums and 4 of weights (a broadcast: one jc per warp)
                h_at = u32(pg * u32(4))  # sums[o4][pg + PG*i][r] is sums[h_at + 4*PG*i + r] ...
                w_at = jc  # ... and w_tap[4*o4 + r][jc + jj] is w_tap[w_at + r*CB + jj]
                o4 = u32(0)
                while o4 < u32(OC4 // 4):  # (UNROLL vectors of outputs a trip)
                    for i in range(PX):
                        for r in range(4 * UNROLL):  # output 4*o4 + r: vector r // 4, lane r % 4
                            hv[i * 4 * UNROLL + r] = sums[u32(h_at + u32(4 * THREADS * (r // 4) + 4 * PG * i
                                                                         + r % 4))]
                    for r in range(4 * UNROLL):
                        for jj in range(CJ):
                            wv[jj] = w_tap[u32(w_at + u32(r * CB + jj))]
                        for i in range(PX):
                            for jj in range(CJ):
                                acc[i * CJ + jj] += wv[jj] * hv[i * 4 * UNROLL + r]
                    h_at = u32(h_at + u32(4 * THREADS * UNROLL))
                    w_at = u32(w_at + u32(4 * CB * UNROLL))
                    o4 = u32(o4 + u32(UNROLL))
                cuda.syncthreads()  # everyone is done reading the sums and the weights
                tap = u32(tap + u32(1))
                tap_first = tap_end
            o0 = u32(o0 + u32(OC))
        for i in range(PX):
            p = u32(u32(pixel0 + pg) + u32(PG * i))
            if p < plane:
                y = u32(p // u32(width))
                x = u32(p - u32(y * u32(width)))
                for jj in range(CJ):
                    if accumulate:
                        grad_input[n, u32(c0 + u32(jc + u32(jj))), y, x] += acc[i * CJ + jj]
                    else:
                        grad_input[n, u32(c0 + u32(jc + u32(jj))), y, x] = acc[i * CJ + jj]

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


def staged_tap_geometry(geometry) -> tuple:
    """``(kw, sh, sw, dh, dw)``: the tap geometry ``gather_staged_kernel`` compiles in."""
    g = geometry
    return (g.kernel_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w)


def gather_block_channels(geometry) -> int:
    """Channels a gather thread sums (``gather_kernel``'s ``CB``): the largest of 8, 4, 2, 1 that
    divides both an offset group's and a weight group's channels, so each key's coefficient is
    recomputed once per CB channels (``gather_staged_channels`` is the column-free gather's)."""
    return _channels_dividing_groups(geometry, 8)


def sort_key_layout(geometry, n_chunk: int, part_rows: int) -> tuple[int, bool]:
    """``(id_bits, wide_keys)`` of a sort part: ``id_bits`` hold an entry's id within its image
    and offset group (``4*K*part_rows*Wo`` ids), the bits above hold its destination (up to the
    sentinel ``n_chunk*G*H*W``); 32-bit keys when both fit, 64-bit otherwise."""
    g = geometry
    id_bits = max(1, (4 * g.taps * part_rows * g.out_w - 1).bit_length())
    destination_bits = (n_chunk * g.offset_groups * g.height * g.width).bit_length()
    if id_bits + destination_bits > 64:
        raise ValueError(f"deterministic gather: {n_chunk} image(s) of {g.height}x{g.width} with "
                         f"{g.taps * part_rows * g.out_w} samples per part need more than 64-bit sort keys")
    return id_bits, id_bits + destination_bits > 32


def sort_part_bytes(geometry, n_chunk: int, part_rows: int) -> int:
    """Device memory of one sort part: its keys (4 per (tap, pixel) of each image and offset
    group; 4 or 8 bytes), as much again for the radix sort's scratch, and the int64 segment
    starts (one per destination, plus the sentinel's)."""
    g = geometry
    _, wide = sort_key_layout(g, n_chunk, part_rows)
    entries = 4 * n_chunk * g.offset_groups * g.taps * part_rows * g.out_w
    return 2 * entries * (8 if wide else 4) + 8 * (n_chunk * g.offset_groups * g.height * g.width + 2)


def sort_part_rows(geometry, n_chunk: int, budget_bytes: int | None = None) -> int:
    """Output rows per sort part: all of them (one part) without a budget, else as few parts
    as keep ``sort_part_bytes`` within ``budget_bytes``, of equal size (at least one row each)."""
    g = geometry
    if budget_bytes is None:
        return g.out_h
    rows = g.out_h
    while rows > 1 and sort_part_bytes(g, n_chunk, rows) > budget_bytes:
        rows -= 1
    parts = -(-g.out_h // rows)
    return -(-g.out_h // parts)  # parts of equal size (the last one may be shorter)


def _deterministic_input_grad(g, grad_cols, grad_output, weight, offset, mask_arg, grad_input,
                              first, n_chunk, column_free, xp, conv, budget_bytes: int | None = None):
    """Sort-then-segment col2im for images ``first .. first + n_chunk`` (module docstring), in
    parts of ``sort_part_rows`` output rows: the first part writes ``grad_input``, the others add
    to it, always in the same order, so the result is bit-identical run to run. ``column_free``
    (``backward_fused``): no ``grad_cols``; ``gather_staged_kernel`` recomputes the column
    gradients from ``grad_output`` and ``weight``."""
    rows = sort_part_rows(g, n_chunk, budget_bytes)
    id_bits, wide = sort_key_layout(g, n_chunk, rows)
    key_type = np.uint64 if wide else np.uint32
    segments = n_chunk * g.offset_groups * g.height * g.width
    bounds = xp.arange(segments + 1, dtype=key_type) << key_type(id_bits)  # each segment's first key
    cb = gather_staged_channels(g) if column_free else gather_block_channels(g)
    threads = n_chunk * (g.in_channels // cb) * g.height * g.width
    if column_free:  # a block per (image, channel block, pixel block), the weights staged
        out_chunk = gather_out_chunk(g)
        gather = gather_staged_kernel(g.dtype, g.has_mask, cb, wide, g.taps, out_chunk,
                                      (g.out_channels // g.groups) % out_chunk == 0, g.out_h * g.out_w,
                                      staged_tap_geometry(g), g.out_w)
        grid = (-(-(g.height * g.width) // GATHER_THREADS), g.in_channels // cb, n_chunk)
        grad_flat, weight_flat = grad_output.reshape(-1), weight.reshape(-1)
        offset_flat = xp.ascontiguousarray(offset).reshape(-1)  # (read through handles)
        mask_flat = xp.ascontiguousarray(mask_arg).reshape(-1)
    else:
        gather = gather_kernel(g.dtype, g.has_mask, cb, wide, index_is_narrow(threads))
    for row0 in range(0, g.out_h, rows):
        part_rows = min(rows, g.out_h - row0)
        samples = n_chunk * g.offset_groups * g.taps * part_rows * g.out_w
        key = xp.empty(4 * samples, dtype=key_type)
        launch(entries_kernel(g.dtype, wide, index_is_narrow(samples)), samples, offset, key, conv,
               np.int64(first), np.int64(n_chunk), np.int32(g.height), np.int32(g.width), np.int32(row0),
               np.int32(part_rows), np.int32(id_bits))
        key.sort()  # the keys are unique (but the sentinel's, never read): any sort gives one order
        starts = xp.searchsorted(key, bounds, side="left").astype(np.int64)
        if column_free:
            blocks_x, channel_blocks, images = grid
            for block0 in range(0, channel_blocks, GRID_YZ_LIMIT):
                for image0 in range(0, images, GRID_YZ_LIMIT):
                    backend.launch(gather, (blocks_x, min(GRID_YZ_LIMIT, channel_blocks - block0),
                                            min(GRID_YZ_LIMIT, images - image0)), GATHER_THREADS,
                                   grad_flat, weight_flat, offset_flat, mask_flat, starts, key, grad_input, conv,
                                   np.int32(first), np.int32(g.offset_groups), np.int32(row0), np.int32(part_rows),
                                   np.int32(id_bits), row0 > 0, np.int32(g.out_channels),
                                   np.int32(g.in_channels // g.groups), np.int32(block0), np.int32(image0))
        else:
            launch(gather, threads, grad_cols, offset, mask_arg, starts, key, grad_input, conv, np.int64(first),
                   np.int64(n_chunk), np.int64(g.offset_groups), np.int32(row0), np.int32(part_rows),
                   np.int32(id_bits), row0 > 0)
        del key, starts  # the next part reuses the memory


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
    samples_kernel = sample_kernel(g.dtype, mask is not None, not unfused and not deterministic, not unfused,
                                   narrow)

    for first, cols in im2col.column_chunks(g, xp, dtype):
        n_chunk = cols.shape[1] // pixels
        go = _grad_out_by_group(g, grad_output, first, n_chunk, xp)
        with stopwatch.section("grad columns gemm"):
            gcols = grad_columns(g, weight, go, xp)
        if unfused and not deterministic:
            with stopwatch.section("col2im"):
                launch(col2im_kernel(g.dtype, mask is not None, narrow), g.in_channels * g.taps * n_chunk * pixels,
                       gcols, offset, mask_arg, grad_input, grad_input.reshape(-1), conv, np.int64(first))
        with stopwatch.section("offset and mask grad" if unfused else "fused sample grads"):
            launch(samples_kernel, n_chunk * g.offset_groups * g.taps * pixels,
                   gcols, input, offset, mask_arg, grad_input.reshape(-1), grad_offset, grad_mask_arg,
                   cols if not unfused else dummy2, conv, np.int64(first), np.int64(n_chunk))
        if deterministic:
            with stopwatch.section("deterministic col2im"):
                _deterministic_input_grad(g, gcols, grad_output, weight, offset, mask_arg, grad_input,
                                          first, n_chunk, False, xp, conv)
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


def ptx_cases():
    """Kernels and signatures for the PTX audit (``deftnumba.ptx``): every variant in float32
    and float64, and one float16 and one bfloat16 case of each kernel."""
    from numba import types

    conv = types.UniTuple(types.int32, 8)
    i64, i32 = types.int64, types.int32
    # entries: (offset, key, ...); gather: (grad_cols, offset, mask, starts, key, grad_input, ...);
    # gather_staged: (grad_flat, weight_flat, offset, mask, starts, key, grad_input, ...)
    entries_tail = (conv, i64, i64, i32, i32, i32, i32, i32)
    gather_tail = (conv, i64, i64, i64, i32, i32, i32, types.boolean)
    staged_tail = (conv, i32, i32, i32, i32, i32, types.boolean, i32, i32, i32, i32)
    for dtype in ("float32", "float64"):
        t = getattr(types, dtype)
        a4, a2, a1 = types.Array(t, 4, "A"), types.Array(t, 2, "A"), types.Array(t, 1, "C")
        flat = a1  # grad_input's flat view (RED targets)
        k1 = types.Array(types.int64, 1, "C")
        u1, w1 = types.Array(types.uint32, 1, "C"), types.Array(types.uint64, 1, "C")
        for use_mask in (True, False):
            yield (f"col2im[mask={use_mask}]", dtype, col2im_kernel(dtype, use_mask),
                   (a2, a4, a4, a4, flat, conv, i64))
            if use_mask:  # the 64-bit index variant, for index spaces of 2**32 items or more
                yield (f"col2im[mask={use_mask},wide]", dtype, col2im_kernel(dtype, use_mask, False),
                       (a2, a4, a4, a4, flat, conv, i64))
            # (scatter_input, write_columns) of: im2col; fused_columns atomic and deterministic
            for scatter, write in ((False, False), (True, True), (False, True)):
                yield (f"sample[mask={use_mask},scatter={scatter},columns={write}]", dtype,
                       sample_kernel(dtype, use_mask, scatter, write),
                       (a2, a4, a4, a4, flat, a4, a4, a2, conv, i64, i64))
            for wide, keys in ((False, u1), (True, w1)):
                yield (f"gather[mask={use_mask},key={keys.dtype}]", dtype, gather_kernel(dtype, use_mask, 4, wide),
                       (a2, a4, a4, k1, keys, a4) + gather_tail)
                yield (f"gather_staged[mask={use_mask},key={keys.dtype}]", dtype,
                       gather_staged_kernel(dtype, use_mask, 8, wide, 9, 16, True, 4096),
                       (flat, flat, flat, flat, k1, keys, a4) + staged_tail)
        for wide, keys in ((False, u1), (True, w1)):
            yield (f"entries[key={keys.dtype}]", dtype, entries_kernel(dtype, wide), (a4, keys) + entries_tail)
    # float16 and bfloat16 (storage in half, arithmetic in float32), one case per kernel: mask
    # on, 32-bit grid index, the default methods' variants (atomic fused_columns sample pass,
    # gather from grad_cols). grad_output, input, offset and mask in the storage type (h4);
    # weight, grad_cols, columns, the gradients and the sort coefficients in float32 (_run)
    f4, f2, f1 = (types.Array(types.float32, 4, "A"), types.Array(types.float32, 2, "A"),
                  types.Array(types.float32, 1, "C"))
    k1, u1 = types.Array(types.int64, 1, "C"), types.Array(types.uint32, 1, "C")
    for dtype in ("float16", "bfloat16"):
        h4 = types.Array(precision.numba_type(dtype), 4, "A")
        yield ("col2im[mask=True]", dtype, col2im_kernel(dtype, True), (f2, h4, h4, f4, f1, conv, i64))
        yield ("sample[mask=True,scatter=True,columns=True]", dtype, sample_kernel(dtype, True, True, True),
               (f2, h4, h4, h4, f1, f4, f4, f2, conv, i64, i64))
        yield ("entries[key=uint32]", dtype, entries_kernel(dtype, False), (h4, u1) + entries_tail)
        yield ("gather[mask=True,key=uint32]", dtype, gather_kernel(dtype, True, 4, False),
               (f2, h4, h4, k1, u1, f4) + gather_tail)
        h1 = types.Array(precision.numba_type(dtype), 1, "C")
        yield ("gather_staged[mask=True,key=uint32]", dtype, gather_staged_kernel(dtype, True, 8, False, 9, 16, True, 4096),
               (h1, f1, h1, h1, k1, u1, f4) + staged_tail)
