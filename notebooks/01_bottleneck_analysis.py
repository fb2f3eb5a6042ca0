# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Bottleneck analysis: where does a DCN layer's time go?
#
# **Motivation.** A deformable convolution (DCN) is a convolution whose taps read the input at
# learned, per-pixel offsets. It helps accuracy, yet networks use few DCN layers, because a DCN
# layer runs several times slower than the dense convolution of the same shape: about **4x** for
# the DefT paper's 64x64, 64 -> 64 channel layer (ASPLOS'23). Before we try to win that back, we
# need to know where the time goes.
#
# The plan, in the style of a roofline analysis:
#
# 1. write the layer as the chain of operators that torchvision (and our baseline `im2col`) run;
# 2. check the baseline against an independent float64 reference;
# 3. count each operator's FLOPs and the fewest bytes it must move, before timing anything;
# 4. place the operators on an H200 roofline;
# 5. compare with measured times;
# 6. explain why the gather dominates, and what that means for the slowdown against cuDNN;
# 7. read the machine code of a multiply loop: what Numba's 64-bit indexing costs an issue-bound kernel.

# %%
import os

os.environ.setdefault("DEFTNUMBA_QUIET", "1")  # the banner below prints the backend line

import inspect

import matplotlib.pyplot as plt
import numpy as np

import deftnumba as dn
from deftnumba.runtime import backend
from deftnumba.dcn import offsets, reference, roofline
from deftnumba.bench import harness as bench
from deftnumba import notebook as nb
from deftnumba.dcn.geometry import Geometry
from deftnumba.dcn.inputs import random_layer
from deftnumba.dcn.kernels import im2col

MODE = nb.mode()
nb.show(MODE.banner())

# %% [markdown]
# ## 1. DCN as four operators
#
# For every output pixel `p` and kernel tap `k`, DCN samples the input at the tap's regular
# position plus a learned offset `(dy, dx)`, by bilinear interpolation of the four surrounding
# pixels, optionally scales it by a mask (DCN v2), and then does what a convolution does: an inner
# product with the weights over channels and taps. torchvision computes this as:
#
# | operator | what it does | in `deftnumba.kernels.im2col` |
# | --- | --- | --- |
# | **offset sampling** | offsets -> absolute positions `y = oy*s - pad + i*dil + dy` (and the mask, stored beside them) | `positions_kernel` |
# | **bilinear interpolation** | 4 corner reads, 4 weights, 7 FLOPs per sample | `columns_kernel` (device function `sampling.bilinear_axis`, per axis) |
# | **column building** | writes the sample to a matrix `[C*kh*kw, N*Ho*Wo]` | `columns_kernel` |
# | **GEMM** | `weight [Cout, C*kh*kw] @ columns` | `gemm_bias` (cuBLAS on a GPU) |
#
# Interpolation and column building share one kernel (every sample is written as soon as it is
# interpolated), so the package times three stages: `offset sampling`, `bilinear columns` and
# `gemm`. Here is the host side of the pipeline, straight from the package:

# %%
print(inspect.getsource(im2col.forward))

# %% [markdown]
# ## 2. A check
#
# Before measuring anything, the baseline must be right. We compare it with
# `deftnumba.reference`, a float64 NumPy implementation that shares no code with the kernels,
# on a small irregular layer (9x11 input, stride 1, random offsets of a few pixels, a mask).
# In the simulator this is the only thing the kernels do in this notebook.

# %%
small = Geometry(batch=2, in_channels=3, height=9, width=11, out_channels=5, kernel_h=3, kernel_w=3,
                 pad_h=1, pad_w=1, has_mask=True, has_bias=True)
x, offset, weight, bias, mask = random_layer(small, seed=0)
device = [backend.to_device(a) for a in (x, offset, weight, bias, mask)]
got = backend.to_host(dn.deform_conv2d(*device[:4], padding=1, mask=device[4], method="im2col"))
expected = reference.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
nb.show(f"`im2col` against the float64 reference: relative error **{error:.1e}** "
        f"({'PASS' if error < 1e-5 else 'FAIL'}, bound 1e-5) on {MODE.device}.")

