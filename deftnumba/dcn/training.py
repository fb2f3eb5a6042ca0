"""Training-time benchmark: a fully DCN-enabled ResNet-50, per DCN implementation.

``python -m deftnumba bench --training``

The DefT paper reports the *normalised training time* of a ResNet whose 3x3
convs are deformable: the time of one training step divided by the time of the
same step with plain convs. This module measures it for

* ``conv``:        plain ResNet-50 (the denominator);
* ``torchvision``: DCNv2 in every 3x3 of layer2-4 through ``torchvision.ops.DeformConv2d``;
* ``deftnumba``:   the same network through ``deftnumba.torch.DeformConv2d``.

One step is forward + backward + ``torch.optim.SGD`` (momentum 0.9, weight
decay 1e-4) on one fixed synthetic batch (random 224x224 images and labels from
a fixed seed), fp32 with TF32 off for cuBLAS and cuDNN. Steps are timed with
CUDA events on torch's current stream (deftnumba's kernels run on that stream)
after warm-up steps (which also compile the Numba kernels); we report the
median and the p10/p90 band.

On the GPU the results are printed and written to
``data/bench/training/<timestamp>_<device>_<commit>.csv``: the layer benchmark's
provenance columns (``deftnumba.perf.provenance``), then ``COLUMNS``, with
``pass`` = ``train`` and ``method`` = the variant. (A subfolder, so that the
layer benchmark's "latest CSV in data/bench" never picks a training file.)

Without a GPU (the simulator backend) it is a **smoke run**: a tiny-width,
low-resolution ResNet on the CPU for a couple of steps, to show the pipeline
works end to end. Its times are simulator wall-clock times, labelled so, and
nothing is written under ``data/bench/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from ..perf import provenance as provenance_
from ..runtime import backend, timing

VARIANTS = ("conv", "torchvision", "deftnumba")
BENCH_DIR = provenance_.bench_dir()


@dataclasses.dataclass(frozen=True)
class Config:
    """One training-benchmark setting."""

    batch: int = 32
    resolution: int = 224
    width: int = 64                 # stem width; 64 is ResNet-50
    layers: tuple = (3, 4, 6, 3)    # bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50
    num_classes: int = 1000
    warmup: int = 5
    steps: int = 50                 # timed steps (the bench verb's --reps)
    lr: float = 0.1
    seed: int = 0

    @property
    def model_name(self) -> str:
        if self.width == 64 and tuple(self.layers) == (3, 4, 6, 3):
            return "resnet50"
        return f"resnet50-w{self.width}-" + "".join(str(b) for b in self.layers)


GPU_CONFIG = Config()
# Smoke run in the simulator: ResNet-50's depth at width 4, 32x32 images, two steps.
SMOKE_CONFIG = Config(batch=2, resolution=32, width=4, num_classes=10, warmup=0, steps=2)


def synthetic_batch(cfg: Config, device):
    """Random images (standard normal) and labels, from ``cfg.seed``."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch, 3, cfg.resolution, cfg.resolution, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen)
    return images.to(device), labels.to(device)


@contextlib.contextmanager
def fp32_settings():
    """fp32 means fp32: TF32 off for cuBLAS and cuDNN; cuDNN autotuning on, as in
    torchvision's reference training scripts (the same for every variant).
    Restored afterwards. CuPy's GEMMs use TF32 only with ``CUPY_TF32=1``, which we refuse."""
    import torch

    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise RuntimeError("CUPY_TF32 is set: the fp32 training benchmark needs TF32 off")
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark)
    flags[0].allow_tf32 = flags[1].allow_tf32 = False
    flags[1].benchmark = True
    try:
        yield
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark = saved


