"""Provenance: one source for the commit, the versions, the TF32 state and where results go.

Every CSV row and every chart caption takes its provenance from here:

* ``git_commit``: ``$DEFTNUMBA_COMMIT`` (a copy of the repo without ``.git``, as on a
  borrowed GPU machine), else ``git rev-parse HEAD`` with ``-dirty`` when tracked
  files differ; ``short=True`` gives the 7-character form captions use;
* ``provenance``: the columns every benchmark row starts with;
* ``tf32_check``: a measured verdict on whether fp32 GEMMs ran in TF32;
* ``bench_dir``: where recorded results live: ``$DEFTNUMBA_BENCH_DIR`` if set, else
  ``data/bench/`` of this checkout; ``bench_dir(op)`` is the op's subfolder.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from ..runtime import backend

REPO = Path(__file__).resolve().parents[2]
SMOKE_LABEL = "simulator smoke (not GPU data)"
GPU_LABEL = "gpu"


def bench_dir(op: str | None = None) -> Path:
    """Recorded results: ``$DEFTNUMBA_BENCH_DIR`` or ``<repo>/data/bench``, then ``/<op>`` if given."""
    root = Path(os.environ.get("DEFTNUMBA_BENCH_DIR") or REPO / "data" / "bench")
    return root / op if op else root


def refuse_smoke_output(directory, bench: Path | None = None) -> None:
    """``ValueError`` if ``directory`` is (under) the recorded-results folder: simulator
    output never lands among GPU results."""
    bench = Path(bench or bench_dir()).resolve()
    resolved = Path(directory).resolve()
    if resolved == bench or bench in resolved.parents:
        raise ValueError(f"{SMOKE_LABEL}: refusing to write simulator output into {bench}")


def csv_name(row: dict) -> str:
    """``[smoke_]<UTC timestamp>_<device>_<commit>.csv`` for a row's provenance."""
    stamp = row["timestamp"].replace("-", "").replace(":", "")
    device = "".join(ch if ch.isalnum() else "-" for ch in row["device"]).strip("-").lower()
    prefix = "smoke_" if row["mode"] == SMOKE_LABEL else ""
    return f"{prefix}{stamp}_{device[:40]}_{row['commit'][:12]}.csv"


_torch = backend.torch_or_none


def short_commit(commit: str) -> str:
    """The 7-character form of a hex commit (anything else unchanged)."""
    return commit[:7] if len(commit) >= 7 and all(c in "0123456789abcdef" for c in commit[:7]) else commit


def git_commit(explicit: str | None = None, short: bool = False) -> str:
    """The commit to record: ``explicit``, ``$DEFTNUMBA_COMMIT``, or ``git rev-parse HEAD``
    (``-dirty`` appended when tracked files differ); "unknown" where there is no git.
    ``short``: the first 7 hex digits (no ``-dirty``)."""
    commit = _commit(explicit)
    return short_commit(commit) if short else commit


def _commit(explicit: str | None) -> str:
    if explicit or os.environ.get("DEFTNUMBA_COMMIT", "").strip():
        return explicit or os.environ["DEFTNUMBA_COMMIT"].strip()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def disable_tf32(torch) -> None:
    """TF32 off for cuDNN and cuBLAS in ``torch`` (fp32 compared at fp32)."""
    if torch is not None:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def tf32_check() -> str:
    """Compare an fp32 GEMM through CuPy and through torch with float64: TF32 shows as a
    relative error near 1e-4..1e-3, true fp32 near 1e-6. Returns a one-line verdict."""
    if backend.IS_SIMULATOR:
        return "n/a (simulator: NumPy BLAS, fp32)"
    cp = backend.cupy()
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)

    def rel(result) -> float:
        return float(np.linalg.norm(result - exact) / np.linalg.norm(exact))

    parts = []
    env = os.environ.get("CUPY_TF32", "0")
    try:  # CuPy's cuBLAS compute type for float32 (TF32 only when CUPY_TF32=1)
        from cupy._core import _routines_linalg as linalg

        compute = linalg.compute_type_to_str(linalg.get_compute_type(np.float32))
    except Exception:  # noqa: BLE001 - a private API; the measured error below decides
        compute = "unknown"
    err = rel(cp.asnumpy(cp.matmul(cp.asarray(a), cp.asarray(b))).astype(np.float64))
    parts.append(f"cupy {err:.1e} (CUPY_TF32={env}, compute type {compute})")
    worst = err
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        err = rel((ta @ tb).cpu().numpy().astype(np.float64))
        conv = torch.nn.functional.conv2d(ta[None, None], tb[:3, :3][None, None]).cpu().numpy()
        conv_ref = torch.nn.functional.conv2d(torch.from_numpy(a).double()[None, None],
                                              torch.from_numpy(b).double()[:3, :3][None, None]).numpy()
        conv_err = float(np.linalg.norm(conv - conv_ref) / np.linalg.norm(conv_ref))
        parts.append(f"torch matmul {err:.1e}, cudnn conv {conv_err:.1e}")
        worst = max(worst, err, conv_err)
    verdict = "off" if worst < 2e-5 else "ON?"
    return f"{verdict}: fp32 GEMM rel. err. vs float64: " + ", ".join(parts)


def provenance(commit: str | None = None) -> dict:
    """The columns every row carries: where, when, with what."""
    info = backend.device_info()
    torch = _torch()
    tv = "not installed"
    try:
        import torchvision

        tv = torchvision.__version__
    except Exception:  # noqa: BLE001
        pass
    cupy_version = info.get("cupy", "")
    if not cupy_version and not backend.IS_SIMULATOR:
        cupy_version = backend.cupy().__version__
    return {
        "mode": SMOKE_LABEL if backend.IS_SIMULATOR else GPU_LABEL,
        "device": info["device"],
        "compute_capability": info.get("compute_capability", ""),
        "driver": info.get("driver", ""),
        "cuda_runtime": info.get("cuda_runtime", ""),
        "numba_cuda": info.get("numba_cuda", ""),
        "cupy": cupy_version or "not used (simulator)",
        "torch": torch.__version__ if torch is not None else "not installed",
        "torchvision": tv,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "commit": git_commit(commit),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