# %% [markdown]
# ## 3. Counting: FLOPs, bytes and arithmetic intensity per operator
#
# `deftnumba.roofline` counts, for every operator, the floating-point operations it must do and
# the fewest bytes it must move through device memory (inputs read once, outputs written once).
# Their ratio is the **arithmetic intensity** (FLOP/B). Against the two roofs of a device, the
# arithmetic rate and the memory bandwidth, it gives a **floor**: the least time the operator can
# take. The layer is `deft64`, the DefT paper's (8 images, 64 -> 64 channels, 64x64, 3x3, DCN v2).
#
# The device numbers are **leads, not measurements**: fp32 67 TFLOP/s from NVIDIA's H200
# datasheet, and 4.3 TB/s copy bandwidth, a lead from outside the project, not measured here
# (the datasheet says 4.8 TB/s for HBM3e).
# `roofline.measure_ceilings()` replaces them on a GPU.

# %%
deft64 = bench.SUITES["deft64"]
ceilings = roofline.H200_LEADS
operators = roofline.operators(deft64, "im2col", "fwd")
ridge = ceilings.flops_per_s / ceilings.bytes_per_s
rows = []
for op in operators:
    rows.append({"operator": op.name, "GFLOP": op.flops / 1e9, "MB read": op.bytes_read / 1e6,
                 "MB written": op.bytes_written / 1e6, "FLOP/B": op.intensity,
                 "bound by": "compute" if op.intensity > ridge else "memory",
                 "floor ms": roofline.floor_ms_of(op.flops, op.bytes, ceilings)})
layer = {m: roofline.totals(deft64, m, "fwd") for m in ("im2col", "fused", "cudnn_conv")}
layer_floor = {m: roofline.floor_ms(deft64, m, "fwd", ceilings) for m in layer}
for m, t in layer.items():
    rows.append({"operator": f"**whole layer, {m}**", "GFLOP": t.flops / 1e9, "MB read": t.bytes_read / 1e6,
                 "MB written": t.bytes_written / 1e6, "FLOP/B": t.intensity, "bound by": "",
                 "floor ms": layer_floor[m]})
nb.show(nb.markdown_table(rows, floats=".3g")
        + f"\n\nRidge point of the H200 leads: **{ridge:.1f} FLOP/B** (below it an operator is memory-bound).")

# %% [markdown]
# ## 4. The operators on an H200 roofline
#
# Each operator (filled circle) sits at its intensity; its height is the most it could achieve
# there, the lower of the two roofs. The hollow squares are whole layers: the im2col pipeline,
# a fused layer with no column matrix, and the dense convolution. Nothing here is measured: the
# roofs are leads and the points are counts.

# %%
fig, ax = plt.subplots(figsize=(8, 4.8))
hidden = nb.plot_operator_roofline(ax, operators, [roofline.H200_LEADS, roofline.H200_DATASHEET],
                                   layers=list(layer.values()))
ax.set_title("deft64 forward, im2col pipeline: operators on the H200 roofline", fontsize=10)
nb.caption(fig, "Roofs: H200 datasheet leads, not measured here. Points: counted FLOPs and bytes, not timings."
           + (f" Not shown (no FLOPs): {', '.join(hidden)}." if hidden else ""))
fig.tight_layout()

# %% [markdown]
# ## 5. Measured time per operator
#
# The roofline says what each operator *must* cost at least. Measured times say what it does
# cost. On a GPU this notebook times the three stages itself with CUDA events
# (`backend.Stopwatch`, the same timer `python -m deftnumba demo` uses). Without a GPU it uses
# recorded results, if any exist: simulator times would measure Python threads, not a GPU.

# %%
floors = {op.name: roofline.floor_ms_of(op.flops, op.bytes, ceilings) for op in operators}
measured = nb.time_operators(deft64, "im2col", repeats=20) if MODE.live else None
fig, ax = plt.subplots(figsize=(8, 3.6))
names = list(floors)
ypos = np.arange(len(names))
ax.barh(ypos - 0.2, [floors[n] for n in names], 0.4, color="0.6", label="roofline floor (H200 leads)")
if measured:
    ax.barh(ypos + 0.2, [measured["operator_ms"].get(n, 0.0) for n in names], 0.4, color="C3",
            label=f"measured ({measured['unit']})")
ax.set_yticks(ypos, names)
ax.invert_yaxis()
ax.set_xlabel("time per forward call (ms)")
ax.set_title("deft64 forward, im2col: roofline floor" + (" and measured time" if measured else "")
             + " per operator", fontsize=10)
