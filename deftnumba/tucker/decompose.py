"""Tucker-2 decomposition of a convolution weight, with TensorLy (as TDC does).

A weight ``W [Cout, C, kh, kw]`` is factored on its two channel modes only::

    W ~= core x_0 U_out x_1 U_in,   U_out [Cout, r_out], U_in [C, r_in], core [r_out, r_in, kh, kw]

* ``method="hosvd"``: U_out and U_in are the leading left singular vectors of
  the mode-0 and mode-1 unfoldings (the truncated higher-order SVD); TDC's
  initialisation. One SVD per mode, no iteration.
* ``method="hooi"``: higher-order orthogonal iteration from the HOSVD start
  (alternating SVDs of the weight projected on the other factor), which can only
  lower the reconstruction error.

The factors are returned as the three convolution weights of a Tucker layer
(``first = U_in^T``, ``core``, ``last = U_out``; see ``deftnumba.tucker.geometry``).
At full rank (``r_out = Cout``, ``r_in = C``) both methods are exact up to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

METHODS = ("hosvd", "hooi")


class TuckerFactors(NamedTuple):
    """The three weights of a Tucker layer and the relative reconstruction error
    ``||W - W_hat||_F / ||W||_F`` (computed in float64)."""

    first: np.ndarray   # [r_in, C, 1, 1]
    core: np.ndarray    # [r_out, r_in, kh, kw]
    last: np.ndarray    # [Cout, r_out, 1, 1]
    rel_error: float

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return self.core.shape[0], self.core.shape[1]


def _tensorly():
    try:
        import tensorly
        from tensorly.decomposition import partial_tucker
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("deftnumba.tucker.decompose needs TensorLy: pip install 'deftnumba[tucker]'") from err
    tensorly.set_backend("numpy")
    return partial_tucker


def decompose(weight, ranks, method: str = "hosvd", *, n_iter_max: int = 100, tol: float = 1e-8) -> TuckerFactors:
    """Tucker-2 factors of a conv weight ``[Cout, C, kh, kw]`` at ``ranks = (r_out, r_in)``.

    ``weight`` may be NumPy, CuPy or a torch tensor (it is copied to the host as
    float64); the factors come back as NumPy arrays of the weight's float dtype
    (float32 or float64). ``method``: ``"hosvd"`` or ``"hooi"`` (``n_iter_max``
    and ``tol`` bound HOOI's iterations).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w = _to_numpy(weight)
    if w.ndim != 4:
        raise ValueError(f"weight must be 4-D [Cout, C, kh, kw], got shape {tuple(w.shape)}")
    dtype = w.dtype if w.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    c_out, c, kh, kw = w.shape
    try:
        r_out, r_in = (int(r) for r in ranks)
    except (TypeError, ValueError):
        raise TypeError(f"ranks must be a pair of ints (r_out, r_in), got {ranks!r}") from None
    if not (1 <= r_out <= c_out and 1 <= r_in <= c):
        raise ValueError(f"ranks (r_out, r_in) must lie in [1, Cout={c_out}] x [1, C={c}], got {(r_out, r_in)}")
    partial_tucker = _tensorly()
    w64 = w.astype(np.float64)
    # TensorLy's partial_tucker: init="svd" is the HOSVD; n_iter_max=0 stops there.
    (core, (u_out, u_in)), _ = partial_tucker(
        w64, rank=[r_out, r_in], modes=[0, 1], init="svd",
        n_iter_max=0 if method == "hosvd" else n_iter_max, tol=tol)
    first = np.ascontiguousarray(u_in.T)[:, :, None, None]   # [r_in, C, 1, 1]
    last = np.ascontiguousarray(u_out)[:, :, None, None]     # [Cout, r_out, 1, 1]
    core = np.ascontiguousarray(core)
    approx = np.einsum("oa,abhw,bc->ochw", u_out, core, u_in.T, optimize=True)
    norm = np.linalg.norm(w64)
    rel_error = float(np.linalg.norm(w64 - approx) / norm) if norm > 0 else 0.0
    return TuckerFactors(first.astype(dtype), core.astype(dtype), last.astype(dtype), rel_error)


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy()
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return np.asarray(a)
