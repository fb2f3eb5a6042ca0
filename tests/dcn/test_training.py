"""The DCN ResNet-50 (deftnumba.models) and the training benchmark's simulator smoke run."""

import argparse
import os

import pytest

from deftnumba.runtime import backend

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from deftnumba.dcn import models, training  # noqa: E402
from deftnumba.dcn.torch import DeformConv2d  # noqa: E402

DEVICE = torch.device("cpu" if backend.IS_SIMULATOR else "cuda")


def snapshot(directory):
    """Every file under ``directory`` with its size and modification time."""
    if not directory.exists():
        return None
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*"))


def test_resnet50_shapes_and_deformable_layers():
    plain = models.resnet50("conv")
    assert sum(p.numel() for p in plain.parameters()) == 25_557_032  # torchvision's resnet50
    assert models.deformable_layers(plain) == []
    dcn = models.resnet50("deftnumba")
    layers = models.deformable_layers(dcn)
    assert len(layers) == 13  # every 3x3 of layer2 (4), layer3 (6), layer4 (3)
    assert all(isinstance(m.conv, DeformConv2d) for m in layers)
    assert all(m.offset_mask.weight.abs().max() == 0 and m.offset_mask.bias.abs().max() == 0 for m in layers)
    assert [m.conv.stride for m in layers[:2]] == [(2, 2), (1, 1)]
    assert not any(isinstance(m, models.ModulatedDeformConv3x3) for m in dcn.layer1.modules())
    with pytest.raises(ValueError, match="variant"):
        models.resnet50("nope")


def test_deformable_block_starts_as_half_a_dense_conv():
    """Zero-initialised predictor: offsets 0 and mask sigmoid(0) = 0.5, so the block is 0.5 * conv."""
    torch.manual_seed(0)
    block = models.ModulatedDeformConv3x3(3, 4, 2, DeformConv2d).to(DEVICE)
    x = torch.randn(2, 3, 7, 6).to(DEVICE)
    expected = 0.5 * nn.functional.conv2d(x, block.conv.weight, stride=2, padding=1)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_torchvision_variant_needs_torchvision():
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            models.resnet50("torchvision")
        assert training.available_variants(training.VARIANTS)[1] == {"torchvision": "torchvision is not installed"}
    else:
        assert len(models.deformable_layers(models.resnet50("torchvision"))) == 13


def test_conv_variant_matches_torchvision_resnet50_state_dict():
    tv_models = pytest.importorskip("torchvision.models")
    ours = models.resnet50("conv").state_dict()
    theirs = tv_models.resnet50().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.skipif(not backend.IS_SIMULATOR, reason="the smoke run is the simulator's mode")
def test_smoke_run_prints_a_labelled_table_and_writes_nothing(capsys):
    before = snapshot(training.BENCH_DIR)
    # A shallower net than the CLI's smoke run (ResNet-50's depth) keeps this test quick.
    args = argparse.Namespace(training=True, training_layers=(1, 1, 1, 1), training_steps=2)
    assert training.main(args) == 0
    out = capsys.readouterr().out
    assert snapshot(training.BENCH_DIR) == before
    assert "SIMULATOR SMOKE RUN" in out and "not GPU timings" in out
    assert "resnet50-w4-1111, batch 2, 32x32" in out and "0 warm-up + 2 timed steps" in out
    # table rows: a variant name, then its DCN count (not the "deftnumba vs torchvision: ..." line
    # printed when torchvision is installed and ran)
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["conv"], ["deftnumba"]) and line.split()[1].isdigit()}
    assert set(rows) == {"conv", "deftnumba"}
    assert rows["conv"][1] == "0" and rows["deftnumba"][1] == "3"  # DCN layers
    assert float(rows["conv"][5]) == 1.0 and float(rows["deftnumba"][5]) > 0
    for row in rows.values():
        first, last = map(float, row[-1].split("->"))
        assert 0 < last < 10 and first != last  # it trained: the loss moved
    assert "torchvision" in out  # a row where torchvision is installed, else a line saying it was skipped