ax.legend(fontsize=8)
nb.caption(fig, nb.live_caption() if measured else
           "Floors only: counted bytes and FLOPs over the H200 datasheet leads. No measured bars: no GPU here.")
fig.tight_layout()
if not measured:
    nb.show("**Not recorded yet: time per operator on a GPU.** This project has not had a GPU yet, and "
            "the bench CSVs under `data/bench/` hold whole-layer times, not per-operator ones. Run this "
            "notebook on a GPU machine (or `python -m deftnumba demo`) to see the measured bars.")

# %% [markdown]
# ## 6. Why the gather dominates
#
# First, what the counts say.

# %%
by_name = {op.name: op for op in operators}
columns_op, gemm_op = by_name["bilinear columns"], by_name["gemm"]
column_bytes = roofline.column_buffer_bytes(deft64)
input_bytes = deft64.batch * deft64.in_channels * deft64.height * deft64.width * deft64.itemsize
samples = deft64.batch * deft64.in_channels * deft64.taps * deft64.out_h * deft64.out_w
nb.show(
    f"- The column matrix is **{column_bytes / 1e6:.1f} MB** for the batch: **{column_bytes / input_bytes:.0f}x** "
    f"the input it is sampled from ({input_bytes / 1e6:.1f} MB), because each input pixel is copied once per tap.\n"
    f"- `bilinear columns` writes it and the GEMM reads it back: together "
    f"**{(columns_op.bytes_written + column_bytes) / 1e6:.0f} MB** of the pipeline's "
    f"**{sum(op.bytes for op in operators) / 1e6:.0f} MB** of traffic, for a layer whose own data "
    f"(input, offsets, mask, weights, output) is **{layer['fused'].bytes / 1e6:.1f} MB**.\n"
    f"- `bilinear columns` does ~{columns_op.flops / samples:.0f} FLOPs per sample: **{columns_op.intensity:.1f} FLOP/B**, "
    f"far under the ridge at {ridge:.1f}. It is memory-bound even in this best case.\n"
    f"- The GEMM reading the columns stays compute-bound ({gemm_op.intensity:.0f} FLOP/B), so its floor equals a "
    f"dense convolution's ({floors['gemm']:.3f} ms). On the floors alone the im2col layer costs "
    f"**{layer_floor['im2col']:.3f} ms**, a fused one {layer_floor['fused']:.3f} ms and the dense conv "
    f"{layer_floor['cudnn_conv']:.3f} ms.")

# %% [markdown]
# The floor of the gather assumes each byte is moved once, perfectly coalesced. The real gather
# is worse: each thread reads the **four corners** of its bilinear footprint, at positions that
# depend on the offsets, and the memory system serves whole 32-byte **sectors**. A warp of 32
# threads (32 neighbouring output pixels) reading one tap touches as many sectors as its corners
# spread over. `offsets.gather_sectors` counts them for the im2col kernel's thread layout, exactly,
# from the offsets, no GPU needed (the counting idea of GPU-Puzzles). Offsets here are smooth
# random fields (`offsets.for_geometry`) of growing magnitude.

# %%
cases = {"zero offsets (a plain conv's gather)": (0.0, 2.0), "RMS 1 px, smooth (like learned)": (1.0, 2.0),
         "RMS 1 px, white noise": (1.0, 0.0), "RMS 4 px, smooth": (4.0, 2.0)}
sector_rows = []
for label, (magnitude, correlation) in cases.items():
    field = offsets.for_geometry(deft64, magnitude=magnitude, correlation=correlation, seed=0)
    counted = offsets.gather_sectors(deft64, field)
    sector_rows.append({"offsets": label, "bytes per sample": counted["bytes_per_sample"],
                        "gather requests MB": counted["bytes"] / 1e6,
                        "x the input": counted["bytes"] / input_bytes,
                        "x the counted floor read": counted["bytes"] / columns_op.bytes_read})
nb.show(nb.markdown_table(sector_rows, floats=".3g")
        + "\n\n(Sector requests to L1/L2, counted for the im2col kernel's thread layout; not DRAM bytes "
        "and not a measurement.)")

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
labels = [r["offsets"] for r in sector_rows]
ax.barh(labels, [r["bytes per sample"] for r in sector_rows], color=["0.6", "C0", "C1", "C3"])
ax.axvline(deft64.itemsize, color="black", lw=0.8, ls="--", label="4 B: the column value each sample writes")
ax.legend(fontsize=8, loc="upper right")
ax.invert_yaxis()
ax.set_xlabel("bytes requested per sample (32-byte sectors, warps of 32)")
ax.set_title("deft64, im2col gather: memory sectors requested per bilinear sample", fontsize=10)
nb.caption(fig, "Counted from the offsets with offsets.gather_sectors (no GPU, no timing): requests to L1/L2.")
fig.tight_layout()

