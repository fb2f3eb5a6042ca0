"""Offset fields to study tiling with: synthetic smooth random fields, and learned ones.

A DCN layer's offsets decide where its taps read the input, so they decide how
often a tap leaves the input tile a fused kernel staged in shared memory. Two
sources of offsets, both in torchvision's layout ``[N, 2*G*kh*kw, Ho, Wo]`` with
``(dy, dx)`` interleaved per tap:

* ``smooth_field``: Gaussian-smoothed white noise with a chosen magnitude (RMS
  of each component, in input pixels) and correlation length (the smoothing
  sigma, in output pixels). Cheap, any shape, and the two knobs map directly to
  the two things tiling cares about: how far taps move, and how coherently
  neighbouring pixels move together.
* ``load_learned``: offsets that a small DCN network learned on scikit-learn's
  handwritten digits (the data ship inside the scikit-learn package, so nothing
  is downloaded). ``python -m deftnumba.offsets`` trains the network on the CPU
  with ``deftnumba.torch_reference`` and rewrites ``data/offsets/digits_dcn.npz``.

``summarize`` reduces a field to the few numbers the notebooks quote. What a field
costs the im2col gather in memory sectors is ``dcn.sectors.gather_sectors``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .sectors import gather_sectors  # noqa: F401  (offsets.gather_sectors, its old home)

LEARNED_PATH = Path(__file__).resolve().parents[2] / "data" / "offsets" / "digits_dcn.npz"
"""The committed learned offsets (``python -m deftnumba.offsets`` regenerates them)."""


# --------------------------------------------------------------------------- synthetic fields
def _gaussian_filter_periodic(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth the last two axes with a Gaussian of std ``sigma`` (periodic, by FFT)."""
    if sigma <= 0:
        return noise
    h, w = noise.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(h, w))


def smooth_field(batch: int, taps: int, height: int, width: int, magnitude: float = 1.0,
                 correlation: float = 2.0, offset_groups: int = 1, seed: int = 0,
                 dtype="float32") -> np.ndarray:
    """A smooth random offset field ``[batch, 2*offset_groups*taps, height, width]``.

    magnitude:   root-mean-square of every ``dy`` and ``dx`` value, in input pixels.
    correlation: correlation length in output pixels (the std of the Gaussian that
                 smooths white noise); 0 gives independent offsets per pixel.

    Each (image, group, tap, component) plane is an independent field. The result
    is rescaled so its RMS is exactly ``magnitude``; its mean is close to zero.
    """
    if magnitude < 0 or correlation < 0:
        raise ValueError(f"magnitude and correlation must be >= 0, got {magnitude}, {correlation}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, 2 * offset_groups * taps, height, width))
    field = _gaussian_filter_periodic(noise, float(correlation))
    rms = float(np.sqrt(np.mean(field**2)))
    scale = magnitude / rms if rms > 0 else 0.0
    return (field * scale).astype(dtype)


def for_geometry(geometry, magnitude: float = 1.0, correlation: float = 2.0, seed: int = 0) -> np.ndarray:
    """``smooth_field`` shaped for a ``deftnumba.arguments.Geometry``'s offset argument."""
    g = geometry
    return smooth_field(g.batch, g.taps, g.out_h, g.out_w, magnitude, correlation,
                        g.offset_groups, seed, g.dtype)


# --------------------------------------------------------------------------- statistics
def components(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dy, dx)`` as two arrays ``[N, G*K, Ho, Wo]``."""
    offset = np.asarray(offset)
    return offset[:, 0::2], offset[:, 1::2]


def neighbour_correlation(offset: np.ndarray) -> float:
    """Correlation between the offsets of horizontally and vertically adjacent output pixels.

    Near 0 for independent offsets, near 1 for fields that vary slowly in space.
    """
    f = np.asarray(offset, dtype=np.float64)
    f = f - f.mean(axis=(-2, -1), keepdims=True)
    pairs = [(f[..., :, 1:], f[..., :, :-1]), (f[..., 1:, :], f[..., :-1, :])]
    num = sum(float(np.sum(a * b)) for a, b in pairs)
    den = sum(float(np.sqrt(np.sum(a * a) * np.sum(b * b))) for a, b in pairs)
    return num / den if den > 0 else 0.0


def summarize(offset: np.ndarray) -> dict[str, float]:
    """A few numbers that describe a field: RMS, mean, percentiles of |d|, smoothness."""
    dy, dx = (c.astype(np.float64) for c in components(offset))
    length = np.hypot(dy, dx)
    return {
        "rms_px": float(np.sqrt(np.mean(np.concatenate([dy.ravel(), dx.ravel()]) ** 2))),
        "mean_dy_px": float(dy.mean()),
        "mean_dx_px": float(dx.mean()),
        "p50_length_px": float(np.percentile(length, 50)),
        "p90_length_px": float(np.percentile(length, 90)),
        "p99_length_px": float(np.percentile(length, 99)),
        "max_length_px": float(length.max()),
        "neighbour_correlation": neighbour_correlation(offset),
    }


# --------------------------------------------------------------------------- learned offsets
def load_learned(path: str | Path = LEARNED_PATH) -> dict:
    """The committed learned offsets: ``{"layers": {name: offset float32}, "meta": dict}``.

    ``meta`` says how they were made (data, network, epochs, test accuracy,
    versions, command) and the geometry of each layer.
    """
    with np.load(Path(path)) as data:
        meta = json.loads(str(data["meta"]))
        layers = {name: data[f"offset_{name}"].astype(np.float32) for name in meta["layers"]}
    return {"layers": layers, "meta": meta}


def _digits(upsample: int, seed: int):
    """scikit-learn's 8x8 digits, scaled to [0, 1], upsampled, split 80/20."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, scale_factor=upsample, mode="bilinear",
                                             align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]], labels[order[split:]])