def test_csv_rows_carry_provenance_and_pass_train(tmp_path):
    bench = pytest.importorskip("deftnumba.bench.harness")
    rows = [dict(variant=v, dcn_layers=d, params=p, median_ms=ms, p10_ms=ms - 1, p90_ms=ms + 1, normalized=ms / 10,
                 images_per_s=32e3 / ms, steps=50, first_loss=7.0, last_loss=6.5)
            for v, d, p, ms in (("conv", 0, 25_557_032, 10.0), ("torchvision", 13, 26_428_295, 20.0),
                                ("deftnumba", 13, 26_428_295, 16.0))]
    table = training.csv_rows(rows, training.GPU_CONFIG, tf32_check="off: test", commit="abc123")
    provenance = bench.provenance("abc123")
    assert all(list(row)[:len(provenance)] == list(provenance) for row in table)
    assert all(list(row)[len(provenance):] == list(training.COLUMNS) for row in table)
    assert [row["pass"] for row in table] == ["train"] * 3
    assert [row["method"] for row in table] == ["conv", "torchvision", "deftnumba"]
    assert table[0]["shape"] == "resnet50" and table[0]["batch"] == 32 and table[0]["height"] == 224
    assert table[2]["speedup_vs_torchvision"] == pytest.approx(1.25) and table[2]["commit"] == "abc123"
    path = training.write_csv(table, tmp_path)
    assert path.parent == tmp_path and path.name.endswith(".csv")
    loaded = bench.load_results(path)
    assert [r["method"] for r in loaded] == ["conv", "torchvision", "deftnumba"]
    assert loaded[2]["median_ms"] == 16.0 and loaded[0]["tf32"] is False
    if backend.IS_SIMULATOR:
        with pytest.raises(ValueError, match="refusing"):
            training.write_csv(table, training.BENCH_DIR / "training")


def test_cli_bench_training_flag_reaches_training_main(monkeypatch):
    from deftnumba import __main__ as cli

    seen = {}
    monkeypatch.setattr(training, "main", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["bench", "--training", "--method", "conv", "--reps", "7"]) == 0
    args = seen["args"]
    assert args.training and args.method == ["conv"] and args.reps == 7


def test_deftnumba_and_torchvision_resnets_agree():
    """Same weights (state_dicts interchange): same logits and same gradients, through 3 DCN layers."""
    pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    theirs = models.resnet50("torchvision", num_classes=5, width=4, layers=(1, 1, 1, 1)).to(DEVICE).double()
    ours = models.resnet50("deftnumba", num_classes=5, width=4, layers=(1, 1, 1, 1)).to(DEVICE).double()
    ours.load_state_dict(theirs.state_dict())
    for m in models.deformable_layers(theirs):  # non-zero offsets, so sampling is really bilinear
        torch.nn.init.normal_(m.offset_mask.weight, std=0.3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(DEVICE)
    out_theirs, out_ours = theirs(x), ours(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-9, atol=1e-9)
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.skipif(backend.IS_SIMULATOR or not torch.cuda.is_available(), reason="needs a GPU and the cuda backend")
def test_gpu_training_benchmark_writes_a_csv(tmp_path, capsys):
    bench = pytest.importorskip("deftnumba.bench.harness")
    args = argparse.Namespace(training=True, out=tmp_path, reps=3, warmup=1, training_resolution=64,
                              training_width=8, training_batch=4)
    assert training.main(args) == 0
    out = capsys.readouterr().out
    assert "SMOKE" not in out and "GPU ms, CUDA events" in out
    (path,) = tmp_path.glob("*.csv")
    rows = bench.load_results(path)
    assert {r["method"] for r in rows} >= {"conv", "deftnumba"}
    assert all(r["pass"] == "train" and r["mode"] == "gpu" and r["median_ms"] > 0 for r in rows)


def test_comparison_and_table_wording():
    def row(variant, ms, dcn):
        return dict(variant=variant, dcn_layers=dcn, median_ms=ms, p10_ms=ms, p90_ms=ms, normalized=ms / 10,
                    images_per_s=320 / ms, first_loss=7.0, last_loss=6.0)

    rows = [row("conv", 10.0, 0), row("torchvision", 30.0, 13), row("deftnumba", 20.0, 13)]
    cmp = training.comparison(rows)
    assert cmp == pytest.approx({"step_speedup": 1.5, "normalized_reduction": 1 / 3, "overhead_reduction": 0.5})
    table = training.format_table(rows, {}, training.GPU_CONFIG, smoke=False)
    assert "step speedup 1.50x; normalized training time 33.3% lower, DCN overhead over conv 50.0% lower" in table
    assert "SMOKE" not in table and "resnet50, batch 32, 224x224" in table
    slower = training.format_table([row("conv", 10.0, 0), row("torchvision", 20.0, 13), row("deftnumba", 30.0, 13)],
                                   {}, training.GPU_CONFIG, smoke=False)
    assert "normalized training time 50.0% higher, DCN overhead over conv 100.0% higher" in slower
    assert training.comparison(rows[::2]) is None