# %%
per_sample = [r["bytes per sample"] for r in sector_rows]
requests_mb = [r["gather requests MB"] for r in sector_rows]
im2col_vs_conv = layer_floor["im2col"] / layer_floor["cudnn_conv"]
nb.show(
    f"**Reading.** The gather does little arithmetic (about {columns_op.flops / samples:.0f} FLOPs per sample, "
    f"against `2*Cout` = {2 * deft64.out_channels} for the GEMM), yet it is the operator that grows with "
    "everything that makes DCN different:\n\n"
    f"* it **materialises** its result, blowing the input up {deft64.taps}x (one copy per tap) into a "
    f"{column_bytes / 1e6:.0f} MB column matrix that goes out to device memory and comes straight back for the GEMM;\n"
    f"* its reads are **scattered**: even with zero offsets a warp requests about {per_sample[0]:.0f} bytes per "
    f"{deft64.itemsize}-byte sample (two rows of corners, partly used sectors); learned-like offsets (1 px, smooth) "
    f"raise that to about {per_sample[1]:.0f} bytes, white noise to about {per_sample[2]:.0f}, and 4-pixel offsets "
    f"to about {per_sample[3]:.0f}. That is {min(requests_mb):.0f}-{max(requests_mb):.0f} MB of sector requests to "
    f"gather a {input_bytes / 1e6:.1f} MB input, and it depends on the *data*, which no static schedule can fix.\n\n"
    f"The floors put the im2col layer at about {im2col_vs_conv:.1f}x a dense convolution on the H200 leads; the "
    "scattered requests, the extra launches and the column round trip's latency are what turn that into the "
    "~4x DefT measured (on its GPU). Fusing the sampling into the GEMM removes the column matrix, and staging a "
    "tile of input in shared memory turns most of the scattered requests into shared-memory reads: DefT's two "
    "ideas, `method=\"fused\"` in this package. Notebook 02 sizes its tiles; notebook 03 measures it.")

# %% [markdown]
# ## 7. The DCN slowdown against a dense cuDNN convolution, across the suite
#
# The headline number: how much slower is a DCN layer than the dense convolution of the same
# shape? First the model's answer (ratio of roofline floors, always available), then the
# measured one (recorded on a GPU).

# %%
suite = bench.SUITES
methods = ("torchvision", "im2col", "fused")
model_slowdown = {m: [roofline.floor_ms(g, m, "fwd", ceilings) / roofline.floor_ms(g, "cudnn_conv", "fwd", ceilings)
                      for g in suite.values()] for m in methods}
recorded = nb.recorded_results()
measured_slowdown = {}
for r in recorded["layer"]:
    if r["pass"] == "fwd" and r["status"] == "ok" and r["method"] in methods and r.get("speedup_vs_cudnn_conv"):
        measured_slowdown.setdefault(r["method"], {})[r["shape"]] = 1.0 / r["speedup_vs_cudnn_conv"]

fig, axes = plt.subplots(1, 2 if measured_slowdown else 1, figsize=(11 if measured_slowdown else 7, 3.8),
                         squeeze=False)
positions = np.arange(len(suite))
width = 0.8 / len(methods)
ax = axes[0, 0]
for j, m in enumerate(methods):
    ax.bar(positions + (j - 1) * width, model_slowdown[m], width, label=m)
ax.axhline(1.0, color="black", lw=0.8)
ax.set_xticks(positions, list(suite))
ax.set_ylabel("floor(method) / floor(dense conv)")
ax.set_title("Model: slowdown of the roofline floors (H200 leads)", fontsize=10)
ax.legend(fontsize=8)
if measured_slowdown:
    ax = axes[0, 1]
    for j, m in enumerate(methods):
        values = [measured_slowdown.get(m, {}).get(s, np.nan) for s in suite]
        ax.bar(positions + (j - 1) * width, values, width, label=m)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(positions, list(suite))
    ax.set_ylabel("time(method) / time(cudnn_conv)")
    ax.set_title("Measured slowdown, forward", fontsize=10)
    ax.legend(fontsize=8)
    nb.caption(fig, "Left: a model, not a measurement. Right: " + nb.recorded_caption(recorded["layer"])
               + f" ({recorded['layer_file'].name}).")