def _make_network(channels: int = 16):
    """A small classifier with two DCN v2 layers (offsets and masks predicted by 3x3 convs)."""
    import torch
    from torch import nn

    from . import torch_reference

    class DeformLayer(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3) * (2.0 / (9 * c_in)) ** 0.5)
            self.bias = nn.Parameter(torch.zeros(c_out))
            self.offset = nn.Conv2d(c_in, 2 * 9, 3, padding=1)  # zero init: starts as a plain conv
            self.mask = nn.Conv2d(c_in, 9, 3, padding=1)
            for conv in (self.offset, self.mask):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            self.last_offset = None

        def forward(self, x):
            offset = self.offset(x)
            mask = 2.0 * torch.sigmoid(self.mask(x))  # 1.0 at init
            self.last_offset = offset.detach()
            return torch_reference.deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)

    class DigitsDCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, channels, 3, padding=1)
            self.dcn1 = DeformLayer(channels, channels)
            self.dcn2 = DeformLayer(channels, 2 * channels)
            self.head = nn.Linear(2 * channels, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.dcn1(x))
            x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.relu(self.dcn2(x))
            return self.head(x.mean(dim=(2, 3)))

    return DigitsDCN()


def train_learned(epochs: int = 12, upsample: int = 2, keep_images: int = 32, seed: int = 0,
                  train_limit: int | None = None, log=print) -> dict:
    """Train the digits DCN on the CPU; return the offsets of ``keep_images`` test images.

    Returns the same structure as ``load_learned``. ``train_limit`` trains on the
    first images only (for quick tests).
    """
    import sklearn
    import torch

    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = _digits(upsample, seed)
    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    net = _make_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    batch = 64
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(order):.4f}")
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
        net(x_test[:keep_images])
    seconds = time.perf_counter() - start
    log(f"test accuracy {accuracy:.4f} after {seconds:.1f} s")
    side = 8 * upsample
    layers = {"dcn1": net.dcn1.last_offset.numpy().astype(np.float32),
              "dcn2": net.dcn2.last_offset.numpy().astype(np.float32)}
    meta = {
        "description": ("offsets predicted by the two DCN v2 layers of a small classifier trained on "
                        "scikit-learn's 8x8 handwritten digits (sklearn.datasets.load_digits, shipped "
                        "in the package), upsampled bilinearly to "
                        f"{side}x{side}; offsets of the first {keep_images} held-out test images"),
        "network": ("conv3x3(1->16)+ReLU -> DCNv2 3x3(16->16)+ReLU -> maxpool2 -> DCNv2 3x3(16->32)+ReLU "
                    "-> global mean -> linear(32->10); offsets and masks from zero-initialised 3x3 convs; "
                    "pure-torch DCN (deftnumba.torch_reference), CPU"),
        "layers": {
            "dcn1": {"height": side, "width": side, "kernel": [3, 3], "stride": 1, "padding": 1,
                     "in_channels": 16, "out_channels": 16},
            "dcn2": {"height": side // 2, "width": side // 2, "kernel": [3, 3], "stride": 1, "padding": 1,
                     "in_channels": 16, "out_channels": 32},
        },
        "epochs": epochs, "seed": seed, "train_images": int(len(y_train)), "test_images": int(len(y_test)),
        "test_accuracy": accuracy, "train_seconds": round(seconds, 1),
        "torch": torch.__version__, "scikit_learn": sklearn.__version__,
        "command": "python -m deftnumba.offsets",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"layers": layers, "meta": meta}


def save_learned(result: dict, path: str | Path = LEARNED_PATH) -> Path:
    """Write ``result`` (from ``train_learned``) as a compressed ``.npz``, offsets in float16."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"offset_{name}": a.astype(np.float16) for name, a in result["layers"].items()}
    np.savez_compressed(path, meta=np.array(json.dumps(result["meta"])), **arrays)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deftnumba.offsets",
                                     description="Train the digits DCN on the CPU and store its learned offsets.")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(LEARNED_PATH))
    args = parser.parse_args(argv)
    result = train_learned(epochs=args.epochs, seed=args.seed)
    path = save_learned(result, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    for name, offset in result["layers"].items():
        print(f"  {name}: {offset.shape}  " + "  ".join(f"{k}={v:.3g}" for k, v in summarize(offset).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
