"""The training study: ResNet against LeanResNet on scikit-learn's digits, on the CPU.

``python -m deftnumba.lean.training [--epochs 30] [--seeds 0 1 2] [--quick]``

The data: scikit-learn's ``load_digits`` (1797 grey 8x8 images of handwritten
digits, 10 classes; shipped inside the package, no download), scaled to [0, 1],
one fixed stratified split of 1257 training and 540 test images. It is a small
problem: a test of whether lean blocks *learn as well per parameter*, not a
reproduction of the paper's CIFAR/STL results.

The models share one skeleton (``models._network``): a dense 3x3 stem, two stages
of ``depth`` blocks at widths ``(w, 2w)`` joined by a strided 1x1 transition, global
pooling and a linear head. Only the blocks differ:

* ``resnet w``: ResNet basic blocks (dense 3x3 convolutions);
* ``lean w``: LeanResNet blocks (``star5`` lean operators, through torch ops).

Configurations: both at the same widths (*matched width*), and each at the other's
parameter count (*matched parameters*: the lean net widened, the ResNet narrowed, to
the nearest width). Every configuration is trained for a few seeds (initialisation
and batch order), with Adam and a cosine learning-rate schedule, and scored on the
test split. Results go to ``data/lean/digits_study.csv``; ``plot`` draws the chart.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "lean"
CSV_PATH = DATA_DIR / "digits_study.csv"
COLUMNS = ("label", "family", "widths", "depths", "params", "flops", "seed", "epochs", "test_accuracy",
           "final_train_loss")


@dataclass(frozen=True)
class Setting:
    label: str
    family: str        # "resnet" or "lean"
    widths: tuple
    depths: tuple = (1, 1)


def load_digits_split(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` as float32 ``[N, 1, 8, 8]`` in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=540, random_state=seed, stratify=digits.target)
    return x_train, y_train, x_test, y_test


def build(setting: Setting):
    from . import models

    if setting.family == "lean":
        return models.lean_resnet(setting.depths, setting.widths, 10, in_channels=1, impl="torch")
    return models.resnet(setting.depths, setting.widths, 10, in_channels=1)


def size_of(setting: Setting) -> tuple[int, int]:
    """``(parameters, FLOPs per 8x8 image)`` of a setting."""
    from . import models

    net = build(setting)
    return models.count_parameters(net), models.count_flops(net, (1, 1, 8, 8))


def _matched(family: str, target_params: int, depths=(1, 1)) -> Setting:
    """The ``family`` net whose widths ``(w, 2w)`` come nearest ``target_params``."""
    from . import models

    best = None
    for w in range(2, 129):
        s = Setting(f"{family} {w}", family, (w, 2 * w), depths)
        gap = abs(math.log(models.count_parameters(build(s)) / target_params))
        if best is None or gap < best[0]:
            best = (gap, s)
    return best[1]


def default_settings(width: int = 16, depths=(1, 1)) -> list[Setting]:
    """Matched width (ResNet and lean at ``(width, 2*width)``) and matched parameters
    (the lean net at the ResNet's count; the ResNet at the lean net's count)."""
    resnet = Setting(f"resnet {width}", "resnet", (width, 2 * width), depths)
    lean = Setting(f"lean {width}", "lean", (width, 2 * width), depths)
    lean_big = _matched("lean", size_of(resnet)[0], depths)
    resnet_small = _matched("resnet", size_of(lean)[0], depths)
    unique = {}
    for s in (resnet, lean, lean_big, resnet_small):
        unique.setdefault(s.label, s)
    return list(unique.values())


def train_one(setting: Setting, seed: int, epochs: int, data, batch: int = 64, lr: float = 3e-3) -> dict:
    """Train one setting with one seed; returns a CSV row."""
    import torch

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)
    torch.manual_seed(seed)
    net = build(setting)
    params, flops = size_of(setting)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x_train) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
    return {"label": setting.label, "family": setting.family, "widths": "x".join(map(str, setting.widths)),
            "depths": "x".join(map(str, setting.depths)), "params": params, "flops": flops, "seed": seed,
            "epochs": epochs, "test_accuracy": accuracy, "final_train_loss": loss_value}


def _progress(done: int, total: int, label: str, start: float) -> None:
    width = 30
    filled = int(width * done / total)
    elapsed = time.perf_counter() - start
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<14} {elapsed:5.0f}s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_study(settings=None, seeds=(0, 1, 2), epochs: int = 30, path: Path | None = CSV_PATH,
              progress: bool = True) -> list[dict]:
    """Train every setting with every seed; write the CSV (unless ``path`` is None)."""
    import torch

    torch.set_num_threads(1)  # a small model: one thread is as fast, and polite on a shared machine
    settings = settings or default_settings()
    data = load_digits_split(0)
    rows = []
    total = len(settings) * len(seeds)
    start = time.perf_counter()
    for setting in settings:
        for seed in seeds:
            if progress:
                _progress(len(rows), total, setting.label, start)
            rows.append(train_one(setting, seed, epochs, data))
    if progress:
        _progress(total, total, "done", start)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


def read_study(path: Path = CSV_PATH) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("params", "flops", "seed", "epochs"):
            r[k] = int(r[k])
        for k in ("test_accuracy", "final_train_loss"):
            r[k] = float(r[k])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per setting: parameters, FLOPs, mean and standard deviation of the test accuracy over seeds."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for label, group in by_label.items():
        acc = np.array([r["test_accuracy"] for r in group])
        out.append({"label": label, "family": group[0]["family"], "widths": group[0]["widths"],
                    "params": group[0]["params"], "flops": group[0]["flops"], "seeds": len(group),
                    "mean_accuracy": float(acc.mean()), "std_accuracy": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0})
    return out


def plot(rows: list[dict], path: Path | None = None):
    """Test accuracy (mean +- std over seeds) against parameters and against FLOPs per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colours = {"resnet": "tab:blue", "lean": "tab:orange"}
    for ax, key, xlabel in ((axes[0], "params", "parameters"), (axes[1], "flops", "FLOPs per 8x8 image")):
        for s in summary:
            ax.errorbar(s[key], 100 * s["mean_accuracy"], yerr=100 * s["std_accuracy"], fmt="o", capsize=3,
                        color=colours[s["family"]])
            ax.annotate(s["label"], (s[key], 100 * s["mean_accuracy"]), textcoords="offset points", xytext=(5, -12),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean +- std over seeds")
    for family, colour in colours.items():
        axes[0].plot([], [], "o", color=colour, label={"resnet": "ResNet", "lean": "LeanResNet (star5)"}[family])
    axes[0].legend(loc="lower right")
    fig.suptitle("scikit-learn digits (1257 train / 540 test), CPU training")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, nothing written (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        rows = run_study(default_settings(args.width), (0,), 2, path=None)
    else:
        rows = run_study(default_settings(args.width), tuple(args.seeds), args.epochs)
        plot(rows, CSV_PATH.with_suffix(".png"))
    for s in summarize(rows):
        print(f"{s['label']:<12} widths {s['widths']:<7} params {s['params']:>7} FLOPs {s['flops']:>9} "
              f"accuracy {100 * s['mean_accuracy']:.2f} +- {100 * s['std_accuracy']:.2f} ({s['seeds']} seeds)")


if __name__ == "__main__":
    main()