else:
    nb.caption(fig, "A model from counted bytes and FLOPs over H200 datasheet leads: not a measurement.")
fig.tight_layout()
if not measured_slowdown:
    nb.show(nb.not_recorded("the measured DCN slowdown against cuDNN across the suite"))

# %%
i = list(suite).index("deft64")
nb.show(f"Model, deft64: torchvision's design cannot run faster than **{model_slowdown['torchvision'][i]:.1f}x** "
        f"the dense convolution on these roofs; a fused kernel's floor is **{model_slowdown['fused'][i]:.2f}x**. "
        f"Across the suite the im2col floor ranges from {min(model_slowdown['im2col']):.1f}x to "
        f"{max(model_slowdown['im2col']):.1f}x. DefT measured about 4x for torchvision on deft64 "
        "(on its GPU); the gap between that and the floor ratio is what scattered reads and launch "
        "overheads add on top of the traffic.")

# %%
nb.show(f"**Reading.** On these roofs even a perfect im2col pipeline's floor is "
        f"{min(model_slowdown['im2col']):.1f}x to {max(model_slowdown['im2col']):.1f}x the dense "
        "convolution's across the suite, because the column round trip is part of its design: no tuning "
        "of the gather kernel can remove those bytes. A fused layer's floor sits at "
        f"{min(model_slowdown['fused']):.2f}x to {max(model_slowdown['fused']):.2f}x the convolution's (the "
        "same GEMM plus the sampling FLOPs, and a little more reading: offsets and the mask). The rest of "
        "the measured slowdown (about 4x in DefT) is what a kernel must win back in practice, where the "
        "scattered reads and shared-memory staging decide how close it gets; that is the subject of "
        "notebooks 02 and 03.")

# %% [markdown]
# ## 8. What 64-bit indexing costs: the SASS of a multiply loop, before and after
#
# Once the column matrix is gone (a fused kernel), bytes stop being the limit and a second
# ceiling appears: **issue slots**. Each of an SM's four schedulers issues at most one warp
# instruction per clock, and only an `FFMA` does the layer's arithmetic. So the share of
# issued instructions that are `FFMA` caps the share of fp32 peak a kernel can reach: a loop
# at 40% FFMA cannot run faster than 40% of peak, however well its data is staged.
#
# What fills the other slots is decided by how the Python is written. `deftnumba.perf.indexing_lesson`
# holds one register-blocked multiply (`c = a @ b`: a block stages an 8-deep slice of `a` and `b`
# in shared memory; each thread accumulates a 4x4 block of `c`, 16 FFMA per step, the shape of
# the `fused` kernel's multiply loop) written twice, identical in float32 arithmetic:
#
# * **before**, the way Numba code is naturally written: 2-D arrays and shared arrays,
#   Python-int indices, `range` loops, and each thread owning rows `ty, ty+8, ...` (strided);
# * **after**, the house discipline: flat arrays, `uint32` indices wrapped in `u32(...)`, flat
#   shared arrays with `alignment=16`, each thread owning 4 *consecutive* rows and columns,
#   and a `while` loop on a `uint32` offset doing 4 rank-1 updates per trip.
#
# Both run in the simulator (checked against NumPy just below). Their multiply loops:

# %%
from deftnumba.perf import indexing_lesson as lesson


def multiply_loop_source(kernel):
    """The kernel's lines from '# phase: multiply' to the barrier that ends the loop."""
    lines = inspect.getsource(kernel.py_func).splitlines()
    first = next(i for i, ln in enumerate(lines) if "# phase: multiply" in ln)
    last = next(i for i in range(first, len(lines)) if "cuda.syncthreads()" in lines[i])
    return "\n".join(lines[first:last])


for variant, kernel in lesson.KERNELS.items():
    print(f"# ---- {variant}: {kernel.py_func.__name__}\n{multiply_loop_source(kernel)}\n")

