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
