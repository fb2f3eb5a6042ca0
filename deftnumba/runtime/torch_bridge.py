"""Tensors in, kernels run, tensors out: the glue every system's torch layer shares.

This module imports torch; ``import deftnumba`` (and ``deftnumba.runtime``) does not
import it, so torch stays optional. Each system's ``torch.py`` uses:

* ``check_device(op, tensors, fix=...)``: every tensor is a ``torch.Tensor`` on one
  device that the backend can run (CUDA tensors need the ``cuda`` backend, CPU
  tensors the ``simulator``); any other pairing is a ``RuntimeError`` saying how to
  fix it, never a silent copy;
* ``to_array`` / ``to_tensor``: zero-copy views through DLPack (CuPy) or NumPy;
  a copy only for a non-contiguous tensor. ``torch.bfloat16`` travels as its bits:
  an ``ml_dtypes.bfloat16`` NumPy view on the CPU, a ``uint16`` CuPy view on CUDA
  (which the kernels read as bfloat16 inside ``precision.cupy_uint16_is_bfloat16``);
* ``on_device(device)``: on CUDA, the tensors' device is current for CuPy and Numba
  and every kernel runs on torch's current stream, so the layer orders with the
  surrounding torch work without synchronising.
"""

from __future__ import annotations

import contextlib

import torch

from . import backend


def check_device(op: str, tensors: dict, *, fix: str = "") -> torch.device:
    """The device of ``tensors`` (a dict name -> tensor or ``None``; the first given one
    decides), checked: every value a ``torch.Tensor`` (``TypeError`` naming it), all on
    one device, and a device the backend runs. ``op`` names the caller in errors; ``fix``
    is a last alternative the error offers (e.g. ``", or use method='torch'"``)."""
    given = {k: v for k, v in tensors.items() if v is not None}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    devices = {k: str(v.device) for k, v in given.items()}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"{op}: all tensors must be on one device, got {devices}")
    device = next(iter(given.values())).device
    if device.type == "cuda" and backend.IS_SIMULATOR:
        raise RuntimeError(
            f"{op} got CUDA tensors, but deftnumba runs on the simulator backend "
            f"({backend.REASON}). Set DEFTNUMBA_BACKEND=cuda (with CuPy installed) before "
            f"importing deftnumba, or move the tensors to the CPU{fix}.")
    if device.type == "cpu" and not backend.IS_SIMULATOR:
        raise RuntimeError(
            f"{op} got CPU tensors, but deftnumba runs on the cuda backend. Move the model and "
            f"tensors to the GPU (.cuda()){fix}, or set DEFTNUMBA_BACKEND=simulator before importing "
            f"deftnumba to run the kernels on the CPU (slow, for testing).")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op} supports CPU and CUDA tensors, got device {device}")
    return device


def to_array(tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of ``tensor``'s data (``None`` stays ``None``);
    a copy only if the tensor is not contiguous."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy and CuPy have no bfloat16: pass the bits
        bits = tensor.view(torch.int16)
        if tensor.is_cuda:
            return backend.cupy().from_dlpack(bits).view("uint16")
        import ml_dtypes

        return bits.numpy().view(ml_dtypes.bfloat16)
    if tensor.is_cuda:
        return backend.cupy().from_dlpack(tensor)
    return tensor.numpy()


def to_tensor(array, dtype: torch.dtype | None = None):
    """Wrap a kernel result (NumPy or CuPy; ``None`` stays ``None``) as a tensor without copying.
    ``dtype=torch.bfloat16`` says that a CuPy ``uint16`` result holds bfloat16 bits; an
    ``ml_dtypes.bfloat16`` NumPy result is recognised by its dtype."""
    if array is None:
        return None
    if backend.is_cupy_array(array):
        if dtype == torch.bfloat16 and str(array.dtype) == "uint16":
            return torch.from_dlpack(array.view("int16")).view(torch.bfloat16)
        return torch.from_dlpack(array)
    if array.dtype.name == "bfloat16":
        import numpy as np

        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@contextlib.contextmanager
def on_device(device: torch.device):
    """On CUDA: make ``device`` current for CuPy and Numba, and launch on torch's current
    stream there. On the CPU (the simulator): nothing to do."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with backend.cupy().cuda.Device(index), backend.cuda.gpus[index], backend.external_stream(stream):
        yield
