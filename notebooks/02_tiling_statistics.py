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
# # 02 · Tiling statistics: how far do deformable taps wander?
#
# **Motivation.** The fused DCN kernel (`method="fused"`, `deftnumba/dcn/kernels/fused_tiled.py`)
# never writes the column matrix to device memory. Each block owns a tile of output pixels and
# stages in shared memory the input region its taps would read *if every offset were zero*,
# widened by a `halo` of extra rows and columns. A deformed tap whose 2x2 bilinear footprint
# still lands inside that region is read from shared memory (*in-tile*); one that lands outside
# costs four scattered global reads (*out-of-tile*).
#
# So the right tile depends on the offsets. Bigger tiles and halos catch more taps, but cost
# shared memory, occupancy, and halo rows that neighbouring tiles load twice. DefT's second idea
# is to measure the offsets' statistics and size the tile from them. This notebook:
#
# 1. looks at offsets: synthetic smooth random fields, and offsets a real network *learned*;
# 2. predicts the out-of-tile fraction from the statistics alone (`deftnumba.tiling`'s model),
#    and checks it against two counts: a NumPy brute force, and the kernel itself, built with
#    counters and run in the simulator;
# 3. shows how the planner picks a tile, and what the pick buys in time;
# 4. leaves you one cell to try your own tile and halo.

# %%
import os

os.environ.setdefault("DEFTNUMBA_QUIET", "1")  # the banner below prints the backend line

import dataclasses

import matplotlib.pyplot as plt
import numpy as np

import deftnumba as dn
from deftnumba.dcn import offsets
from deftnumba.dcn.planning import plan as tiling
from deftnumba import notebook as nb
from deftnumba.dcn.geometry import Geometry
from deftnumba.dcn.kernels import fused_tiled

MODE = nb.mode()
nb.show(MODE.banner())

# %% [markdown]
# ## 1. Offsets, synthetic
#
# `offsets.smooth_field` makes offsets with two knobs: the **magnitude** (RMS of every `dy` and
# `dx`, in input pixels) and the **correlation length** (the width, in output pixels, of the
# Gaussian that smooths white noise). Magnitude decides how far taps move; correlation decides
# whether neighbouring pixels move together, which is what makes a *shared* tile useful.

# %%
fields = {f"RMS 1 px, corr. length {c:g} px": offsets.smooth_field(4, 9, 16, 16, magnitude=1.0, correlation=c, seed=0)
          for c in (0, 2, 4)}
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for ax, (label, field) in zip(axes, fields.items()):
    nb.plot_offset_field(ax, field, tap=4, title=f"{label}\nneighbour corr. {offsets.neighbour_correlation(field):.2f}")
fig.suptitle("Synthetic offsets of the centre tap (arrows: (dx, dy) in input px; shade: length)", fontsize=10)
fig.tight_layout()

# %% [markdown]
# ## 2. Offsets, learned
#
# Synthetic fields are easy to sweep, but are they realistic? `data/offsets/digits_dcn.npz` holds
# offsets that a small network learned. How they were made (all on the CPU, nothing downloaded):

# %%
learned = offsets.load_learned()
meta = learned["meta"]
nb.show(f"- **data:** {meta['description']}\n"
        f"- **network:** {meta['network']}\n"
        f"- **training:** {meta['epochs']} epochs, Adam, seed {meta['seed']}, {meta['train_images']} train / "
        f"{meta['test_images']} test images, {meta['train_seconds']} s on the CPU; "
        f"**test accuracy {meta['test_accuracy']:.1%}**\n"
        f"- **versions:** torch {meta['torch']}, scikit-learn {meta['scikit_learn']}; made {meta['created']}\n"
        f"- **regenerate:** `{meta['command']}`")

# %%
rows = []
for name, field in learned["layers"].items():
    layer = meta["layers"][name]
    rows.append({"field": f"learned {name} ({layer['height']}x{layer['width']})", **offsets.summarize(field)})
for label, field in fields.items():
    rows.append({"field": f"synthetic {label}", **offsets.summarize(field)})
