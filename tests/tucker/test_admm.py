"""ADMM training pieces (tiny CPU runs)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from deftnumba.tucker import admm, decompose  # noqa: E402


def test_tucker_projection_is_the_hosvd(rng):
    w = torch.tensor(rng.standard_normal((6, 5, 3, 3)))
    p = admm.tucker_projection(w, (2, 3))
    err = float((p - w).norm() / w.norm())
    assert err == pytest.approx(decompose(w.numpy(), (2, 3)).rel_error, rel=1e-9)
    assert torch.allclose(admm.tucker_projection(p, (2, 3)), p, atol=1e-10)  # a projection


def test_compression_and_ranks():
    model = admm._model_class()()
    r = admm.ranks_for(model, 0.25)
    assert r == {"conv2": (8, 4), "conv3": (8, 8)}
    assert admm.compression(model, {"conv2": (32, 16), "conv3": (32, 32)}) < 1.2
    assert admm.compression(model, r) > 5


def test_tiny_sweep_runs_and_writes(tmp_path):
    s = admm.Settings(pretrain_epochs=1, admm_epochs=1, finetune_epochs=1)
    rows = admm.sweep((0.25,), s, quiet=True)
    assert [r["method"] for r in rows] == ["dense", "truncate", "truncate+finetune", "admm"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    path = admm.write_csv(rows, tmp_path / "a.csv")
    back = admm.load_csv(path)
    assert [r["method"] for r in back] == [r["method"] for r in rows]
    assert np.isclose(back[-1]["test_accuracy"], rows[-1]["test_accuracy"])
    assert 0 <= back[-1]["projection_gap"] <= 1 and back[1]["projection_gap"] > 0  # admm, truncate
    assert back[0]["projection_gap"] is None  # dense
    (stats,) = [r for r in admm.summary(back) if r["method"] == "admm"]
    assert stats["seeds"] == 1 and stats["std"] == 0 and np.isclose(stats["mean"], rows[-1]["test_accuracy"])


def test_admm_converges_onto_the_rank_limited_set():
    """With the default penalty schedule the weights end near their Tucker projection (the
    decomposition then loses little); before session 21 they ended 52% away at 1/8 ranks."""
    torch.manual_seed(3)
    s = admm.Settings(pretrain_epochs=3, finetune_epochs=0, seed=3)
    data = admm.load_digits(3)
    model = admm._model_class()()
    admm.train(model, data, s.pretrain_epochs, s)
    ranks = admm.ranks_for(model, 0.125)
    before = admm.projection_gap(model, ranks)
    tucker = admm.admm(model, data, ranks, s)
    assert tucker.projection_gap < 0.1 and tucker.projection_gap < before / 3, (before, tucker.projection_gap)
    assert admm.projection_gap(model, ranks) == pytest.approx(tucker.projection_gap)


def test_the_scaled_dual_shrinks_as_rho_grows():
    """U is the scaled dual (y / rho): when rho grows U must shrink by the same factor, or the
    implied dual grows with rho and holds W off its projection. At 1/16 ranks, 12 rounds: the
    gap ends at 0.04 with the rescale and 0.11 without (seed 3)."""
    torch.manual_seed(3)
    s = admm.Settings(pretrain_epochs=3, finetune_epochs=0, seed=3)
    data = admm.load_digits(3)
    model = admm._model_class()()
    admm.train(model, data, s.pretrain_epochs, s)
    tucker = admm.admm(model, data, admm.ranks_for(model, 0.0625), s)
    assert tucker.projection_gap < 0.07


def test_the_last_epochs_anneal_the_rate_to_zero():
    """``anneal_last``: a constant rate, then a cosine down to zero over the last epochs."""
    s = admm.Settings(lr=0.01, batch=256)
    data = admm.load_digits(1)
    model = admm._model_class()()
    seen = []
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    model.register_forward_hook(lambda *_: seen.append(opt.param_groups[0]["lr"]))  # the rate of each step
    admm.train(model, data, 3, s, opt=opt, anneal_last=2)
    per_epoch = -(-len(data[1]) // s.batch)
    assert seen[:per_epoch + 1] == [0.01] * (per_epoch + 1)  # the first epoch and the first annealed step
    tail = seen[per_epoch:]
    assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.01 * 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)


def test_both_methods_end_on_the_same_schedule(monkeypatch):
    """The comparison is fair: truncate-then-fine-tune and ADMM's fine-tune both anneal their
    last ``finetune_epochs`` epochs, and train the same total number of epochs."""
    calls = []
    train = admm.train

    def spy(model, data, epochs, s, penalty=None, gen=None, progress=None, opt=None, anneal_last=0):
        calls.append((epochs, penalty is not None, anneal_last))
        return train(model, data, epochs, s, penalty, gen, progress, opt, anneal_last)

    monkeypatch.setattr(admm, "train", spy)
    s = admm.Settings(pretrain_epochs=1, admm_epochs=2, finetune_epochs=1)
    admm.sweep((0.25,), s, quiet=True)
    pretrain, finetune, *rounds, admm_finetune = calls
    assert finetune == (3, False, 1) and admm_finetune == (1, False, 1)
    assert rounds == [(1, True, 0)] * 2
    calls.clear()
    admm.sweep((0.25,), admm.Settings(pretrain_epochs=1, admm_epochs=2, finetune_epochs=1, anneal=False), quiet=True)
    assert all(c[2] == 0 for c in calls)


def test_paired_differences_pair_by_seed():
    def row(method, seed, acc):
        return dict(method=method, rank_fraction=0.25, compression=7.9, test_accuracy=acc, seed=seed)

    rows = [row("truncate+finetune", 0, 0.90), row("admm", 0, 0.95), row("truncate+finetune", 1, 0.80),
            row("admm", 1, 0.70), row("truncate+finetune", 2, 0.60), row("admm", 2, 0.60),
            row("admm", 3, 0.99),  # no partner: left out
            row("dense", 0, 0.97)]
    (p,) = admm.paired_differences(rows)
    d = np.array([0.05, -0.10, 0.0])
    assert p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert (p["wins"], p["ties"], p["losses"], p["seeds"]) == (1, 1, 1, 3)
