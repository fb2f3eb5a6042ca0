"""Worker for the two-process DistributedDataParallel test (``test_torch_layer.py``).

A module of its own, so that ``torch.multiprocessing.spawn`` children import only
this (and deftnumba, torch), not the test module.
"""

import os

import torch
from torch import nn

from deftnumba.torch import DeformConv2d


class Block(nn.Module):
    """conv -> offsets and mask -> DCNv2, float64."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.predict = nn.Conv2d(3, 27, 3, padding=1)
        self.dcn = DeformConv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        o = self.predict(x)
        return self.dcn(x, 2.0 * o[:, :18], torch.sigmoid(o[:, 18:]))


def model_and_batch(batch=4):
    """The same initial model and data in every process."""
    torch.manual_seed(0)
    model = Block().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 2, 5, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(batch, 4, 5, 4, generator=gen, dtype=torch.float64)
    return model, x, target


def loss_fn(out, target):
    return (out - target).square().mean()


def run(rank: int, world: int, store_path: str, result_path: str) -> None:
    """One rank: its share of the batch through DDP, one backward, one SGD step;
    rank 0 saves the gradients and the updated parameters. The ranks meet through
    a file store (no TCP port to pick, so no race with other processes for one)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        model, x, target = model_and_batch()
        share = x.shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        ddp = DistributedDataParallel(model)
        loss_fn(ddp(x[rows]), target[rows]).backward()  # DDP averages the gradients over ranks
        grads = {k: p.grad.clone() for k, p in ddp.module.named_parameters()}
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        if rank == 0:
            params = {k: p.detach().clone() for k, p in ddp.module.named_parameters()}
            torch.save({"grads": grads, "params": params}, result_path)
    finally:
        dist.destroy_process_group()