a_small = np.random.default_rng(1).standard_normal((37, 19)).astype(np.float32)
b_small = np.random.default_rng(2).standard_normal((19, 29)).astype(np.float32)
exact = a_small.astype(np.float64) @ b_small.astype(np.float64)
errors = {v: float(np.abs(lesson.multiply(a_small, b_small, v) - exact).max()) for v in lesson.VARIANTS}
nb.show("Both against a float64 NumPy product (37x19 @ 19x29, partial tiles and slices): max abs error "
        + ", ".join(f"`{v}` **{e:.1e}**" for v, e in errors.items())
        + f" ({'PASS' if max(errors.values()) < 1e-4 else 'FAIL'}, bound 1e-4) on {MODE.device}.")

# %% [markdown]
# Now the machine code. `lesson_figures()` compiles both kernels for `sm_90` with numba-cuda's real
# compiler and nvJitLink, and reads the SASS with `nvdisasm` (no GPU needed; under the simulator it
# starts a compiler process), the same pipeline as `python -m deftnumba audit`. Every number below is
# **static**: instructions read from the SASS, never timed.

# %%
figures = lesson.lesson_figures()
compile_note = (f" Compiling both took {figures['wall_s']:.1f} s here." if figures["source"] == "compiled" else "")
nb.show(f"**Source:** {figures['note']}{compile_note}\n\n" + nb.markdown_table(lesson.comparison_rows(figures)))

# %% [markdown]
# How to read the listings below: `/*offset*/ OPCODE destination, sources ; // line N`, where N is the
# source line in `deftnumba/perf/indexing_lesson.py`. In **before**, the `U...` instructions of the
# `for k in range(depth)` line are the loop's int64 counter and Numba's general `range` stepping, kept on
# the uniform datapath (`UIADD3` then `UIADD3.X` is one 64-bit add, `UISETP....EX` one 64-bit compare),
# and the eight `LDS` fetch the thread's strided values one float at a time. In **after**, each pair of
# `LDS.128` feeds 16 `FFMA` (`.reuse` keeps an operand in the register reuse cache), and the loop's
# whole overhead is one add and one compare per 4 rank-1 updates.

# %%
for variant in lesson.VARIANTS:
    v = figures["variants"][variant]
    print(f"# ---- {variant}: the hottest loop's SASS ({v['loop_instructions']} instructions per trip, "
          f"{v['loop_steps']:g} rank-1 update(s), {100 * v['loop_ffma_share']:.1f}% FFMA)")
    print("\n".join(v["excerpt"]) + "\n")

# %%
groups = ["integer", "loads/stores", "control", "other"]
colors = {"FFMA": "C2", "integer": "C3", "loads/stores": "C0", "control": "0.5", "other": "C4",
          "staging": "C1", "multiply": "C9"}
fig, (ax_loop, ax_slice) = plt.subplots(1, 2, figsize=(11, 3.2))
for row, variant in enumerate(lesson.VARIANTS):
    v = figures["variants"][variant]
    left = 0.0
    for g in ["FFMA"] + groups:
        width = v["loop_mix"][g] / v["loop_ffma"]
        ax_loop.barh(row, width, left=left, color=colors[g], label=g if row == 0 else None)
        left += width
    model = lesson.slice_model(v)
    left = 0.0
    for part in ("multiply", "staging"):
        ax_slice.barh(row, model[part] / model["ffma"], left=left, color=colors[part], label=part if row == 0 else None)
        left += model[part] / model["ffma"]
for ax in (ax_loop, ax_slice):
    ax.set_yticks(range(len(lesson.VARIANTS)), lesson.VARIANTS)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="lower right")
ax_loop.set_xlabel("instructions issued per FFMA, multiply loop (1.0 = pure FFMA)")
ax_loop.set_title("The multiply loop's instruction mix, per FFMA", fontsize=10)
ax_slice.set_xlabel("instructions issued per FFMA, one staged slice per thread (model)")
ax_slice.set_title("Staging + multiply: issue slots per FFMA", fontsize=10)
nb.caption(fig, "Static SASS counts for sm_90 (" + figures["source"] + "), not timings. Right: loop bodies "
           "only, loop set-up not counted (a lower bound). In an issue-bound kernel time is proportional to it.")
fig.tight_layout()