nb.show(nb.markdown_table(rows, ["field", "rms_px", "mean_dy_px", "mean_dx_px", "p50_length_px",
                                 "p90_length_px", "p99_length_px", "neighbour_correlation"], floats=".2f"))

# %%
dcn1 = learned["layers"]["dcn1"]
matched = offsets.smooth_field(*dcn1.shape[:1], 9, *dcn1.shape[2:], magnitude=offsets.summarize(dcn1)["rms_px"],
                               correlation=2.0, seed=1)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
nb.plot_offset_histograms(left, {"learned dcn1 (16x16)": dcn1, "learned dcn2 (8x8)": learned["layers"]["dcn2"],
                                 "synthetic, same RMS as dcn1": matched})
left.set_title("Distribution of offset components")
nb.plot_offset_field(right, dcn1, image=0, tap=0, title="learned dcn1, top-left tap, test image 0\n(arrows: offsets; shade: length)")
fig.tight_layout()

# %%
learned_rows = {name: offsets.summarize(field) for name, field in learned["layers"].items()}
corr = [r["neighbour_correlation"] for r in learned_rows.values()]
rms = {name: r["rms_px"] for name, r in learned_rows.items()}
nb.show(
    "**Reading.** The learned offsets are small and smooth: the median tap moves "
    + ", ".join(f"{r['p50_length_px']:.1f} px in {name}" for name, r in learned_rows.items())
    + ", and neighbouring pixels move together "
    f"(neighbour correlation {min(corr):.2f} to {max(corr):.2f}, like a synthetic field with a correlation length "
    "of a few pixels). The first layer's histogram is more peaked at zero than a Gaussian of the same RMS: many "
    "taps barely move, others move a pixel or two. The second layer, at half the resolution, moves its taps "
    + (f"{rms['dcn2'] / rms['dcn1']:.1f}x as far (RMS, in its own pixels). " if {"dcn1", "dcn2"} <= set(rms) else "")
    + "The arrow map shows where the network spends its offsets: they are longest (darkest) on the strokes of "
    "the digit and short on the empty background. One thing the pooled histogram hides: each *tap* has its own "
    "mean. The table below shows that the network pushes the top row of taps up and the bottom row down (the "
    "receptive field *grows*), which matters for the next section.")

# %%
dy, dx = offsets.components(dcn1)
tap_rows = [{"tap (i, j)": f"({k // 3}, {k % 3})", "mean dy px": float(dy[:, k].mean()),
             "mean dx px": float(dx[:, k].mean())} for k in range(9)]
nb.show(nb.markdown_table(tap_rows, floats="+.2f"))

# %% [markdown]
# ## 3. The out-of-tile fraction: model against counts
#
# The rule, stated once in the package (`fused_tiled.OUT_OF_TILE`), in short: a sample is
# *in-tile* when its 2x2 bilinear window lies inside the staged region
# `(TH-1)*stride + (kh-1)*dil + 1 + 2*halo` rows by the same in columns; otherwise it is
# out-of-tile. Three ways to get the fraction of out-of-tile samples:
#
# * **model** (`tiling.out_of_tile_fraction`): from the distribution of `floor(dy)` and
#   `floor(dx)` alone, assuming every (pixel, tap) draws them independently. Cheap: it is
#   what the planner evaluates for hundreds of candidate tiles;
# * **brute force** (`tiling.brute_force_counts`): applies the rule to every sample in NumPy;
# * **instrumented** (`fused_tiled.count_out_of_tile`): the fused kernel itself, compiled with
#   counters, run here on a few tiles (in the simulator without a GPU).
#
# The layer is the learned `dcn1` one: 16x16, 3x3, padding 1 (one channel is enough: every
# channel of an offset group samples at the same places).

# %%
geometry = Geometry(batch=dcn1.shape[0], in_channels=1, height=16, width=16, out_channels=2,
                    kernel_h=3, kernel_w=3, pad_h=1, pad_w=1, has_mask=False)
stats = tiling.offset_statistics(dcn1)
tiles, halos = (2, 4, 8), (0, 1, 2, 3)
# Model and NumPy count over tiles x halos: [tile, halo] arrays of out-of-tile fractions.
sweep = tiling.out_of_tile_sweep(geometry, dcn1, tiles=[(t, t) for t in tiles], halos=halos, count="numpy")
model, brute = sweep["model"], sweep["measured"]