def time_variant(variant: str, cfg: Config, device) -> dict:
    """Train ``variant`` on one fixed batch; per-step times (ms) and the losses."""
    import torch
    import torch.nn.functional as F

    from .models import deformable_layers, resnet50

    torch.manual_seed(cfg.seed)
    model = resnet50(variant, num_classes=cfg.num_classes, width=cfg.width, layers=cfg.layers).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    images, labels = synthetic_batch(cfg, device)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    # The one timer: torch's CUDA events on a GPU (L2 flushed before each step), the host clock otherwise.
    times = timing.Timer().time(lambda: None, lambda _: step(), cfg.steps, cfg.warmup, framework="torch",
                                case_seconds=float("inf"))
    losses = [float(loss) for loss in losses]
    result = {
        "variant": variant, "dcn_layers": len(deformable_layers(model)),
        "params": sum(p.numel() for p in model.parameters()),
        "median_ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
        "p90_ms": float(np.percentile(times, 90)), "steps": len(times),
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if not backend.IS_SIMULATOR:
            backend.cupy().get_default_memory_pool().free_all_blocks()
    return result


def available_variants(requested) -> tuple[list[str], dict[str, str]]:
    """The requested variants that can run here, and why the others cannot."""
    skipped = {}
    runnable = []
    for variant in requested:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected some of {VARIANTS}")
        if variant == "torchvision":
            try:
                import torchvision.ops  # noqa: F401
            except ImportError:
                skipped[variant] = "torchvision is not installed"
                continue
        runnable.append(variant)
    return runnable, skipped


def run(cfg: Config, variants=VARIANTS, device=None) -> tuple[list[dict], dict[str, str]]:
    """Time each runnable variant; add ``normalized`` (relative to ``conv``)."""
    import torch

    if device is None:
        device = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")
    runnable, skipped = available_variants(variants)
    rows = []
    with fp32_settings():
        for variant in runnable:
            rows.append(time_variant(variant, cfg, device))
    base = next((r["median_ms"] for r in rows if r["variant"] == "conv"), None)
    for r in rows:
        r["normalized"] = r["median_ms"] / base if base else float("nan")
        r["images_per_s"] = cfg.batch / (r["median_ms"] / 1e3)
    return rows, skipped


def comparison(rows: list[dict]) -> dict | None:
    """deftnumba against torchvision: speedup of the step and reduction of the normalised time."""
    by = {r["variant"]: r for r in rows}
    if "deftnumba" not in by or "torchvision" not in by:
        return None
    ours, theirs = by["deftnumba"], by["torchvision"]
    out = {"step_speedup": theirs["median_ms"] / ours["median_ms"]}
    if "conv" in by:
        # DefT's "46% lower normalised training time" compares the DCN overheads.
        out["normalized_reduction"] = 1.0 - ours["normalized"] / theirs["normalized"]
        out["overhead_reduction"] = 1.0 - (ours["normalized"] - 1.0) / (theirs["normalized"] - 1.0)
    return out


def format_table(rows: list[dict], skipped: dict[str, str], cfg: Config, smoke: bool) -> str:
    unit = "simulator wall-clock ms (CPU, not GPU timings)" if smoke else "GPU ms, CUDA events"
    lines = []
    if smoke:
        lines.append("SIMULATOR SMOKE RUN: tiny model on the CPU; these are not GPU timings, "
                     "and nothing is written to data/bench/.")
    lines.append(f"device: {backend.device_info()['device']}")
    lines.append(f"training step: {cfg.model_name}, batch {cfg.batch}, {cfg.resolution}x{cfg.resolution}, "
                 f"fp32 (TF32 off), SGD; {cfg.warmup} warm-up + {cfg.steps} timed steps; {unit}")
    lines.append(f"{'variant':<12} {'DCN':>4} {'median ms':>11} {'p10 ms':>10} {'p90 ms':>10} "
                 f"{'normalized':>10} {'img/s':>9} {'loss first->last':>18}")
    for r in rows:
        lines.append(f"{r['variant']:<12} {r['dcn_layers']:>4} {r['median_ms']:>11.2f} {r['p10_ms']:>10.2f} "
                     f"{r['p90_ms']:>10.2f} {r['normalized']:>10.3f} {r['images_per_s']:>9.1f} "
                     f"{r['first_loss']:>8.3f}->{r['last_loss']:<8.3f}")
    for variant, why in skipped.items():
        lines.append(f"{variant:<12} skipped: {why}")
    cmp = comparison(rows)
    if cmp:
        def change(fraction):
            return f"{100 * abs(fraction):.1f}% {'lower' if fraction >= 0 else 'higher'}"

        line = f"deftnumba vs torchvision: step speedup {cmp['step_speedup']:.2f}x"
        if "normalized_reduction" in cmp:
            line += (f"; normalized training time {change(cmp['normalized_reduction'])}"
                     f", DCN overhead over conv {change(cmp['overhead_reduction'])}"
                     f" (DefT reports 46% lower normalized training time)")
        lines.append(line)
    return "\n".join(lines)


# After the layer benchmark's provenance columns (deftnumba.perf.provenance), in this order.
COLUMNS = (
    "dtype", "tf32", "tf32_check", "cudnn_benchmark",
    "shape", "batch", "height", "width", "model_width", "blocks", "dcn_layers", "params",
    "pass", "method", "status", "reps", "warmup", "clock", "optimizer",
    "median_ms", "p10_ms", "p90_ms", "normalized", "speedup_vs_torchvision", "images_per_s",
    "first_loss", "last_loss",
)


def csv_rows(rows: list[dict], cfg: Config, tf32_check: str = "", commit: str | None = None) -> list[dict]:
    """CSV rows: the layer benchmark's provenance columns, then ``COLUMNS``."""

    common = provenance_.provenance(commit)
    by = {r["variant"]: r for r in rows}
    out = []
    for r in rows:
        row = dict(common)
        speedup = ""
        if "torchvision" in by:
            speedup = by["torchvision"]["median_ms"] / r["median_ms"]
        row.update({
            "dtype": "float32", "tf32": False, "tf32_check": tf32_check, "cudnn_benchmark": True,
            "shape": cfg.model_name, "batch": cfg.batch, "height": cfg.resolution, "width": cfg.resolution,
            "model_width": cfg.width, "blocks": "-".join(map(str, cfg.layers)), "dcn_layers": r["dcn_layers"],
            "params": r["params"], "pass": "train", "method": r["variant"], "status": "ok",
            "reps": r["steps"], "warmup": cfg.warmup,
            "clock": "simulator wall clock" if backend.IS_SIMULATOR else "cuda events",
            "optimizer": "SGD(lr=%g, momentum=0.9, weight_decay=1e-4)" % cfg.lr,
            "median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
            "normalized": r["normalized"], "speedup_vs_torchvision": speedup,
            "images_per_s": r["images_per_s"], "first_loss": r["first_loss"], "last_loss": r["last_loss"],
        })
        out.append(row)
    return out


def write_csv(rows: list[dict], directory: Path) -> Path:
    """Write ``rows`` under ``directory`` as the layer benchmark names its files
    (``<UTC timestamp>_<device>_<commit>.csv``)."""
    if backend.IS_SIMULATOR:
        provenance_.refuse_smoke_output(directory, BENCH_DIR)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / provenance_.csv_name(rows[0])
    fields = list(dict.fromkeys([*rows[0], *COLUMNS]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(args=None) -> int:
    """Entry point of ``python -m deftnumba bench --training``.

    Reads from ``args`` (an ``argparse.Namespace`` from the ``bench`` verb, or
    None), where present: ``method`` (variants to run, default all), ``reps``
    (timed steps), ``warmup``, ``out`` (a directory; default
    ``data/bench/training/``) and ``commit``. The smoke run ignores ``reps``
    and ``warmup``. Programmatic overrides win over both: ``training_steps``,
    ``training_warmup``, ``training_batch``, ``training_resolution``,
    ``training_width``, ``training_layers`` (blocks per stage).
    Returns the process exit status.
    """
    try:
        import torch
    except ImportError:
        print("the training benchmark needs torch: pip install 'deftnumba[torch]'")
        return 2
    smoke = backend.IS_SIMULATOR
    cfg = SMOKE_CONFIG if smoke else GPU_CONFIG
    overrides = {}
    if not smoke:
        for name, attr in (("steps", "reps"), ("warmup", "warmup")):
            if getattr(args, attr, None) is not None:
                overrides[name] = int(getattr(args, attr))
    for name in ("steps", "warmup", "batch", "resolution", "width"):
        value = getattr(args, f"training_{name}", None)
        if value is not None:
            overrides[name] = int(value)
    if getattr(args, "training_layers", None) is not None:
        overrides["layers"] = tuple(int(b) for b in args.training_layers)
    cfg = dataclasses.replace(cfg, **overrides)
    variants = [m for m in (getattr(args, "method", None) or VARIANTS)]
    unknown = [m for m in variants if m not in VARIANTS]
    if unknown:
        print(f"bench --training: unknown variant(s) {unknown}; expected some of {VARIANTS}")
        return 2
    if smoke:
        print("deftnumba: no GPU (simulator backend): running the training benchmark as a smoke run.")
    elif not torch.cuda.is_available():
        print("the cuda backend is active but torch sees no CUDA device")
        return 2

    start = time.perf_counter()
    rows, skipped = run(cfg, variants)
    print(format_table(rows, skipped, cfg, smoke))
    if smoke:
        print(f"smoke run done in {time.perf_counter() - start:.1f} s; no CSV written")
        return 0

    with fp32_settings():
        check = provenance_.tf32_check()
    out = getattr(args, "out", None)
    path = write_csv(csv_rows(rows, cfg, check, getattr(args, "commit", None)),
                     Path(out) if out else BENCH_DIR / "training")
    print(f"TF32 {check}")
    print(f"csv: {path}  ({time.perf_counter() - start:.1f} s)")
    return 0
