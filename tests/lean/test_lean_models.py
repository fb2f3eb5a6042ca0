"""LeanResNet blocks and networks, and the parameter and FLOP counters."""

import pytest

torch = pytest.importorskip("torch")

from deftnumba.lean import models  # noqa: E402
from deftnumba.lean.torch import LeanConv2d  # noqa: E402


def test_counters_match_hand_counts():
    c, s = 8, 5
    assert models.count_parameters(LeanConv2d(c, "star5", bias=False)) == c * c + c * s
    # a ResNet basic block: two 9*C*C convolutions and two batch norms (2*C each)
    assert models.count_parameters(models.BasicBlock(c)) == 2 * 9 * c * c + 4 * c
    assert models.count_parameters(models.LeanBasicBlock(c)) == 2 * (c * c + c * s) + 4 * c
    h = 6
    assert models.count_flops(models.BasicBlock(c), (1, c, h, h)) == 2 * 2 * 9 * c * c * h * h
    assert models.count_flops(models.LeanBasicBlock(c), (1, c, h, h)) == 2 * 2 * (c * c + c * s) * h * h


def test_block_comparison_orders_the_families():
    rows = {r["block"].split(" (")[0]: r for r in models.block_comparison(64, 8)}
    assert rows["LeanResNet block"]["params"] < rows["ResNet basic block"]["params"] / 4
    assert rows["LeanResNet block"]["flops"] < rows["MobileNetV2 inverted residual"]["flops"]
    assert rows["ShuffleNetV2 unit"]["params"] < rows["LeanResNet block"]["params"]


@pytest.mark.parametrize("build", [models.lean_resnet, models.resnet])
def test_networks_run_and_learn_a_step(build):
    torch.manual_seed(0)
    net = build((1, 1), (4, 8), 10, in_channels=1)
    x = torch.randn(5, 1, 8, 8)
    y = net(x)
    assert y.shape == (5, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_lean_block_through_the_kernels_matches_torch_ops():
    torch.manual_seed(1)
    block = models.LeanBasicBlock(2, impl="torch").double().eval()
    kernels = models.LeanBasicBlock(2, impl="deftnumba").double().eval()
    kernels.load_state_dict(block.state_dict())
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(kernels(x), block(x))


def test_errors():
    with pytest.raises(ValueError, match="one length"):
        models.lean_resnet((1, 1), (4,), 10)
    with pytest.raises(ValueError, match="even width"):
        models.ShuffleUnit(5)
