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
# # 03 · Speedups: what fusion and tiling win back
#
# **Motivation.** Notebook 01 found where a DCN layer's time goes: the gather materialises a
# column matrix nine times the size of the input and reads the input in scattered sectors.
# Notebook 02 showed how the offsets' statistics size a tile that keeps most samples in shared
# memory. DefT (ASPLOS'23) reports that the two ideas together give **up to 2.34x** layer speedup
# over PyTorch's DCN and **46% lower normalised training time** for a fully DCN-enabled ResNet.
# This notebook asks how close `deftnumba` gets:
#
# 1. are all methods right? (a check of every forward and backward method, on every machine);
# 2. layer speedups over `torchvision` and over a dense cuDNN convolution, forward and
#    forward + backward, on the four suite shapes, with p10/p90 bands;
# 3. the training-time result;
# 4. percent of roofline: how much of the hardware each method uses.

# %%
import os

os.environ.setdefault("DEFTNUMBA_QUIET", "1")  # the banner below prints the backend line

import matplotlib.pyplot as plt
import numpy as np

import deftnumba as dn
from deftnumba.dcn import roofline
from deftnumba.bench import harness as bench
from deftnumba import notebook as nb

MODE = nb.mode()
nb.show(MODE.banner())

# %% [markdown]
# ## The contenders
#
# | name | what it is |
# | --- | --- |
# | `torchvision` | `torchvision.ops.deform_conv2d`: the baseline (im2col in one kernel, then a GEMM) |
# | `cudnn_conv` | a dense `conv2d` of the same shape: what the layer would cost without deformation |
# | `im2col` | our baseline: torchvision's design in separate launches (notebook 01 dissects it) |
# | `fused_columns` | one kernel builds the column matrix, computing each sampling point's corners and weights once for all channels of its group; cuBLAS GEMM |
# | `fused` | implicit GEMM: tiles of input staged in shared memory, no column matrix; tile from `deftnumba.tiling` |

# %%
nb.show(f"Forward methods in this build: {', '.join(f'`{m}`' for m in dn.METHODS)}.  \n"
        + (f"Backward methods: {', '.join(f'`{m}`' for m in dn.BACKWARD_METHODS)}."
           if hasattr(dn, "BACKWARD_METHODS") else nb.missing_api("deform_conv2d_backward", "backward work")))

# %% [markdown]
# ## 1. A check of every method
#
# Every forward method against the float64 NumPy reference, and every backward method (with the
# fast atomic input gradient and the bit-reproducible deterministic one) against the float64
# reference gradients, on a small irregular layer: 2 images, 3 -> 4 channels, 6x7, 3x3, mask and
# bias, offsets of about 1.5 pixels. On a GPU this runs on the GPU; here it runs in the simulator.

# %%
recorded = nb.recorded_results()
checks = nb.check_methods(seed=0)
nb.show(nb.markdown_table([{**r, "ok": "PASS" if r["ok"] else "FAIL"} for r in checks],
                          ["pass", "method", "rel_error", "tolerance", "worst_gradient", "ok"], floats=".1e"))
failed = [f"{r['pass']} {r['method']}" for r in checks if not r["ok"]]
assert not failed, f"methods disagree with the reference: {failed}"
nb.show(f"**All {len(checks)} checks pass** on {MODE.device}."
        + ("" if MODE.live else " These are correctness checks only: simulator times mean nothing for a GPU.")
        + ("" if MODE.live or recorded["layer"] or recorded["train"] else
           " **No GPU data is recorded yet** for the measurements below."))

# %% [markdown]
# ## 2. Layer speedups
#
# `python -m deftnumba bench` times every method and both baselines on the suite shapes with CUDA
# events (median of 50 runs after warm-up, L2 flushed between runs, TF32 off), and writes a CSV
# with its provenance under `data/bench/`. Speedup = baseline median / method median; the error
# bars span the method's p10 to p90.

# %%
rows = recorded["layer"]
if not rows and MODE.live:
    nb.show("No recorded results: timing `deft64` live now (fwd and fwd+bwd; a full run is "
            "`python -m deftnumba bench`).")
    rows = bench.run(bench.Config(suites=("deft64",), passes=("fwd", "fwdbwd"), plot=False, quiet=True))
if rows:
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for i, pass_ in enumerate(("fwd", "fwdbwd")):
        for j, baseline in enumerate(("torchvision", "cudnn_conv")):
            ax = axes[i, j]
            bench.plot_speedups(rows, baseline=baseline, pass_=pass_, ax=ax,
                                title=f"speedup over {baseline}, {'forward' if pass_ == 'fwd' else 'forward + backward'}")
            if ax.get_yscale() == "linear":
                ax.set_ylim(0, 1.35 * ax.get_ylim()[1])  # headroom for the legend
            ax.legend(fontsize=8, ncol=3, loc="upper center")
    nb.caption(fig, nb.recorded_caption(rows) + (f" ({recorded['layer_file'].name})" if recorded["layer_file"]
                                                  else " (timed live by this notebook)"))
    fig.tight_layout()
