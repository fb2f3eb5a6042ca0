"""Latency-driven Tucker ranks: ``choose_ranks``.

TDC's point: a rank pair that halves a layer's FLOPs need not halve its time
(small channel counts leave the GPU idle, launches and 1x1 passes cost a fixed
amount), so ranks should be chosen by *latency*. Here, for each layer and each
candidate ``(r_out, r_in)`` (or "keep the dense layer"):

* **error**: the relative reconstruction error of the HOSVD at those ranks, for
  every pair at once: rotate the weight by the full singular bases of both
  unfoldings; the error at ``(r_out, r_in)`` is ``sqrt(1 - |G[:r_out, :r_in]|^2/|W|^2)``
  (orthogonal projections), read off a 2-D cumulative sum;
* **cost**: ``by="latency"``: the model's predicted time of the best method and
  tile (``tucker.model``; labelled predictions, no GPU) or, given ``latency_table``,
  measured times; ``by="flops"``: the layer's FLOPs.

The choice minimises the summed error subject to the budget (a multiple-choice
knapsack, solved by a Lagrangian sweep: each layer picks ``argmin error + lam*cost``
and ``lam`` is bisected until the total cost meets the budget). ``budget_ms`` is a
total time; ``speedup`` asks for ``dense / speedup`` (in time, or in FLOPs for
``by="flops"``).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import model, roofline
from .geometry import TuckerGeometry

FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)


@dataclass
class Layer:
    """A 3x3 (or any k x k) conv layer to compress: its shape and (optionally) weights."""

    name: str
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    batch: int = 1
    weight: np.ndarray | None = field(default=None, repr=False)

    def geometry(self, r_out: int, r_in: int) -> TuckerGeometry:
        return TuckerGeometry(self.batch, self.in_channels, self.height, self.width, self.out_channels, r_in, r_out,
                              self.kernel, self.kernel, self.stride, self.stride, self.padding, self.padding,
                              has_bias=False)


def _leading_vectors(a: np.ndarray) -> np.ndarray:
    """Left singular vectors of ``a`` (rows x many columns), strongest first, from the
    small Gram matrix ``a a^T`` (much cheaper than an SVD of the wide unfolding)."""
    values, vectors = np.linalg.eigh(a @ a.T)
    return vectors[:, ::-1]


def hosvd_errors(weight) -> np.ndarray:
    """``E[a, b]`` = relative HOSVD error at ranks ``(a+1, b+1)`` for a weight ``[Cout, C, kh, kw]``."""
    w = np.asarray(weight, dtype=np.float64)
    c_out, c = w.shape[:2]
    u_out = _leading_vectors(w.reshape(c_out, -1))
    u_in = _leading_vectors(w.transpose(1, 0, 2, 3).reshape(c, -1))
    taps = w.shape[2] * w.shape[3]
    rotated = (u_out.T @ w.reshape(c_out, -1)).reshape(-1, c, taps)          # [a, c, k]
    g = np.matmul(rotated.transpose(0, 2, 1), u_in)                           # [a, k, b]
    energy = (g ** 2).sum(axis=1).cumsum(0).cumsum(1)
    total = (w ** 2).sum()
    ratio = np.full((c_out, c), 0.0)
    ratio[:energy.shape[0], :energy.shape[1]] = energy / total if total > 0 else 1.0
    ratio[energy.shape[0]:, :] = ratio[energy.shape[0] - 1:energy.shape[0], :]
    ratio[:, energy.shape[1]:] = ratio[:, energy.shape[1] - 1:energy.shape[1]]
    return np.sqrt(np.clip(1 - ratio, 0, None))


def _rank_grid(channels: int, fractions) -> list[int]:
    return sorted({max(1, int(round(f * channels))) for f in fractions})


@functools.lru_cache(maxsize=None)
def _tiles(method: str, half: TuckerGeometry, device) -> tuple:
    return tuple(p.config for p in model.rank_configs(half, method, device=device, top=3, coarse=True))


@functools.lru_cache(maxsize=None)
def _predicted_ms(g: TuckerGeometry, device) -> float:
    """Predicted ms of the best of ``fused``, ``three_pass`` and (3x3 cores at stride 1)
    ``winograd`` and ``fused_winograd`` at these ranks, over a few tiles: the model's top 3
    (coarse grid) for the layer at half ranks."""
    half = replace(g, rank_out=max(1, g.out_channels // 2), rank_in=max(1, g.in_channels // 2))
    best = math.inf
    fits = {"fused": model.fused.fits, "fused_winograd": model.fused_winograd.fits}
    for method in ("fused", "three_pass", "winograd", "fused_winograd"):
        for t in _tiles(method, half, device):
            if method not in fits or fits[method](t, g):
                best = min(best, model.predict(g, method, t, device).ms)
    return best


@dataclass
class RankChoice:
    layer: str
    ranks: tuple | None          # (r_out, r_in), or None: keep the dense layer
    error: float
    cost: float                  # ms (latency) or FLOPs
    predicted_ms: float
    flops: float
    dense_ms: float
    dense_flops: float
    label: str = model.LABEL


def candidates(layer: Layer, by: str = "latency", fractions=FRACTIONS, device=model.H200,
               latency_table: dict | None = None, errors: np.ndarray | None = None) -> list[dict]:
    """Every candidate of one layer: ranks, error, predicted ms, FLOPs (and 'dense')."""
    if errors is None:
        w = layer.weight
        if w is None:
            rng = np.random.default_rng(0)
            w = rng.standard_normal((layer.out_channels, layer.in_channels, layer.kernel, layer.kernel))
        errors = hosvd_errors(w)
    dense_g = layer.geometry(layer.out_channels, layer.in_channels)
    dense_ms = model.predict(dense_g, "cudnn_conv", device=device).ms
    dense_flops = roofline.totals(dense_g, "cudnn_conv").flops
    rows = [dict(ranks=None, error=0.0, ms=dense_ms, flops=dense_flops)]
    for r_out in _rank_grid(layer.out_channels, fractions):
        for r_in in _rank_grid(layer.in_channels, fractions):
            g = layer.geometry(r_out, r_in)
            if latency_table is not None and (layer.name, r_out, r_in) in latency_table:
                ms = latency_table[(layer.name, r_out, r_in)]
            else:
                ms = _predicted_ms(g, device)
            rows.append(dict(ranks=(r_out, r_in), error=float(errors[r_out - 1, r_in - 1]), ms=ms,
                             flops=roofline.totals(g, "three_pass").flops))
    for r in rows:
        r["cost"] = r["ms"] if by == "latency" else r["flops"]
        r["dense_ms"], r["dense_flops"] = dense_ms, dense_flops
    return rows


def choose_ranks(layers, budget_ms: float | None = None, speedup: float | None = None, by: str = "latency",
                 fractions=FRACTIONS, device=model.H200, latency_table: dict | None = None,
                 _candidates: dict | None = None) -> list[RankChoice]:
    """Per-layer ranks minimising the summed HOSVD error under a budget.

    layers: ``Layer`` records (``resnet_layers`` builds them); exactly one of
    ``budget_ms`` (total predicted ms) or ``speedup`` (over the dense layers, in time
    for ``by="latency"``, in FLOPs for ``by="flops"``). Latencies are model
    predictions (labelled) unless ``latency_table[(name, r_out, r_in)]`` gives measured ms.
    """
    if by not in ("latency", "flops"):
        raise ValueError(f"by must be 'latency' or 'flops', got {by!r}")
    if (budget_ms is None) == (speedup is None):
        raise ValueError("give exactly one of budget_ms or speedup")
    table = _candidates or {l.name: candidates(l, by, fractions, device, latency_table) for l in layers}
    for rows in table.values():
        for r in rows:
            r["cost"] = r["ms"] if by == "latency" else r["flops"]
    dense_cost = sum(rows[0]["cost"] for rows in table.values())
    if speedup is not None:
        budget = dense_cost / speedup
    elif by == "latency":
        budget = budget_ms
    else:  # a time budget for a FLOPs-driven choice: the same fraction of the dense FLOPs
        budget = dense_cost * budget_ms / sum(rows[0]["ms"] for rows in table.values())

    def pick(lam):
        return {name: min(rows, key=lambda r: r["error"] + lam * r["cost"]) for name, rows in table.items()}

    lo, hi = 0.0, 1.0
    while sum(r["cost"] for r in pick(hi).values()) > budget and hi < 1e30:
        hi *= 4
    for _ in range(80):
        mid = (lo + hi) / 2
        if sum(r["cost"] for r in pick(mid).values()) > budget:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    total = sum(r["cost"] for r in chosen.values())
    if total > budget * (1 + 1e-9):
        warnings.warn(f"choose_ranks: the budget ({budget:.4g}) cannot be met; the cheapest choice costs "
                      f"{total:.4g} ({by})", stacklevel=2)
    return [RankChoice(name, r["ranks"], r["error"], r["cost"], r["ms"], r["flops"], r["dense_ms"], r["dense_flops"])
            for name, r in chosen.items()]


def resnet_layers(depth: int = 18, batch: int = 1, image: int = 224, seed: int = 0) -> list[Layer]:
    """The 3x3 convolutions of a torchvision ResNet-``depth`` (random weights, nothing is
    downloaded), with their input sizes from one forward pass on the CPU."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    layers: list[Layer] = []
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1:
            def hook(mod, inputs, output, name=name):
                x = inputs[0]
                layers.append(Layer(name, mod.in_channels, mod.out_channels, x.shape[2], x.shape[3], 3,
                                    mod.stride[0], mod.padding[0], batch, mod.weight.detach().double().numpy()))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(torch.zeros(1, 3, image, image))
    for h in hooks:
        h.remove()
    return layers