# %% [markdown]
# The same lesson at full size: the `fused` kernel's multiply loop (8x8 outputs per thread, 64 FFMA per
# rank-1 update), as the audit reads it before and after issue 10 rewrote it in this discipline. The
# "after" figures come from the planner's table of compiled counts (`deftnumba/dcn/data/`, regenerated
# by `python -m deftnumba audit --planner-table`); the "before" ones are the audit's reading of the old
# kernel, quoted from `docs/perf-notes.md` ("Before and after issues 10 and 11"). Static predictions,
# not GPU times: no GPU has run this code yet.

# %%
from deftnumba.dcn import audit as layer_audit
from deftnumba.dcn.kernels import fused_tiled

FUSED_BEFORE = {"registers": 214, "per_update": 135.0, "ffma_share": 0.474, "lds": "32-bit LDS"}  # perf-notes
table = layer_audit.load_planner_table()
key = layer_audit.planner_key("float32", fused_tiled.GPU_CONFIG.reg_oc, fused_tiled.GPU_CONFIG.reg_px)
entry = table["configs"][key] if table and key in table["configs"] else None
if entry:
    mult = entry["phases"]["multiply"]
    fused_rows = [
        {"fused, deft64 (8x8 per thread)": "registers", "before": FUSED_BEFORE["registers"],
         "after": entry["registers"]},
        {"fused, deft64 (8x8 per thread)": "multiply loop: instructions per rank-1 update (64 FFMA)",
         "before": FUSED_BEFORE["per_update"], "after": mult["body"]},
        {"fused, deft64 (8x8 per thread)": "multiply loop: FFMA share",
         "before": f"{100 * FUSED_BEFORE['ffma_share']:.1f}%", "after": f"{100 * mult['ffma'] / mult['body']:.1f}%"},
        {"fused, deft64 (8x8 per thread)": "multiply loop: shared loads", "before": FUSED_BEFORE["lds"],
         "after": "LDS.128"},
    ]
    nb.show(nb.markdown_table(fused_rows, floats=".4g"))
else:
    nb.show(nb.missing_api(f"the planner table entry {key}", "python -m deftnumba audit --planner-table"))

# %%
before, after = figures["variants"]["before"], figures["variants"]["after"]
slice_before, slice_after = lesson.slice_model(before), lesson.slice_model(after)
nb.show(
    "**Reading.** Numba types every Python integer as **int64**, and `uint32 + int` or `int32 + int32` as "
    "int64 too, so unless told otherwise every index is 64-bit arithmetic: two instructions per add "
    f"(`IADD3` + `IADD3.X`), `IMAD.WIDE` per product, and 64-bit loop counters ({before['kernel_int64']} "
    f"64-bit integer instructions in the before kernel, {after['kernel_int64']} after, those left forming "
    "global addresses, which are 64-bit on the GPU). Every *signed* subscript also gets Python's wraparound "
    "test (`i < 0` means `i + size`), which LLVM can drop only where it proves the index non-negative; in "
    "the before kernel's staging it cannot, and the signed `e // TILE_K` and `e % TILE_K` carry Python's "
    "floor-division sign fix-ups as well. Wrapping each index in `u32(...)` after each operation tells LLVM the value "
    "fits in 32 bits, so it narrows the arithmetic, and an unsigned index needs no wraparound test: "
    f"staging costs {before['staging_per_element']:.0f} instructions per element before and "
    f"{after['staging_per_element']:.0f} after. In the multiply loop, a thread that owns 4 *consecutive* "
    "rows reads them with one `LDS.128` from a 16-byte-aligned flat shared array, where strided ownership "
    f"needs four scalar `LDS`: {before['loop_per_step']:.0f} instructions per 16 FFMA become "
    f"{after['loop_per_step']:.1f} ({100 * before['loop_ffma_share']:.0f}% -> "
    f"{100 * after['loop_ffma_share']:.0f}% FFMA), and registers drop from {before['registers']} to "
    f"{after['registers']} (more resident warps to hide latency). For an issue-bound kernel the time is "
    f"the instructions issued: per staged slice the model counts {slice_before['total']:.0f} -> "
    f"{slice_after['total']:.0f} per thread, a predicted **{slice_before['total'] / slice_after['total']:.1f}x** "
    "less issue time for the same FLOPs. This toy still spends much of its slots staging (a 4x4 block "
    "reuses each staged value only 4 times); the `fused` kernel's 8x8 blocks are how the real multiply "
    "loop reaches ~92% FFMA. All static predictions from the SASS; no GPU has timed them.")