def tile_config(side, halo):
    """A fused-kernel tile of side x side pixels with 16 threads or fewer (cheap to simulate)."""
    return tiling.TileConfig(side, side, halo, chunk=1, oc_block=2, reg_oc=2, reg_px=max(1, side * side // 16))


# The instrumented kernel runs on 2 images and the tiles >= 4 (cheap in the simulator).
two = dataclasses.replace(geometry, batch=2)
instrumented = {(t, h): fused_tiled.count_out_of_tile(two, dcn1[:2], tile_config(t, h))
                for t in (4, 8) for h in (0, 1, 2)}
agree = all(c == tiling.brute_force_counts(two, dcn1[:2], tile_config(t, h)) for (t, h), c in instrumented.items())
# The chart's x markers (2 images) beside its o markers (the brute force over all images):
gap = max(abs(c["out_of_tile_fraction"] - brute[tiles.index(t), h]) for (t, h), c in instrumented.items())
nb.show(f"Instrumented kernel vs NumPy brute force on the same 2 images, {len(instrumented)} (tile, halo) pairs: "
        f"**{'identical counts' if agree else 'COUNTS DIFFER'}**. In the chart below, the kernel's x markers "
        f"(those 2 images) sit up to {100 * gap:.2f} percentage points from the o markers, which count all "
        f"{dcn1.shape[0]} images: a difference of sample, not of rule.")

# %% [markdown]
# For contrast, the same comparison on a synthetic field with the learned layer's RMS, on a
# 64x64 layer (room for bigger tiles). Synthetic taps are independent and zero-mean, exactly the
# model's assumption.

# %%
wide = Geometry(batch=2, in_channels=1, height=64, width=64, out_channels=2, kernel_h=3, kernel_w=3,
                pad_h=1, pad_w=1, has_mask=False)
synthetic = offsets.for_geometry(wide, magnitude=offsets.summarize(dcn1)["rms_px"], correlation=2.0, seed=3)
wide_tiles = (2, 4, 8, 16)
wide_sweep = tiling.out_of_tile_sweep(wide, synthetic, tiles=[(t, t) for t in wide_tiles], halos=halos)
wide_model, wide_brute = wide_sweep["model"], wide_sweep["measured"]

# %%
FLOOR = 1e-2  # percent; the log axis cannot show 0, so smaller values are drawn on this line
colors = plt.cm.viridis(np.linspace(0, 0.85, len(halos)))
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
panels = ((axes[0], tiles, model, brute, "learned dcn1 offsets, 16x16 layer"),
          (axes[1], wide_tiles, wide_model, wide_brute, "synthetic offsets (same RMS), 64x64 layer"))
for ax, ts, mod, bru, title in panels:
    for j, color in enumerate(colors):
        ax.plot(ts, np.maximum(100 * mod[:, j], FLOOR), "-", color=color)
        ax.plot(ts, np.maximum(100 * bru[:, j], FLOOR), "o", color=color, mfc="none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ts, [f"{t}x{t}" for t in ts])
    ax.set_xlabel("tile of output pixels (TH x TW)")
    ax.set_title(title, fontsize=10)
    ax.axhline(FLOOR, color="0.8", lw=0.8, zorder=0)
for (t, h), c in instrumented.items():
    axes[0].plot(t, max(100 * c["out_of_tile_fraction"], FLOOR), "x", color=colors[halos.index(h)], ms=9)
axes[0].set_ylabel("out-of-tile samples (% of in-band, log)")
handles = [plt.Line2D([], [], color=c, lw=2) for c in colors]
handles += [plt.Line2D([], [], color="k", ls="-"), plt.Line2D([], [], color="k", ls="", marker="o", mfc="none"),
            plt.Line2D([], [], color="k", ls="", marker="x")]
labels = [f"halo {h}" for h in halos] + ["model (statistics only)", "brute-force count",
                                         "instrumented kernel (2 images)"]
fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.935), ncol=len(labels), fontsize=8,
           frameon=False)
nb.caption(fig, "Counts, not timings" + ("" if MODE.live else "; the instrumented kernel ran in the simulator")
           + f". Values below {FLOOR:g}% (including exact zeros) are drawn at {FLOOR:g}%.")
fig.suptitle("Out-of-tile fraction against tile size and halo: model vs counts", fontsize=11)
fig.tight_layout(rect=(0, 0, 1, 0.9))

# %%
i4, i8 = tiles.index(4), tiles.index(8)
nb.show(f"Numbers, learned offsets: with 4x4 tiles and no halo, **{100 * brute[i4, 0]:.0f}%** of the samples "
        f"leave the tile (model: {100 * model[i4, 0]:.0f}%); a halo of 1 brings that to "
        f"**{100 * brute[i4, 1]:.1f}%** (model {100 * model[i4, 1]:.1f}%), and 8x8 tiles with halo 2 to "
        f"**{100 * brute[i8, 2]:.2f}%** (model {100 * model[i8, 2]:.2f}%). Synthetic offsets, 4x4 tiles, halo 1: "
        f"**{100 * wide_brute[1, 1]:.1f}%** counted, {100 * wide_model[1, 1]:.1f}% modelled.")

# %%
def ratios(worse, better):
    """worse / better where both are non-zero (an exact zero has no ratio)."""
    return [w / b for w, b in zip(np.ravel(worse), np.ravel(better)) if w > 0 and b > 0]


halo_cuts = ratios(brute[:, :-1], brute[:, 1:])        # one more pixel of halo, same tile
tile_cuts = ratios(brute[:-1, :], brute[1:, :])        # tile side doubled, same halo
model_gap = ratios(brute[:, 1:], model[:, 1:])          # count / model once a halo is added
# Synthetic field: relative gap where the count is at least 1%, and the largest ratio below that.
big = wide_brute >= 0.01
wide_gap = np.abs(wide_model[big] / wide_brute[big] - 1)
small_gap = ratios(wide_brute[~big], wide_model[~big]) + ratios(wide_model[~big], wide_brute[~big])
nb.show(
    "**Reading.** Three things.\n\n"
    f"* The kernel's own counters and the NumPy brute force {'agree exactly' if agree else 'DIFFER'}, so the "
    "rule the planner reasons about is the rule the kernel runs.\n"
    f"* The **halo does most of the work.** On the learned offsets each extra pixel of halo cuts the out-of-tile "
    f"fraction {min(halo_cuts):.1f}x to {max(halo_cuts):.0f}x, while doubling the tile side cuts it only "
    f"{min(tile_cuts):.1f}x to {max(tile_cuts):.1f}x: a tile's interior pixels rarely leave it, only its border "
    "does, and the border's share shrinks slowly as the tile grows.\n"
    f"* On the synthetic field, whose taps are independent and zero-mean, the model follows the counts: within "
    f"{100 * wide_gap.max():.0f}% of them wherever at least 1% of the samples leave the tile"
    + (f" (below 1%, where a few samples decide, it is off by up to {max(small_gap):.1f}x)" if small_gap else "")
    + ". On the learned offsets it **underestimates** them "
    f"once a halo is added: the count is {min(model_gap):.1f}x to {max(model_gap):.1f}x the model. The model pools "
    "every tap into one distribution, but the learned layer moves its top-row taps up and its bottom-row taps down "
    "(the tap table above). The outer taps sit nearest the edge of the staged region and move outward. A per-tap "
    "model would close that gap.")

# %% [markdown]
# ## 4. How the plan picks a tile
#
# `tiling.choose_plan(geometry, stats, device)` walks the candidate tiles, evaluates the
# out-of-tile model and a cost model (FLOPs, staged and out-of-tile bytes, shared memory,
# occupancy) for each, and keeps the cheapest. `tiling.rank_tiles` shows what it weighed. The
# layer is the DefT paper's (`deft64`: 8 images, 64 -> 64 channels, 64x64, 3x3), the device the
# **H200 cost model** (`tiling.H200`, datasheet-level numbers), and the statistics those of the
# learned offsets. Every time below is the model's **prediction, not a measurement**.

# %%
deft64 = Geometry(batch=8, in_channels=64, height=64, width=64, out_channels=64, kernel_h=3, kernel_w=3,
                  pad_h=1, pad_w=1)
ranked, seen = [], set()
for tile, terms in tiling.rank_tiles(deft64, stats, top=40, device=tiling.H200):
    if (tile.tile_h, tile.tile_w, tile.halo) in seen:      # register-blocking variants tie: show one
        continue
    seen.add((tile.tile_h, tile.tile_w, tile.halo))
    ranked.append({"tile": f"{tile.tile_h}x{tile.tile_w}", "halo": tile.halo,
                   "out-of-tile %": 100 * terms["out_of_tile"], "shared KiB": terms["shared_bytes"] / 1024,
                   "blocks/SM": terms["blocks_per_sm"], "halo re-reads": terms["halo_redundancy"],
                   "compute us": 1e6 * terms["compute_s"], "memory us": 1e6 * terms["memory_s"],
                   "predicted us": 1e6 * terms["seconds"]})
nb.show(nb.markdown_table(ranked[:6], floats=".3g"))

# %% [markdown]
# Now the plan for offsets of growing magnitude (smooth synthetic fields), next to the learned ones:

# %%
candidates = {"learned dcn1": stats}
for magnitude in (0.5, 2.0, 4.0):
    candidates[f"synthetic RMS {magnitude:g} px"] = tiling.offset_statistics(
        offsets.smooth_field(2, 9, 64, 64, magnitude=magnitude, correlation=2.0, seed=2))
im2col_ms = tiling.predict(deft64, stats, "im2col", None, tiling.H200)["seconds"] * 1e3
plan_rows = []
for label, s in candidates.items():
    plan = tiling.choose_plan(deft64, s, device=tiling.H200)
    t = plan.tile
    plan_rows.append({"offsets": label, "method": plan.method,
                      "tile": f"{t.tile_h}x{t.tile_w}" if t else "-", "halo": t.halo if t else "-",
                      "out-of-tile %": 100 * plan.out_of_tile, "shared KiB": plan.shared_bytes / 1024,
                      "predicted ms": plan.predicted_ms})
nb.show(nb.markdown_table(plan_rows, floats=".3g")
        + f"\n\nFor comparison the same model predicts **{im2col_ms:.3f} ms** for `im2col` on this layer "
        "(cost-model predictions on H200 datasheet leads, not measurements).")

# %%
synthetic_plans = plan_rows[1:]
compute = [r["compute us"] for r in ranked[:6]]
memory = [r["memory us"] for r in ranked[:6]]
predicted = [r["predicted us"] for r in ranked[:6]]
bound = "compute" if min(compute) > max(memory) else "memory" if max(compute) < min(memory) else "neither clearly"
nb.show(
    "Numbers: as the synthetic offsets grow from "
    + " to ".join(r["offsets"].removeprefix("synthetic RMS ") for r in synthetic_plans)
    + ", the planned halo goes " + " -> ".join(str(r["halo"]) for r in synthetic_plans)
    + ", shared memory " + " -> ".join(f"{r['shared KiB']:.1f}" for r in synthetic_plans) + " KiB, and the "
    + "out-of-tile fraction it accepts " + " -> ".join(f"{r['out-of-tile %']:.2g}%" for r in synthetic_plans)
    + f". For the learned offsets: a {plan_rows[0]['tile']} tile with halo {plan_rows[0]['halo']}, "
    f"{plan_rows[0]['out-of-tile %']:.2g}% out-of-tile. Among the top tiles the model's compute term is "
    f"{min(compute):.0f}-{max(compute):.0f} us against {min(memory):.0f}-{max(memory):.0f} us of memory "
    f"(**{bound}-bound**), and their predicted times differ by {100 * (max(predicted) / min(predicted) - 1):.1f}%.")

# %% [markdown]
# **Reading.** Two things stand out.
#
# * As the offsets grow, the planner **widens the halo**, which costs a few rows of shared memory,
#   and lets the out-of-tile fraction rise only when more halo would cost more than the
#   scattered reads it saves.
# * On this layer the model says the fused kernel is **compute-bound**: the FMA work outweighs the
#   memory traffic for every top tile, so their predicted times differ little (by how much: the
#   line above). The tile choice works on the memory side: it keeps that side hidden under the compute. Whether it
#   stays hidden on a real H200 is a question for a measurement (below): the out-of-tile reads cost
#   latency as well as bytes.
#
# ### What the pick buys, measured
#
# Predictions are not measurements. The bench records the fused kernel with the planned tile
# against fixed tiles on a GPU; without those records there is nothing honest to plot.

# %%
if MODE.live:
    field = offsets.for_geometry(deft64, magnitude=offsets.summarize(dcn1)["rms_px"], correlation=2.0, seed=4)
    timed = nb.time_tiles(deft64, field, tiling.H200)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(timed)
    medians = [timed[n]["median_ms"] for n in names]
    errors = [[m - timed[n]["p10_ms"] for n, m in zip(names, medians)],
              [timed[n]["p90_ms"] - m for n, m in zip(names, medians)]]
    ax.barh(names, medians, xerr=errors, capsize=3, color=["C3"] + ["C0"] * (len(names) - 2) + ["0.6"])
    ax.invert_yaxis()
    ax.set_xlabel(f"time per forward call, ms ({timed[names[0]]['unit']}; bars p10-p90)")
    ax.set_title("deft64 forward, learned-like offsets: the planned tile against others", fontsize=10)
    nb.caption(fig, nb.live_caption() + "; 50 runs after 3 warm-ups each")
    fig.tight_layout()
else:
    nb.show(nb.not_recorded("fused-kernel time with the planned tile against other tiles")
            + " The bench records one tile per method, so this comparison is timed live: "
              "run this notebook on a GPU machine to see it.")

# %% [markdown]
# ## 5. Try it: your own tile and halo
#
# Change `TILE` and `HALO` and re-run this cell (Shift+Enter). It prints the model's out-of-tile
# fraction for the learned offsets on the `deft64` layer, the brute-force count on the 16x16
# learned layer, the staged region and its shared memory, and the cost model's predicted time.

# %%
TILE = 8   # output pixels per side of the tile (TH = TW)
HALO = 1   # extra staged rows/columns on each side

# The same candidate the ranked table above shows for this tile and halo (its best register
# blocking), so the two agree; a tile the planner does not consider gets a plain blocking.
same = [t for t, _ in tiling.rank_tiles(deft64, stats, top=100_000, device=tiling.H200)
        if (t.tile_h, t.tile_w, t.halo) == (TILE, TILE, HALO)]
tile = same[0] if same else tiling.TileConfig(TILE, TILE, HALO, chunk=4, oc_block=64, reg_oc=4,
                                              reg_px=max(d for d in range(1, 9) if TILE * TILE % d == 0))
rows_, cols_ = tile.staged_shape(deft64)
prediction = tiling.predict(deft64, stats, "fused", tile, tiling.H200)
nb.show(f"- tile {TILE}x{TILE}, halo {HALO}, chunk {tile.chunk}, {tile.oc_block} output channels per block, "
        f"{tile.reg_oc}x{tile.reg_px} register blocking "
        + ("(the planner's best for this tile, as in the ranked table)" if same else
           "(a blocking of our choice: the planner does not consider this tile)") + "\n"
        f"- stages **{rows_}x{cols_}** input pixels per channel, "
        f"**{tile.shared_bytes(deft64) / 1024:.1f} KiB** of shared memory per block (limit 48 KiB static)\n"
        f"- out-of-tile, model on deft64 with the learned statistics: "
        f"**{100 * tiling.out_of_tile_fraction(deft64, stats, TILE, TILE, HALO):.2f}%**\n"
        f"- out-of-tile, brute force on the learned 16x16 layer: "
        f"**{100 * tiling.brute_force_counts(geometry, dcn1, tile)['out_of_tile_fraction']:.2f}%**\n"
        + (f"- cost model, H200 leads (prediction): **{prediction['seconds'] * 1e3:.3f} ms**"
           if prediction["feasible"] else "- cost model: this tile is not feasible on the H200 model"))