else:
    nb.show(nb.not_recorded("layer speedups over torchvision and cuDNN, forward and forward+backward, "
                            "on deft64, res128, det-c4 and det-c5"))

# %%
if rows:
    ok = [r for r in rows if r["status"] == "ok" and r["method"] in dn.METHODS and r.get("speedup_vs_torchvision")]
    for pass_ in ("fwd", "fwdbwd"):
        mine = [r for r in ok if r["pass"] == pass_]
        if mine:
            best = max(mine, key=lambda r: r["speedup_vs_torchvision"])
            nb.show(f"Best {'forward' if pass_ == 'fwd' else 'forward + backward'} speedup over torchvision: "
                    f"**{best['speedup_vs_torchvision']:.2f}x** (`{best['method']}` on {best['shape']}; "
                    f"p10-p90 of its time {best['p10_ms']:.3f}-{best['p90_ms']:.3f} ms). DefT: up to 2.34x.")

# %% [markdown]
# %%
floor_ratio = {m: [roofline.floor_ms(g, m, "fwd", roofline.H200_LEADS)
                   / roofline.floor_ms(g, "cudnn_conv", "fwd", roofline.H200_LEADS) for g in bench.SUITES.values()]
               for m in ("fused", "torchvision")}
nb.show("**What to look for.** Over `torchvision`, the fused methods should beat 1 on every shape; DefT's "
        "best case is 2.34x (the paper's figure). Over `cudnn_conv` every DCN method stays below 1 (the dense "
        "convolution does the same GEMM with no sampling), and the distance to 1 is the remaining DCN slowdown: "
        f"on notebook 01's floors a fused layer could come within {100 * (min(floor_ratio['fused']) - 1):.0f}% to "
        f"{100 * (max(floor_ratio['fused']) - 1):.0f}% of it, torchvision's design no closer than "
        f"{min(floor_ratio['torchvision']):.1f}x to {max(floor_ratio['torchvision']):.1f}x.")

# %% [markdown]
# ## 3. Training time
#
# `python -m deftnumba bench --training` (`deftnumba.training`) times one SGD step of a ResNet-50
# whose 3x3 convolutions in stages 2-4 are DCN v2, with each implementation, and divides by the
# step time of the plain ResNet-50: the *normalised training time* DefT reports.

# %%
train = recorded["train"]
if train:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    nb.plot_training(ax, train)
    nb.caption(fig, nb.recorded_caption(train) + f" ({recorded['train_file'].name})")
    fig.tight_layout()
    by = {r["method"]: r for r in train}
    if "deftnumba" in by and "torchvision" in by:
        ours, theirs = by["deftnumba"]["normalized"], by["torchvision"]["normalized"]
        nb.show(f"Normalised training time: torchvision **{theirs:.2f}**, deftnumba **{ours:.2f}**: "
                f"**{100 * (1 - ours / theirs):.0f}% lower** (DefT reports 46% lower).")
else:
    nb.show(nb.not_recorded("normalised training time of a DCN ResNet-50", "python -m deftnumba bench --training"))

# %% [markdown]
# ## 4. Percent of roofline
#
# How much of the H200 does each method use? `deftnumba.roofline` gives each (shape, method) a
# floor: its counted FLOPs and minimal bytes over the device's roofs. 100% means running at that
# floor. The fair yardstick across methods is the **ideal** floor, the fused layer's (inputs,
# offsets, mask and weights read once, output written once): it charges im2col for the column
# round trip it chose to make. Here are the floors that 100% stands for, on the H200 leads:

# %%
floor_rows = roofline.table(bench.SUITES, methods=("cudnn_conv", "torchvision", "im2col", "fused_columns", "fused"),
                            pass_="fwd", ceilings=roofline.H200_LEADS)
nb.show(roofline.format_table(floor_rows)
        + f"\n\nFloors from counted FLOPs and bytes over {roofline.H200_LEADS.name}: a model, not a measurement.")

# %%
if rows:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, pass_ in zip(axes, ("fwd", "fwdbwd")):
        nb.plot_percent_of_roofline(ax, rows, pass_=pass_, column="pct_ideal")
    nb.caption(fig, nb.recorded_caption(rows) + "; ceilings " + str(rows[0].get("ceilings", "")))
    fig.tight_layout()
else:
    nb.show(nb.not_recorded("percent of roofline per method and shape"))

# %% [markdown]
# **Reading.** This notebook reads like the end of a Triton tutorial only once a GPU has run the
# bench: the charts above then show the speedups with their p10/p90 bands, the training time, and
# the fraction of the roofline each method reaches, each stamped with the device and commit it
# was recorded on. Until then it shows what is known without a GPU: every method and both
# backward modes agree with the float64 reference, and the floors (notebook 01) bound what the
# measurements can show: `fused` cannot beat `cudnn_conv`'s floor, and `torchvision`'s design
# cannot get under its column round trip.
